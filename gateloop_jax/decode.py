"""Autoregressive generation: a parallel prefill of the prompt, then one token at a time from the decode cache.

    model, config, tokenizer = gateloop_jax.load("workdirs/memory_horizon")
    tokens = gateloop_jax.generate(model, [[3, 4, 11], [1, 10, 2, 5, 11]], 4, temperature=0)   # (2, 4) int32

Shape legend: b batch, t prompt length (the longest prompt), n max_new_tokens, V vocab.

The cache is whatever the model's mixers keep (CausalLM.prefill / decode_step): GateLoop's (b, h, k, v) complex
state per layer, O(1) in the length, or the Transformer's KV cache of max_len = t + n positions; a hybrid keeps each
kind for its own layers.

The loop is a Python loop over one jitted step (decode the previous token, then sample the next), not a
lax.while_loop: it lets `callback` stream tokens as they are produced, and the extra cost is one dispatch per token
(microseconds; jax dispatches asynchronously, so without a callback the host never waits on the device inside the
loop). The step is compiled once per (model structure, batch size, sampling settings) and reused across calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gateloop_jax.sharding import DEFAULT_RULES


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How a token is drawn from logits. Static under jit (hashable): each distinct setting compiles once.

    temperature: 0 = greedy (argmax); else logits / temperature.
    top_k: keep the k most likely tokens (None = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (nucleus; None = all).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"generate: temperature={self.temperature} must be >= 0 (0 = greedy).")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"generate: top_k={self.top_k} must be >= 1 or None.")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generate: top_p={self.top_p} must be in (0, 1] or None.")

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits (b, V) float32 -> tokens (b,) int32."""
        if self.temperature == 0 or self.top_k == 1:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits = logits.astype(jnp.float32) / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = jax.lax.top_k(logits, self.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p is not None and self.top_p < 1:
            sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
            # Probability mass strictly before each sorted token: a token is kept while the mass of the more likely
            # ones is still below top_p, so the most likely token is always kept.
            before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) - jax.nn.softmax(sorted_logits, -1)
            kept = jnp.where(before < self.top_p, sorted_logits, jnp.inf)
            threshold = jnp.min(kept, axis=-1, keepdims=True)
            logits = jnp.where(logits < threshold, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def pad_prompts(prompt, prompt_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (b, t) int32, mask (b, t) bool) from a (b, t) array [+ mask] or a list of token-id lists.

    Prompts of different lengths are right padded (with token 0, masked out); every prompt needs >= 1 token.
    """
    if isinstance(prompt, (list, tuple)) and (len(prompt) == 0 or not np.isscalar(prompt[0])):
        if prompt_mask is not None:
            raise ValueError("generate: prompt_mask is only for a padded (b, t) array prompt, not a list of lists.")
        rows = [np.asarray(row, np.int32).reshape(-1) for row in prompt]
        if not rows:
            raise ValueError("generate: the prompt list is empty.")
        t = max(len(row) for row in rows)
        tokens = np.zeros((len(rows), t), np.int32)
        mask = np.zeros((len(rows), t), bool)
        for i, row in enumerate(rows):
            tokens[i, :len(row)], mask[i, :len(row)] = row, True
    else:
        tokens = np.asarray(prompt).astype(np.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(f"generate: prompt must be (b, t) or a list of lists, got shape {tokens.shape}.")
        mask = (np.ones(tokens.shape, bool) if prompt_mask is None
                else np.asarray(prompt_mask, bool).reshape(tokens.shape))
    lengths = mask.sum(-1)
    if np.any(lengths == 0):
        raise ValueError(
            f"generate: every prompt needs at least one token; rows {np.flatnonzero(lengths == 0)} are empty.")
    if not np.array_equal(mask, np.arange(mask.shape[1])[None] < lengths[:, None]):
        raise ValueError("generate: prompt_mask must mark a prefix of each row (right padding).")
    return tokens, mask


@contextlib.contextmanager
def _mesh_context(mesh):
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        yield


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "max_len", "sampler"))
def _prefill(graphdef, state, tokens, mask, key, *, mode, max_len, sampler):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(tokens, mask=mask, mode=mode, max_len=max_len)
    # The logits after each row's own last real token (rows are right padded).
    last = logits[jnp.arange(tokens.shape[0]), mask.sum(-1) - 1]
    return sampler(last, key), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler"), donate_argnames=("cache",))
def _step(graphdef, state, token, cache, key, *, sampler):
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode_step(token, cache)
    return sampler(logits, key), cache


def generate(
    model: nnx.Module,
    prompt,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    prompt_mask=None,
    callback: Callable[[int, np.ndarray], None] | None = None,
    mode: str | None = "auto",
    mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
    """Sample max_new_tokens tokens after each prompt.

    Args:
      model: a CausalLM (GateLoop or Transformer), e.g. from gateloop_jax.load.
      prompt: (b, t) int array (right padded, with prompt_mask) or a list of b token-id lists of any lengths.
      max_new_tokens: n, tokens generated per row.
      temperature: 0 = greedy decoding (argmax), else the softmax temperature.
      top_k, top_p: keep only the k most likely tokens / the nucleus of probability top_p (None = off); both may be
        combined (top-k first).
      seed: the sampling key; the same seed gives the same tokens.
      prompt_mask: (b, t) bool, True on real prompt tokens (a prefix of each row); None = all real.
      callback: callback(step, tokens) with tokens (b,) int NumPy after each generated position, step = 0..n-1
        (streaming). It forces a device->host copy per token.
      mode: GateLoop computation mode of the prefill. The default "auto" picks a parallel one (scan/pallas
        max-headed, chunked multi-head) whatever mode the model trained with; None = the model's configured mode.
        Decoding is always the O(1) recurrent step.
      mesh: run the prefill over this mesh (gateloop_jax.sharding.make_mesh) with the default logical axis rules;
        with a "sequence" axis of size n > 1 the prompt is split into n contiguous shards (context parallelism; the
        prompt is right padded to a multiple of n, masked out) and decoding continues from the last shard's state.
        The decode steps run outside the mesh, on the prefill's cache as it is placed.

    Returns:
      tokens (b, n) int32: the generated continuation of each row (row i continues after its own last prompt token).
    """
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1.")
    sampler = Sampler(float(temperature), top_k, top_p)
    if sampler.temperature == 0 or sampler.top_k == 1:
        sampler = Sampler(0.0)  # Every greedy setting shares one compiled program.
    tokens, mask = pad_prompts(prompt, prompt_mask)
    prefill_context = contextlib.nullcontext()
    if mesh is not None:
        # Padding is masked out (identity steps for GateLoop, never attended to under the causal mask), so it only
        # makes the length divisible by the sequence axis.
        pad = -tokens.shape[1] % mesh.shape.get("sequence", 1)
        tokens, mask = np.pad(tokens, ((0, 0), (0, pad))), np.pad(mask, ((0, 0), (0, pad)))
        prefill_context = _mesh_context(mesh)
    # The KV cache (Transformer) has a fixed size: the padded prompt plus every new token; GateLoop ignores it.
    max_len = tokens.shape[1] + max_new_tokens
    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(seed), max_new_tokens)
    with prefill_context:
        token, cache = _prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), keys[0], mode=mode,
                                max_len=max_len, sampler=sampler)
    out = [token]
    if callback is not None:
        callback(0, np.asarray(token))
    for i in range(1, max_new_tokens):
        token, cache = _step(graphdef, state, token, cache, keys[i], sampler=sampler)
        out.append(token)
        if callback is not None:
            callback(i, np.asarray(token))
    return jnp.stack(out, axis=1)


def generate_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, **kwargs) -> list[str]:
    """Text in, text out through a SentencePiece tokenizer (WikiText models); kwargs go to generate."""
    ids = [tokenizer.encode(p) for p in prompts]
    out = np.asarray(generate(model, ids, max_new_tokens, **kwargs))
    return [tokenizer.decode(row.tolist()) for row in out]


__all__ = ["Sampler", "generate", "generate_text", "pad_prompts"]
