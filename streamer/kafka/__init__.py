"""Kafka clients: intake (consumer), publisher (producer), offset tracking."""
