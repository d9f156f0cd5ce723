"""ModelConfig: every architectural choice as a field with a documented default; validated before any compute.

Where the GateLoop paper is silent (norm position, initialisation, output norm, tied embeddings, activations) the
default is stated next to the field and the alternatives are selectable (spec section 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gateloop_jax.ops.common import KERNEL_MODES, MODES

_CHOICES = {
    "mode": ("auto",) + MODES + KERNEL_MODES,
    "transition": ("data_controlled", "fixed", "real", "none"),
    "magnitude_activation": ("sigmoid", "sigmoid_tempered", "lru_exp"),
    "phase_activation": ("identity", "tanh_pi"),
    "phase_coupling": ("free", "decay"),
    "output_norm": ("none", "layernorm", "groupnorm"),
    "init": ("slow_forget", "lru_ring", "default"),
    "ffn": ("gelu", "swiglu"),
    "norm_position": ("pre", "post"),
    "dtype": ("float32", "bfloat16"),
    "param_dtype": ("float32", "bfloat16"),
    "attention_impl": ("auto", "xla", "cudnn"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Registry name of the architecture (gateloop_jax.models.MODELS).
    name: str = "gateloop"
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 2
    # Heads of the token mixer. Max-headed GateLoop (the paper's LM) is num_heads = d_model with d_qk = d_v = 1.
    num_heads: int = 4
    # Per-head query/key and value widths; None = d_model // num_heads.
    d_qk: int | None = None
    d_v: int | None = None
    # Feed-forward hidden width; None = 4 * d_model.
    mlp_dim: int | None = None
    # "gelu" (the paper's point-wise FFN) or "swiglu".
    ffn: str = "gelu"
    # "pre": LayerNorm before each sub-layer (stable at depth; our default), "post": after the residual sum.
    norm_position: str = "pre"
    dropout_rate: float = 0.0
    # Share the embedding matrix with the output head.
    tie_embeddings: bool = True
    # Standard deviation of the token embeddings at initialisation.
    embedding_init_std: float = 1.0
    # --- GateLoop mixer ---
    # How the recurrence is computed: one set of parameters, several modes (ops.gateloop).
    mode: str = "auto"
    # Chunk length of the modes that chunk ("chunked", and "pallas" multi-head); None = the op's default. Ignored
    # wherever the mode that runs does not chunk: "scan", "recurrent", "attention", "auto" where it resolves to one
    # of them (max-headed off GPU), and the configs' CPU sizes that turn "auto" into "recurrent" (every test size,
    # memory_horizon's runlocal).
    chunk_size: int | None = None
    # "data_controlled" (GateLoop), "fixed" (a per channel, input independent: S5/LRU/RetNet-like ablation),
    # "real" (data-controlled magnitude, phase 0), "none" (a = 1: linear attention).
    transition: str = "data_controlled"
    # |a| = f(gamma): "sigmoid" (paper), "sigmoid_tempered" sigmoid(gamma)^(1/magnitude_temperature) (GLA-style),
    # "lru_exp" exp(-exp(gamma)) (LRU-style).
    magnitude_activation: str = "sigmoid"
    magnitude_temperature: float = 16.0
    # arg a = g(theta): "identity" (paper) or "tanh_pi" pi * tanh(theta), bounded to (-pi, pi).
    phase_activation: str = "identity"
    # How arg a relates to |a|. "free" (the paper): arg a = g(theta), independent of |a|. "decay": arg a =
    # g(theta) * (-log|a|), so g(theta) is the angle turned per unit of forgetting (the complex S4D / Mamba
    # discretisation a = exp(delta * (-alpha + i omega)), delta data-controlled): a token that keeps the state
    # (|a| -> 1) turns it by nothing, and a memory that has decayed by a factor e^-D has turned by at most
    # max|g(theta)| * D, so a channel that learns to hold a key across a gap also stops turning it.
    phase_coupling: str = "free"
    # Norm on the recurrence output before the gate: "none", "layernorm" (over heads * d_v), "groupnorm" (per head).
    output_norm: str = "layernorm"
    # y * SiLU(W_g x) before the output projection (spec section 1).
    output_gate: bool = True
    # Transition initialisation. "slow_forget" (default): |a| log-uniform in [init_min_magnitude, init_max_magnitude]
    # through the gate bias, phases uniform in [0, init_max_phase], small data-dependent weights, so the model starts
    # remembering long. "lru_ring": the LRU ring init (|a|^2 uniform in the same range, phases uniform in
    # [0, 2 pi]). "default": plain Lecun-normal weights and zero biases (|a| around 0.5, fast forgetting).
    init: str = "slow_forget"
    init_min_magnitude: float = 0.9
    init_max_magnitude: float = 0.999
    init_max_phase: float = 0.1
    # Fraction of each head's d_qk channels whose transition has a phase; the others are real (arg a = 0 exactly, as
    # GPT-NeoX's partial rotary leaves channels unrotated). Between a key and its query the state turns by the sum of
    # the phases in between, a rotation that grows with the distance; real channels can match a key to its query at
    # any distance, which associative recall needs (experiments/README.md, MQAR). 1.0 = every channel (the paper).
    phase_fraction: float = 1.0
    # Scale of the gradient that the phase projection sends back into the mixer's input (1 = plain backpropagation,
    # 0 = none; the projection's own weights learn either way). The phase at position m turns every later readout of
    # every earlier key, so its gradient sums O(t^2) terms and grows with the length: at t = 256 it is ~85% of the
    # embeddings' gradient at initialisation, against ~17% at t = 64 (experiments/README.md, MQAR), and it drowns the
    # signal the rest of the model learns from under Adam's normalisation.
    phase_input_grad: float = 1.0
    # Biases on the q, k, v, gate and output projections (the gate projections always have one).
    use_bias: bool = False
    # A causal depthwise convolution of this many taps on q, k and v, followed by SiLU (0 = none, the paper's layer).
    # It lets a token see its few predecessors before the recurrence: the "token shift" that associative recall
    # needs (bind each value to the key just before it), which the recurrence alone learns only slowly. The recurrent
    # models in Zoology (Arora et al. 2023) and fla's GLA / Mamba carry one, with 3-4 taps.
    short_conv_size: int = 0
    # --- Transformer baseline ---
    rope_base: float = 10000.0
    # Fraction of each head's d_qk channels that RoPE rotates (rounded down to an even count); the others carry no
    # position, as in GPT-NeoX (rotary_pct). Rotated channels match a key to a query only near the distance their
    # frequency allows; unrotated ones match at any distance (experiments/README.md, MQAR). 1.0 = every channel.
    rope_fraction: float = 1.0
    # jax.nn.dot_product_attention implementation: "auto" picks cuDNN on GPU when it applies, else XLA.
    attention_impl: str = "auto"
    # --- Hybrid stack (name="hybrid") ---
    # Block kinds, a string over {g, a} tiled to num_layers: g = GateLoop block, a = attention block (RoPE, so d_qk
    # must be even). Default "ggga": one attention block after every three GateLoop blocks (Griffin / Jamba-like
    # ratios); with num_layers=2 write e.g. "ga", since "ggga" tiled to 2 layers has no attention block.
    block_pattern: str = "ggga"
    # --- Numerics and memory ---
    # Activation dtype; parameters stay param_dtype and the recurrence always accumulates in float32/complex64.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Rematerialise each block in the backward pass (trades compute for activation memory).
    remat: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Build from a dict / ConfigDict; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {unknown}; known fields are {sorted(known)}.")
        config = cls(**dict(values))
        config.validate()
        return config

    @property
    def head_dims(self) -> tuple[int, int]:
        d_qk = self.d_qk if self.d_qk is not None else self.d_model // self.num_heads
        d_v = self.d_v if self.d_v is not None else self.d_model // self.num_heads
        return d_qk, d_v

    @property
    def layer_kinds(self) -> str:
        """The block kind of each layer, one character per layer: "g" GateLoop, "a" attention."""
        if self.name == "transformer":
            return "a" * self.num_layers
        if self.name == "hybrid":
            return (self.block_pattern * self.num_layers)[:self.num_layers]
        return "g" * self.num_layers

    @property
    def phased_channels(self) -> int:
        """How many of each head's d_qk channels have a phase (the first ones); the rest are real."""
        return round(self.phase_fraction * self.head_dims[0])

    @property
    def rotary_channels(self) -> int:
        """How many of each head's d_qk channels RoPE rotates (the first ones, an even count)."""
        return 2 * int(self.rope_fraction * self.head_dims[0] / 2)

    @property
    def hidden_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.d_model

    def validate(self) -> None:
        for field, choices in _CHOICES.items():
            value = getattr(self, field)
            if value not in choices:
                raise ValueError(f"model config: {field}={value!r} is not one of {choices}.")
        for field in ("vocab_size", "d_model", "num_layers", "num_heads", "d_qk", "d_v", "mlp_dim", "chunk_size"):
            value = getattr(self, field)
            if value is not None and value < 1:
                raise ValueError(f"model config: {field} must be >= 1, got {value}.")
        if (self.d_qk is None or self.d_v is None) and self.d_model % self.num_heads:
            raise ValueError(
                f"model config: d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "set d_qk and d_v explicitly or choose num_heads dividing d_model."
            )
        if not 0.0 < self.init_min_magnitude <= self.init_max_magnitude < 1.0:
            raise ValueError(
                "model config: need 0 < init_min_magnitude <= init_max_magnitude < 1, got "
                f"{self.init_min_magnitude}, {self.init_max_magnitude}."
            )
        if self.output_norm == "groupnorm" and self.head_dims[1] == 1:
            raise ValueError(
                "model config: output_norm='groupnorm' normalises each head over d_v, which is 1 here "
                "(max-headed); use output_norm='layernorm' or 'none'."
            )
        if not 0.0 <= self.phase_fraction <= 1.0:
            raise ValueError(f"model config: phase_fraction must be in [0, 1], got {self.phase_fraction}.")
        if not 0.0 <= self.phase_input_grad <= 1.0:
            raise ValueError(f"model config: phase_input_grad must be in [0, 1], got {self.phase_input_grad}.")
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ValueError(f"model config: rope_fraction must be in [0, 1], got {self.rope_fraction}.")
        if self.short_conv_size < 0:
            raise ValueError(f"model config: short_conv_size must be >= 0 (0 = no convolution), got "
                             f"{self.short_conv_size}.")
        if self.embedding_init_std <= 0.0:
            raise ValueError(f"model config: embedding_init_std must be > 0, got {self.embedding_init_std}.")
        if not self.block_pattern or set(self.block_pattern) - {"g", "a"}:
            raise ValueError(f"model config: block_pattern={self.block_pattern!r} must be a non-empty string over "
                             "'g' (GateLoop block) and 'a' (attention block), e.g. 'ggga'.")
        if self.name == "hybrid" and len(set(self.layer_kinds)) < 2:
            raise ValueError(
                f"model config: block_pattern={self.block_pattern!r} tiled to num_layers={self.num_layers} is "
                f"{self.layer_kinds!r}, a stack of one kind; give the hybrid both 'g' and 'a' within its layers "
                "(e.g. block_pattern='ga'), or use name='gateloop' / 'transformer'.")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"model config: dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        if self.remat and self.dropout_rate > 0.0:
            raise ValueError(
                f"model config: remat=True with dropout_rate={self.dropout_rate} is not supported (the rematerialised "
                "block would replay its dropout RNG without advancing it); set dropout_rate=0 or remat=False."
            )

    def replace(self, **changes) -> "ModelConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config
