"""ModelConfig, re-exported: it lives in gateloop_jax/config.py, below both layers.py and models/ in the layering."""

from gateloop_jax.config import _CHOICES, ModelConfig  # noqa: F401

__all__ = ["ModelConfig"]
