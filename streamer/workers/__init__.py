"""Worker processes and their plumbing: spawn, codec, supervision, shared-memory slots.

What runs inside a worker (decoding, the model) lives in ``streamer.vision``;
the modules here that end in ``_worker`` are the thin ``main`` functions that
connect the two.
"""
