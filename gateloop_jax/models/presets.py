"""Named model sizes and the closed-form parameter count they are checked against."""

from __future__ import annotations

from gateloop_jax.models.config import ModelConfig

# d_model / layers / heads per size. "max_headed" sizes use num_heads = d_model, d_qk = d_v = 1 (the paper's LM).
# block_pattern only matters for name="hybrid": the two-layer sizes interleave "ga" (the default "ggga" tiled to two
# layers would have no attention block); the max-headed sizes cannot hold attention blocks (RoPE needs d_qk >= 2), so a
# hybrid of ~125M is "125m_multihead".
PRESETS: dict[str, dict] = {
    "test": dict(d_model=32, num_layers=2, num_heads=2, vocab_size=64, block_pattern="ga"),
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, block_pattern="ga"),
    "small": dict(d_model=256, num_layers=4, num_heads=4),
    "base": dict(d_model=512, num_layers=8, num_heads=8),
    # ~125M with a 32k vocabulary and tied embeddings, the paper's size (max-headed, as the paper's LM).
    "125m": dict(d_model=768, num_layers=12, num_heads=768, d_qk=1, d_v=1, vocab_size=32000),
    # The same, multi-head (8 heads of 96), the layout the fast chunked kernels target.
    "125m_multihead": dict(d_model=768, num_layers=12, num_heads=8, vocab_size=32000),
    # ~350M: 20 layers of d_model 1024 (a GateLoop layer has 15 d^2 parameters against a Transformer's 12 d^2).
    "350m": dict(d_model=1024, num_layers=20, num_heads=1024, d_qk=1, d_v=1, vocab_size=32000),
}


def preset_config(preset: str, **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"model preset {preset!r} is unknown; choose one of {sorted(PRESETS)}.")
    return ModelConfig.from_mapping({**PRESETS[preset], **overrides})


def expected_param_count(config: ModelConfig) -> int:
    """Parameters of CausalLM(config) in closed form (what the presets advertise; tests check it exactly)."""
    d, h, L, vocab, f = config.d_model, config.num_heads, config.num_layers, config.vocab_size, config.hidden_dim
    dk, dv = config.head_dims
    bias = config.use_bias
    qkv = d * h * (2 * dk + dv) + (h * (2 * dk + dv) if bias else 0)
    out = h * dv * d + (d if bias else 0)
    attention = qkv + out
    gate_params = d * h * dk + h * dk  # one gate projection (weights + bias)
    n_gates = {"data_controlled": 2, "real": 1, "fixed": 0, "none": 0}[config.transition]
    gateloop = qkv + out + n_gates * gate_params
    if config.transition == "fixed":
        gateloop += 2 * h * dk
    if config.output_norm != "none":
        gateloop += 2 * h * dv
    if config.output_gate:
        gateloop += d * h * dv + (h * dv if bias else 0)
    ffn = 2 * d * f + f + d if config.ffn == "gelu" else 3 * d * f
    mixers = sum(attention if kind == "a" else gateloop for kind in config.layer_kinds)
    blocks = mixers + L * (ffn + 2 * 2 * d)  # two LayerNorms per block
    head = 0 if config.tie_embeddings else d * vocab
    return vocab * d + blocks + 2 * d + head
