"""Errors the engine raises while loading a model, in a module of their own so
that every loading step (the hub, conversions, the engine) can raise them
without importing the engine."""


class ModelLoadError(RuntimeError):
    """``MODEL_ID`` names nothing that can be loaded here."""
