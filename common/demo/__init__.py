"""Synthetic demo datasets written in the real layouts and formats (NIfTI, PNG, xlsx, DICOM).

Not used by real training or inference: each bundle's ``configs/demo.json`` points at one of these.
"""
