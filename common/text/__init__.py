"""Text encoders and on-disk text-embedding caches."""
