"""The causal language model shell shared by every architecture: embedding, blocks, final norm, tied/untied head.

The token mixer (GateLoop or softmax attention, or per layer for a hybrid stack) is the only difference between
architectures; the computation mode of GateLoop is an argument, not a different model.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gateloop_jax.layers import Block, _dtype
from gateloop_jax.models.config import ModelConfig
from gateloop_jax.sharding import BATCH, EMBED, LENGTH, VOCAB, constrain


def _remat_block(block, x, **kwargs):
    """block(x, **kwargs) with its activations recomputed in the backward pass (jax.checkpoint of a pure function).

    The block is split into (graphdef, state) and merged again inside the checkpointed function; its state is not
    written back, which is exact because a block without dropout mutates nothing in its forward pass (ModelConfig
    rejects remat together with dropout). nnx.remat raised a TraceContextError here when the model itself was merged
    inside an outer jit + grad, as in the train step.
    """
    graphdef, state = nnx.split(block)

    def run(state, x):
        return nnx.merge(graphdef, state)(x, **kwargs)

    return jax.checkpoint(run)(state, x)


class CausalLM(nnx.Module):
    """tokens (b, t) int -> logits (b, t, V) float32.

    mixer_cls: the token mixer of every block, or a sequence of num_layers of them (a hybrid stack).
    segment_ids (b, t) int, optional on the forward and the prefill, packs documents into a row: each segment gives
    the logits it would give alone (layers.py); without it the row is one sequence.
    """

    def __init__(self, config: ModelConfig, mixer_cls: type | Sequence[type], *, rngs: nnx.Rngs):
        config.validate()
        mixers = list(mixer_cls) if isinstance(mixer_cls, (list, tuple)) else [mixer_cls] * config.num_layers
        if len(mixers) != config.num_layers:
            raise ValueError(f"CausalLM: {len(mixers)} mixer classes for num_layers={config.num_layers}.")
        self.config = config
        kw = dict(dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype), rngs=rngs)
        self.embed = nnx.Embed(
            config.vocab_size, config.d_model,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(stddev=config.embedding_init_std),
                                                (VOCAB, EMBED)), **kw)
        self.blocks = nnx.List([Block(config, mixer, rngs=rngs) for mixer in mixers])
        self.final_norm = nnx.LayerNorm(config.d_model, **kw)
        self.head = nnx.data(None)
        if not config.tie_embeddings:
            self.head = nnx.Linear(
                config.d_model, config.vocab_size, use_bias=False,
                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (EMBED, VOCAB)), **kw)

    def _embed(self, tokens):
        x = self.embed(tokens)
        # Unit-variance embeddings enter the residual stream as they are; the tied head scales by d_model^-1/2 instead.
        return constrain(x, (BATCH, LENGTH, None))

    def head_logits(self, x):
        """Final norm and output head: residual stream (..., d) -> logits (..., V) float32 (per position, so the loss
        may apply it to chunks of the sequence)."""
        x = self.final_norm(x)
        if self.head is None:
            logits = self.embed.attend(x) * (self.config.d_model ** -0.5)
        else:
            logits = self.head(x)
        return constrain(logits.astype(jnp.float32), (BATCH, LENGTH, VOCAB))

    def hidden_states(self, tokens, *, mask=None, mode=None, deterministic=True, segment_ids=None):
        """tokens (b, t) int -> the residual stream after the last block (b, t, d), before the final norm and head;
        head_logits(hidden_states(tokens)) == self(tokens)."""
        _check_segment_ids(tokens, segment_ids)
        x = self._embed(tokens)
        for block in self.blocks:
            kw = dict(mask=mask, mode=mode, deterministic=deterministic, segment_ids=segment_ids)
            x = _remat_block(block, x, **kw) if self.config.remat else block(x, **kw)
        return x

    def __call__(self, tokens, *, mask=None, mode=None, deterministic=True, segment_ids=None):
        return self.head_logits(self.hidden_states(tokens, mask=mask, mode=mode, deterministic=deterministic,
                                                   segment_ids=segment_ids))

    # -- decoding --------------------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int | None = None):
        return [block.mixer.init_cache(batch_size, max_len) for block in self.blocks]

    def prefill(self, tokens, *, mask=None, mode=None, max_len=None, segment_ids=None):
        """Parallel forward over a prompt that also returns the decode cache. tokens, mask, segment_ids: (b, t).

        With segment_ids, decoding continues the segment of each row's last real token.
        """
        _check_segment_ids(tokens, segment_ids)
        if segment_ids is not None and mask is not None:
            # Right padding joins its row's last real segment: an id of its own would start a segment there, and the
            # recurrent state that decoding continues would be that (empty) segment's.
            last = jnp.take_along_axis(segment_ids, jnp.maximum(mask.sum(-1) - 1, 0)[:, None], axis=1)
            segment_ids = jnp.where(mask, segment_ids, last)
        x = self._embed(tokens)
        cache = []
        for block in self.blocks:
            x, layer_cache = block.prefill(x, mask=mask, mode=mode, max_len=max_len, segment_ids=segment_ids)
            cache.append(layer_cache)
        return self.head_logits(x), cache

    def decode_step(self, token, cache):
        """token (b,) int -> (logits (b, V) float32, new cache)."""
        x = self._embed(token[:, None])[:, 0]
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x, layer_cache = block.step(x, layer_cache)
            new_cache.append(layer_cache)
        return self.head_logits(x[:, None])[:, 0], new_cache

    def transitions(self, tokens):
        """Per GateLoop layer (log|a|, arg a), each (b, t, h, k) float32, for inspection (other layers are skipped)."""
        x = self._embed(tokens)
        out = []
        for block in self.blocks:
            if hasattr(block.mixer, "transition"):
                mixer_in = block.mixer_norm(x) if self.config.norm_position == "pre" else x
                out.append(block.mixer.transition(mixer_in))
            x = block(x)
        return out


def _check_segment_ids(tokens, segment_ids) -> None:
    if segment_ids is not None and tuple(segment_ids.shape) != tuple(tokens.shape):
        raise ValueError(f"CausalLM: segment_ids has shape {tuple(segment_ids.shape)}, expected the tokens' shape "
                         f"{tuple(tokens.shape)} (batch, length): one segment id per token.")
    if segment_ids is not None and not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"CausalLM: segment_ids must be integers, got dtype {segment_ids.dtype}.")


def param_count(module: nnx.Module) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
