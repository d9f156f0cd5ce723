"""Model zoo: architectures registered by name, named size presets.

    model = build_model(ModelConfig(name="gateloop", ...), rngs=nnx.Rngs(0))
    model = build_model(preset_config("test", name="transformer"), rngs=nnx.Rngs(0))

Registered names: "gateloop" (data-controlled, the paper), "gateloop_fixed" (input-independent transitions:
S5/LRU/RetNet-like), "gateloop_real" (phase 0), "linear_attention" (a = 1), "transformer" (softmax baseline) and
"hybrid" (GateLoop and attention blocks interleaved by ModelConfig.block_pattern).
The ablations are GateLoop with one config field changed, so their parameters and modes are shared.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from gateloop_jax.layers import CausalSelfAttention, GateLoopMixer
from gateloop_jax.models.config import ModelConfig
from gateloop_jax.models.lm import CausalLM, param_count
from gateloop_jax.models.presets import PRESETS, expected_param_count, preset_config

# name -> (mixer class, or {block kind: mixer class} chosen per layer by config.layer_kinds; config fields the name
# fixes)
MODELS: dict[str, tuple[type | Mapping[str, type], dict[str, Any]]] = {}


def register(name: str, mixer_cls: type | Mapping[str, type], **fixed_fields) -> None:
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered.")
    MODELS[name] = (mixer_cls, fixed_fields)


# "gateloop" honours config.transition; the ablation names pin it, so a registered name alone selects them.
register("gateloop", GateLoopMixer)
register("gateloop_fixed", GateLoopMixer, transition="fixed")
register("gateloop_real", GateLoopMixer, transition="real")
register("linear_attention", GateLoopMixer, transition="none")
register("transformer", CausalSelfAttention)
register("hybrid", {"g": GateLoopMixer, "a": CausalSelfAttention})


def resolve_config(config: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig with the fields its registered name fixes applied (e.g. gateloop_fixed -> transition=fixed)."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_mapping(config)
    if config.name not in MODELS:
        raise ValueError(f"model config: name={config.name!r} is not registered; choose one of {sorted(MODELS)}.")
    _, fixed = MODELS[config.name]
    return config.replace(**fixed) if fixed else config


def build_model(config: ModelConfig | Mapping[str, Any], *, rngs: nnx.Rngs) -> CausalLM:
    config = resolve_config(config)
    mixer_cls, _ = MODELS[config.name]
    if isinstance(mixer_cls, Mapping):
        mixer_cls = [mixer_cls[kind] for kind in config.layer_kinds]
    return CausalLM(config, mixer_cls, rngs=rngs)


__all__ = [
    "MODELS", "PRESETS", "CausalLM", "ModelConfig", "build_model", "expected_param_count", "param_count",
    "preset_config", "register", "resolve_config",
]
