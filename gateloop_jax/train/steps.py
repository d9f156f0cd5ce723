"""Train state and the pure train/eval steps.

The model is split once into (graphdef, params, rest): `params` (the nnx.Param values as a nested dict, float32) and
the optimiser state are the only things that change; `graphdef` is static and `rest` (the dropout stream's RNG
variables) is a constant input. Dropout keys are fold_in(seed key, step), so the randomness of step n is a function
of n alone and a resumed run needs nothing but the step to continue the same stream.

Loss: masked cross-entropy, summed over the global batch and divided by the number of scored tokens of the global
batch (not averaged per micro-batch), so gradient accumulation and any data-parallel split give the same gradient.
With loss_chunk_size > 0 the head and cross-entropy run over sequence chunks (train/loss.py), never holding the
(b, t, V) float32 logits.

Shapes: b batch, t length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gateloop_jax.train.loss import model_token_stats, token_stats  # noqa: F401 - token_stats is re-exported

# {"inputs": (b, t) int32, "targets": (b, t) int32, "mask": (b, t) float32} and optionally "segment_ids": (b, t) int32
# (packed documents: each segment is modelled as if alone, see CausalLM).
Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # () int32: optimizer steps taken so far
    params: Any  # nested dict of float32 arrays (nnx.to_pure_dict of the Param state)
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """What is needed to rebuild the nnx model from a params dict inside a traced function."""

    graphdef: Any
    template: Any  # the nnx.State of Params (values unused; only its Variables' structure and metadata)
    rest: Any  # non-Param state (RNG streams); constant

    @classmethod
    def split(cls, model: nnx.Module) -> tuple["ModelParts", Any]:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(graphdef, params, rest), nnx.to_pure_dict(params)

    def merge(self, params, key: jax.Array | None = None) -> nnx.Module:
        """The model with `params`; with `key`, every RNG stream restarts from it (what nnx.reseed does, done on the
        state before merging because Variables cannot be mutated across jax.grad's trace)."""
        state = jax.tree.map(lambda x: x, self.template)  # fresh Variables; the template is never mutated
        nnx.replace_by_pure_dict(state, params)
        rest = self.rest
        if key is not None:
            rest = jax.tree.map(lambda x: key if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                                else jnp.zeros_like(x), rest)
        return nnx.merge(self.graphdef, state, rest)


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum_steps: int, seed: int, mode: str | None = None,
                    loss_chunk_size: int = 0) -> Callable:
    """train_step(state, batch) -> (state, metrics); pure, to be jitted once by the trainer."""

    def micro_grads(params, micro: Batch, key):
        def loss_fn(p):
            model = parts.merge(p, key)
            stats = model_token_stats(model, micro["inputs"], micro["targets"], micro["mask"],
                                      chunk_size=loss_chunk_size, mode=mode, deterministic=False,
                                      segment_ids=micro.get("segment_ids"))
            return stats["nll"], stats

        return jax.grad(loss_fn, has_aux=True)(params)

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        if grad_accum_steps == 1:
            grads, stats = micro_grads(state.params, batch, key)
        else:
            # (b, ...) -> (accum, b / accum, ...) taking rows accum apart, so each micro-batch keeps the batch
            # sharding (every data-parallel shard contributes rows to every micro-batch; no resharding).
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1),
                batch)

            def body(carry, xs):
                i, mb = xs
                g, s = micro_grads(state.params, mb, jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params),
                     {k: jnp.zeros((), jnp.float32) for k in ("nll", "correct", "count")})
            (grads, stats), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum_steps), micro))
        count = jnp.maximum(stats["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "train/loss": stats["nll"] / count,
            "train/accuracy": stats["correct"] / count,
            "train/grad_norm": optax.tree.norm(grads),
            "train/lr": schedule(state.step),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(parts: ModelParts, *, mode: str | None = None, loss_chunk_size: int = 0) -> Callable:
    """eval_step(params, batch) -> {"nll", "correct", "count"} sums over the batch (the loop adds them up)."""

    def eval_step(params, batch: Batch):
        return model_token_stats(parts.merge(params), batch["inputs"], batch["targets"], batch["mask"],
                                 chunk_size=loss_chunk_size, mode=mode, deterministic=True,
                                 segment_ids=batch.get("segment_ids"))

    return eval_step
