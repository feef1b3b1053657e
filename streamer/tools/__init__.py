"""Command-line tools around the service: produce images, read predictions, create topics."""
