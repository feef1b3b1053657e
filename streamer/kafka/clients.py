"""Connection options shared by every Kafka client (consumer, producer, admin, tools)."""

from __future__ import annotations

from typing import Any

from aiokafka.helpers import create_ssl_context

from streamer.config import Settings


def connection_options(settings: Settings) -> dict[str, Any]:
    """bootstrap servers, client id and the security options, for any aiokafka client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(
            cafile=settings.ssl_cafile, certfile=settings.ssl_certfile, keyfile=settings.ssl_keyfile
        )
    if settings.sasl_mechanism:
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        secret = settings.sasl_secret  # sasl_password, or read from sasl_password_file
        options["sasl_plain_password"] = secret.get_secret_value() if secret else None
    return options
