"""Shared logic of the fragile-watermarking suite; the top-level scripts stay thin."""
