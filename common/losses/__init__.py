"""Losses the papers define (one module per paper)."""
