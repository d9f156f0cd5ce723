"""ModelConfig, re-exported where the model zoo's users look for it (defined in gateloop_jax/model_config.py, below
both layers.py and models/, so the layers import it without reaching up into models/)."""

from gateloop_jax.model_config import _CHOICES, ModelConfig  # noqa: F401
