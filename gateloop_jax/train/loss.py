"""The language-model loss as sums over scored tokens: plain (from logits) or chunked over the sequence.

Plain: logits = head(hidden) (b, t, V) float32, then the masked cross-entropy. Its memory is b*t*V*4 bytes, and as
much again for the logits' gradient (32k vocabulary, t=2048, b=16: 4 GiB each).

Chunked: the sequence is cut into chunks of c positions and a lax.scan applies final norm + head + cross-entropy to one
(b, c, d) chunk at a time under jax.checkpoint. The forward keeps only the per-chunk sums; the backward recomputes a
chunk's logits when it reaches it, so at most (b, c, V) float32 logits (and their gradient) are live at once. The price
is the head's matrix product once more in the backward (2 b t d V FLOPs). Chunking the sequence, not the flattened
batch x length, keeps every chunk split over the data-parallel batch shards.

Shapes: b batch, t length, d d_model, V vocabulary, c chunk length.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

STATS = ("nll", "correct", "count")


def token_stats(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Summed NLL, correct predictions and scored tokens over mask; logits (b, t, V) float32."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return {"nll": jnp.sum(nll * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def chunk_size_for(loss_chunk_size: int, chunked_loss_min_vocab: int, vocab_size: int) -> int:
    """The chunk length the trainer uses: loss_chunk_size when the vocabulary has >= chunked_loss_min_vocab entries,
    else 0 (the plain loss). Below the threshold the logits are small and one matmul is faster than a scan."""
    if loss_chunk_size < 0 or chunked_loss_min_vocab < 0:
        raise ValueError(f"loss_chunk_size={loss_chunk_size} and chunked_loss_min_vocab={chunked_loss_min_vocab} "
                         "must be >= 0 (loss_chunk_size 0 = always the plain loss).")
    return loss_chunk_size if vocab_size >= chunked_loss_min_vocab else 0


def chunked_token_stats(head: Callable[[Any, jax.Array], jax.Array], head_params: Any, hidden: jax.Array,
                        targets: jax.Array, mask: jax.Array, *, chunk_size: int) -> dict[str, jax.Array]:
    """token_stats(head(head_params, hidden), targets, mask) without holding the (b, t, V) logits.

    Args:
      head: pure function (head_params, x (b, c, d)) -> logits (b, c, V) float32, applied position-wise.
      head_params: the pytree head differentiates with respect to.
      hidden: (b, t, d) the residual stream after the last block.
      targets: (b, t) int; mask: (b, t) float, 1 on scored tokens.
      chunk_size: c, positions per chunk; t is padded (mask 0) to a multiple of it.

    Returns: {"nll", "correct", "count"} sums, float32 scalars.
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_token_stats: chunk_size={chunk_size} must be >= 1.")
    b, t = targets.shape
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def chunks(x):  # (b, n*c, ...) -> (n, b, c, ...)
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_stats(params, x, tgt, m):
        return token_stats(head(params, x), tgt, m.astype(jnp.float32))

    def body(totals, xs):
        stats = chunk_stats(head_params, *xs)
        return {k: totals[k] + stats[k] for k in STATS}, None

    zeros = {k: jnp.zeros((), jnp.float32) for k in STATS}
    totals, _ = jax.lax.scan(body, zeros, (chunks(hidden), chunks(targets), chunks(mask)))
    return totals


def model_token_stats(model: nnx.Module, tokens: jax.Array, targets: jax.Array, mask: jax.Array, *,
                      chunk_size: int = 0, **call_kwargs) -> dict[str, jax.Array]:
    """token_stats of a CausalLM on (tokens, targets, mask), all (b, t); chunk_size 0 = plain, else chunked.

    call_kwargs go to the model (mode, deterministic, ...)."""
    if not chunk_size:
        return token_stats(model(tokens, **call_kwargs), targets, mask)
    hidden = model.hidden_states(tokens, **call_kwargs)
    # The head runs inside jax.checkpoint and lax.scan: as a pure function of the model's state (merged afresh there),
    # not a method of a module closed over from the outer trace (nnx would see a Variable cross trace levels).
    graphdef, state = nnx.split(model)
    return chunked_token_stats(lambda s, x: nnx.merge(graphdef, s).head_logits(x), state, hidden, targets, mask,
                               chunk_size=chunk_size)
