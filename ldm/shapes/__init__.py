"""The shapes world: the embedded dataset, its style set and their judges (see ldm/README.md)."""
