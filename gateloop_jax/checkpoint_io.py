"""Load a trained model from a checkpoint without the trainer (notebooks, sampling, inspection).

    model, config, tokenizer = gateloop_jax.load("workdirs/memory_horizon")          # latest step
    model, config, tokenizer = gateloop_jax.load("workdirs/memory_horizon/checkpoints", step=1500)
    model, config, tokenizer = gateloop_jax.load("exports/wt103")      # an export (gateloop_jax/export.py)
    logits = model(tokens)                                                         # (b, t) int32 -> (b, t, V)

The checkpoint's own `meta` item holds the resolved training config, so a checkpoints directory copied away from its
workdir still loads. Parameters are read onto one CPU device whatever mesh (GPU, TPU, several hosts) wrote them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from gateloop_jax.errors import ConfigError, MissingPathError


def _model_config(config: ml_collections.ConfigDict):
    """The ModelConfig of a saved training config (the trainer stores model.vocab_size as the data's)."""
    from gateloop_jax.models import portable_config, resolve_config
    from gateloop_jax.models.config import ModelConfig

    # The model is placed on a CPU: a GPU-only kernel setting becomes "auto" there (the same function).
    return portable_config(resolve_config(ModelConfig.from_mapping(dict(config.model))), "cpu")


def latest_step(path: str) -> int:
    """The newest checkpoint step of a workdir or checkpoints directory, or the step an export was taken at."""
    from gateloop_jax import export

    path = os.path.abspath(os.path.expanduser(path))
    if export.is_export(path):
        return int(export.read_config(path)["step"])
    from gateloop_jax.train import checkpoint as ckpt_lib

    steps = []
    if os.path.isdir(path):
        steps = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(path), read_only=True).all_steps()
    if not steps:
        raise MissingPathError(f"gateloop_jax: no checkpoint in {path}.")
    return steps[-1]


def load(
    path: str, step: int | None = None, *, tokenizer: bool = True
) -> tuple[nnx.Module, ml_collections.ConfigDict, Any]:
    """(model, config, tokenizer or None) from a workdir or a checkpoints directory.

    Args:
      path: a training workdir (with checkpoints/), its checkpoints directory, or an export directory
        (model.safetensors + config.json, read without Orbax).
      step: the checkpoint step; None = the latest (an export has one step: None).
      tokenizer: load the data's tokenizer (WikiText: SentencePiece, from config.data.data_dir); synthetic tasks have
        none. A missing tokenizer file is an error naming the prepare command.

    Returns:
      model: the nnx CausalLM with the trained float32 parameters on one CPU device, eval-ready; a setting only a
        GPU runs (attention_impl='cudnn', mode='gla_rotation') is "auto" in it.
      config: the training config (ConfigDict; config.model.vocab_size filled in).
      tokenizer: a sentencepiece.SentencePieceProcessor, or None.
    """
    from gateloop_jax import export

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise MissingPathError(
            f"gateloop_jax.load: {path} does not exist; pass a training workdir, its checkpoints directory or an "
            "export directory."
        )
    if export.is_export(path):
        if step is not None:
            raise ConfigError(f"gateloop_jax.load: {path} is an export (one step); load it with step=None.")
        return export.load_export(path, tokenizer=tokenizer)
    # Imported here so that `import gateloop_jax` does not pay for Orbax.
    from gateloop_jax.train import checkpoint as ckpt_lib

    directory = ckpt_lib.checkpoint_dir(path)
    checkpointer = ckpt_lib.Checkpointer(directory, read_only=True)
    steps = checkpointer.all_steps()
    if not steps:
        raise MissingPathError(f"gateloop_jax.load: no checkpoint in {directory} (expected <step>/ directories "
                                "written by the trainer, or a workdir holding checkpoints/).")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"gateloop_jax.load: no checkpoint step {step} in {directory}; available steps: {steps}.")

    meta = checkpointer.restore(step, data=False)["meta"]
    config = ml_collections.ConfigDict(meta["config"])
    model_config = _model_config(config)

    from gateloop_jax.models import build_model
    from gateloop_jax.train.steps import ModelParts

    cpu = jax.devices("cpu")[0]
    abstract_model = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
    parts, abstract_params = ModelParts.split(abstract_model)
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(cpu)),
        abstract_params)
    params = checkpointer.restore(step, abstract_params=target, data=False)["params"]
    checkpointer.close()
    with jax.default_device(cpu):
        model = build_model(model_config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)

    tok = None
    if tokenizer and config.data.name in ("wikitext103", "text_corpus"):
        from gateloop_jax import data

        tok = data.load_tokenizer(config.data)
    return model, config, tok
