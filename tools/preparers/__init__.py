"""``python -m tools prepare <name> ...``: one module per official raw-data layout, each with ``main(...)``."""
