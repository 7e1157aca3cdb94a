"""Dataset readers for the official layouts and synthetic demo-data generators."""
