"""Checks of a training config's own values (no devices, no data, no compile): one ConfigError naming the field,
the value and the fix. trainer.validate runs them first; the checks against the devices and the data follow there.
"""

from __future__ import annotations

import os
from typing import Any

from gateloop_jax.data import TEXT_NAMES
from gateloop_jax.errors import ConfigError, MissingPathError

# Fields that count something: must be integers >= 1.
POSITIVE_INTS = ("global_batch_size", "eval_batch_size", "grad_accum_steps", "total_steps", "data.seq_len")
# Cadence periods: 0 = only on the last step (metrics.every).
CADENCE = ("log_every_steps", "eval_every_steps", "ckpt_every_steps")


def _get(config: Any, path: str) -> Any:
    node = config
    for key in path.split("."):
        node = node[key]
    return node


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(config: Any) -> None:
    """Raises ConfigError for a count below 1, a non-positive learning rate, a negative warmup, and the like."""
    for path in POSITIVE_INTS:
        value = _get(config, path)
        if not _is_int(value) or value < 1:
            raise ConfigError(f"config.{path}={value!r}: must be an integer >= 1; set --config.{path}=<n> with n >= 1.")
    for path in CADENCE:
        value = _get(config, path)
        if not _is_int(value) or value < 0:
            raise ConfigError(f"config.{path}={value!r}: must be an integer >= 0 (0 = only on the last step).")
    opt = config.optimizer
    lr = opt.learning_rate
    if not isinstance(lr, (int, float)) or not lr > 0:  # NaN fails too; inf is allowed (the NaN-stop test uses it)
        raise ConfigError(f"config.optimizer.learning_rate={lr!r}: must be a number > 0 (e.g. 1e-3).")
    if not _is_int(opt.warmup_steps) or opt.warmup_steps < 0:
        raise ConfigError(f"config.optimizer.warmup_steps={opt.warmup_steps!r}: must be an integer >= 0.")
    for field in ("weight_decay", "grad_clip_norm", "end_lr_factor", "transition_lr_factor", "phase_lr_factor"):
        if opt[field] < 0:
            raise ConfigError(f"config.optimizer.{field}={opt[field]!r}: must be >= 0.")
    if config.keep_ckpts is not None and (not _is_int(config.keep_ckpts) or config.keep_ckpts < 1):
        raise ConfigError(f"config.keep_ckpts={config.keep_ckpts!r}: must be an integer >= 1, or None to keep all.")
    if config.max_train_seconds is not None and not config.max_train_seconds >= 0:
        raise ConfigError(
            f"config.max_train_seconds={config.max_train_seconds!r}: must be >= 0 (0 stops after the first step), "
            "or None for no limit."
        )
    if config.data.name in TEXT_NAMES and config.eval_split not in ("validation", "test"):
        raise ConfigError(
            f"config.eval_split={config.eval_split!r}: {config.data.name} has 'validation' and 'test'."
        )
    if config.init_from is not None and not os.path.isdir(os.path.expanduser(config.init_from)):
        raise MissingPathError(
            f"config.init_from={config.init_from!r} does not exist; pass a training workdir or its "
            "checkpoints directory, or leave it unset to start from scratch."
        )


def check_workdir(workdir: str) -> None:
    """The workdir must be a directory or not exist yet (it is created)."""
    path = os.path.expanduser(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(
            f"workdir={workdir!r} is an existing file, not a directory; pass a directory path (it is "
            "created if missing)."
        )
