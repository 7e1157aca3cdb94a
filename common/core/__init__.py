"""The bottom layer: helpers every other part of ``common`` may import; it imports nothing of ours.

``io`` (atomic saves), ``distributed`` (rank queries), ``taxonomy`` (class names), ``spacing`` (anisotropy).
"""
