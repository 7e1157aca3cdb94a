"""Converters from official / released checkpoint layouts: ``python -m tools convert NAME SRC DST``."""
