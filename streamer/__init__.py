"""streamer: a Kafka-native image classification service (ResNet18 on worker processes)."""

__version__ = "0.1.0"
