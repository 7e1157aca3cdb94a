"""Shared networks, losses, data readers, text encoders and engine helpers for the bundle collection.

Every bundle imports this package through ``_target_`` paths; release zips vendor a copy of it, so
all bundles served together (e.g. by MONAI Label) must ship the same ``__version__``.
"""

__version__ = "0.1.0"
