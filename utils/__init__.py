"""Shared helpers: typed configs, cameras, checkpoints."""
