"""ResNet18 construction and weights: torchvision pretrained, a local file, or seeded random.

``--weights`` accepts:

* ``imagenet``      torchvision's ``ResNet18_Weights.IMAGENET1K_V1`` (downloaded once into
                    torch's cache; a clear error when the internet is unreachable);
* ``random[:SEED]`` seeded random initialisation (default seed 0): meaningless predictions,
                    for tests and benchmarks only, and logged as such;
* ``PATH``          a ResNet18 ``state_dict`` saved with ``torch.save``;
* ``null``          no model: the same fixed scores for every image, computed from
                    nothing (like Triton's identity models). For measuring the host
                    path (Kafka, decode, shared memory, batching) without inference.

Labels always come from torchvision's ImageNet category list.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torchvision.models import ResNet18_Weights, resnet18

from streamer.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

MODEL_NAME = "resnet18"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_labels() -> list[str]:
    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


@dataclass(frozen=True)
class WeightsSpec:
    kind: Literal["imagenet", "random", "file", "null"]
    seed: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> WeightsSpec:
        if text in ("imagenet", "null"):
            return cls(text)  # type: ignore[arg-type]
        if text == "random" or text.startswith("random:"):
            _, _, seed = text.partition(":")
            try:
                return cls("random", seed=int(seed) if seed else 0)
            except ValueError:
                raise ConfigError(f"--weights {text!r}: the seed must be an integer") from None
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"--weights {text!r}: expected 'imagenet', 'random[:SEED]', 'null' or a"
                " state_dict file"
            )
        return cls("file", path=str(path.resolve()))


def imagenet_unavailable(timeout_s: float = 10.0) -> str | None:
    """Why ``--weights imagenet`` cannot load here, or None when it can: the weights are
    in torch's cache, or their download URL answers within ``timeout_s``."""
    url = ResNet18_Weights.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(url).path).name
    if cached.is_file():
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return None
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors
        reason = getattr(exc, "reason", exc)
        return f"they are not in {cached.parent} and {url} cannot be reached ({reason})"


class NullModel(torch.nn.Module):
    """Fixed logits for every input, whatever it holds: class 0 first, then 1, ... ."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.register_buffer("logits", torch.linspace(1.0, 0.0, classes).unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_buffer("logits").expand(x.shape[0], -1)


def build_model(spec: WeightsSpec) -> tuple[torch.nn.Module, str]:
    """Return the model in eval mode and a string naming its weights exactly."""
    if spec.kind == "null":
        log.warning("using the NULL model: no inference, the same scores for every image")
        return NullModel().eval(), "null"
    if spec.kind == "random":
        log.warning("using RANDOM weights (seed %d): predictions are meaningless", spec.seed)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed)
        model = resnet18(weights=None)
        torch.random.set_rng_state(generator_state)
        identity = f"random:{spec.seed}"
    elif spec.kind == "imagenet":
        try:
            model = resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)
        except Exception as exc:  # urllib/ssl/hash errors differ by platform
            raise ModelLoadError(
                "could not download torchvision's ResNet18 IMAGENET1K_V1 weights "
                f"({type(exc).__name__}: {exc}); pass --weights PATH with a local state_dict, "
                "or --weights random[:SEED] for tests"
            ) from exc
        identity = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    else:
        path = Path(spec.path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = resnet18(weights=None)
            model.load_state_dict(state)
        except Exception as exc:
            raise ModelLoadError(f"cannot load a ResNet18 state_dict from {path}: {exc}") from exc
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        identity = f"file:{path.name}:sha256={digest}"
    model_: torch.nn.Module = model.eval()
    return model_, identity
