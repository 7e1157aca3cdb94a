"""Metrics computed exactly as the papers' reference scripts compute them."""
