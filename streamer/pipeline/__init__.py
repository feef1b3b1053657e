"""The record pipeline on the event loop: batching and per-record stages."""
