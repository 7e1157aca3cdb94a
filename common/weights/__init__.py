"""Loaders that map official / released checkpoints onto our networks."""
