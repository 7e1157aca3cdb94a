"""Network definitions the papers add on top of MONAI (one module per paper)."""
