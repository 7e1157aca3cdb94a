"""Command-line tools for the bundle collection: ``python -m tools <command> ...``."""
