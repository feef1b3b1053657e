"""Worker processes: shared-memory slots, decoding, inference, and their supervision."""
