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

import jax
from flax import nnx

from gateloop_jax.layers import CausalSelfAttention, GateLoopMixer
from gateloop_jax.models.config import ModelConfig
from gateloop_jax.models.lm import CausalLM, param_count
from gateloop_jax.models.presets import PRESETS, expected_param_count, preset_config
from gateloop_jax.ops import gla_rotation, pallas_mosaic_gpu

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
    for field, value in fixed.items():
        given = getattr(config, field)
        # The field's default means "whatever the name fixes"; any other value contradicts the name.
        if given != value and given != ModelConfig.__dataclass_fields__[field].default:
            raise ValueError(f"model config: name={config.name!r} fixes {field}={value!r}, but {field}={given!r} was "
                             f"given; use name='gateloop' with {field}={given!r}, or leave {field} at its default.")
    return config.replace(**fixed) if fixed else config


def platform_problems(config: ModelConfig, platform: str | None = None) -> dict[str, str]:
    """{field: why it cannot run on this platform} for the settings bound to other hardware (empty if none)."""
    platform = platform or jax.default_backend()
    mixer_cls, _ = MODELS[config.name]
    problems = {}
    if mixer_cls is CausalSelfAttention and config.attention_impl == "cudnn" and platform != "gpu":
        problems["attention_impl"] = (f"attention_impl='cudnn' needs an NVIDIA GPU, this is {platform}; use "
                                      "attention_impl='auto' (cuDNN where it applies, else XLA) or 'xla'")
    if mixer_cls is GateLoopMixer and config.mode == "gla_rotation":
        d_qk, d_v = config.head_dims
        reason = gla_rotation.unsupported_reason((1, 1, config.num_heads, d_qk), (1, 1, config.num_heads, d_v),
                                                 config.dtype, platform)
        if reason:
            problems["mode"] = f"mode='gla_rotation' cannot run here: {reason}"
    if mixer_cls is GateLoopMixer and config.mode == "mosaic_gpu" and pallas_mosaic_gpu.unavailable_reason():
        problems["mode"] = f"{pallas_mosaic_gpu.unavailable_reason()}; use mode='pallas' or 'chunked' here"
    return problems


def check_platform(config: ModelConfig, platform: str | None = None) -> None:
    """A ValueError naming the field, if a setting cannot run on this platform (the trainer checks before compiling)."""
    problems = platform_problems(config, platform)
    if problems:
        raise ValueError("model config: " + "; ".join(problems.values()) + ".")


def portable_config(config: ModelConfig, platform: str | None = None) -> ModelConfig:
    """config with the settings this platform cannot run set to "auto" (the same function, computed another way):
    a checkpoint trained with a GPU-only kernel still loads and runs on a CPU."""
    problems = platform_problems(config, platform)
    return config.replace(**{field: "auto" for field in problems}) if problems else config


def build_model(config: ModelConfig | Mapping[str, Any], *, rngs: nnx.Rngs) -> CausalLM:
    config = resolve_config(config)
    mixer_cls, _ = MODELS[config.name]
    if isinstance(mixer_cls, Mapping):
        mixer_cls = [mixer_cls[kind] for kind in config.layer_kinds]
    return CausalLM(config, mixer_cls, rngs=rngs)


__all__ = [
    "MODELS", "PRESETS", "CausalLM", "ModelConfig", "build_model", "check_platform", "expected_param_count",
    "param_count", "platform_problems", "portable_config", "preset_config", "register", "resolve_config",
]
