"""Training: train_and_evaluate(config, workdir), the pure steps, the optimiser, checkpoints and metrics."""

from gateloop_jax.train.trainer import train_and_evaluate, validate

__all__ = ["train_and_evaluate", "validate"]
