"""Torch modules and functions used by the techniques (no Lightning import)."""

__all__: list[str] = []
