"""The optimiser: AdamW with warmup + decay, global-norm clipping, a weight-decay mask and an optional lower learning
rate for the state-transition projections. Everything is optax; only the parameter labels are ours.

Parameters are nested dicts of arrays (nnx.to_pure_dict of the model's nnx.Param state), so labels are functions of
the path, e.g. ("blocks", 0, "mixer", "gamma_proj", "kernel").
"""

from __future__ import annotations

from typing import Any

import jax
import optax

# GateLoop's state-transition parameters (layers.GateLoopMixer): data-controlled projections and fixed biases.
TRANSITION_MODULES = ("gamma_proj", "theta_proj")
TRANSITION_PARAMS = ("gamma_bias", "theta_bias")


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def is_transition(path) -> bool:
    names = _names(path)
    return any(n in TRANSITION_MODULES for n in names[:-1]) or names[-1] in TRANSITION_PARAMS


def decays(path) -> bool:
    """Weight decay applies to weight matrices only: not to norms (modules named *norm*), biases (params named
    *bias*, including the fixed transitions' gamma_bias/theta_bias) or embeddings (the `embed` module)."""
    names = _names(path)
    if names[-1].endswith("bias") or names[0] == "embed":
        return False
    return not any("norm" in n for n in names[:-1])


def weight_decay_mask(params) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(p), params)


def is_phase(path) -> bool:
    """The parameters of arg a: the phase projection (theta_proj) and the fixed transitions' theta_bias."""
    names = _names(path)
    return "theta_proj" in names[:-1] or names[-1] == "theta_bias"


def transition_labels(params) -> Any:
    """"phase" (arg a), "transition" (|a|) or "default" per parameter."""
    def label(path, _):
        if is_phase(path):
            return "phase"
        return "transition" if is_transition(path) else "default"

    return jax.tree_util.tree_map_with_path(label, params)


# The learning-rate decays after warmup (config.optimizer.decay).
DECAYS = ("cosine", "linear", "constant")


def learning_rate_schedule(config) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `decay` ("cosine" | "linear" | "constant")
    to `learning_rate * end_lr_factor` at `total_steps`."""
    opt, total = config.optimizer, config.total_steps
    peak, warmup = opt.learning_rate, min(opt.warmup_steps, max(total - 1, 0))
    end = peak * opt.end_lr_factor
    decay_steps = max(total - warmup, 1)
    if opt.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.end_lr_factor)
    elif opt.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif opt.decay == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.decay={opt.decay!r} is not one of {DECAYS}.")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def make_optimizer(config, params) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule). `params` only supplies the tree structure for the masks and labels."""
    opt = config.optimizer
    schedule = learning_rate_schedule(config)

    def adamw(scale):
        lr = schedule if scale == 1.0 else (lambda step: schedule(step) * scale)
        return optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=weight_decay_mask)

    phase_factor = opt.transition_lr_factor * opt.phase_lr_factor
    if opt.transition_lr_factor == 1.0 and phase_factor == 1.0:
        inner = adamw(1.0)
    else:
        # The transitions set every memory timescale at once; a lower learning rate for them is a common stabiliser
        # for linear recurrences (e.g. LRU, Mamba's dt), so it is a knob here. The phase has its own factor on top:
        # a token's arg a rotates the state for every later token, so Adam's per-step moves of the phase projection
        # add up to a random rotation over long gaps (experiments/README.md, MQAR).
        inner = optax.multi_transform(
            {"default": adamw(1.0), "transition": adamw(opt.transition_lr_factor), "phase": adamw(phase_factor)},
            transition_labels)
    parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm else []
    return optax.chain(*parts, inner), schedule
