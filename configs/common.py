"""The shared base of every task config: trainer, optimiser, mesh, cadence. Task files override what differs.

Not a config file itself (it has no get_config): configs/<task>.py call `base_config(task)` and `parse_arg(arg)`.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from gateloop_jax import data
from gateloop_jax.data import synthetic
from gateloop_jax.errors import ConfigError
from gateloop_jax.models.config import ModelConfig
from gateloop_jax.sharding import DEFAULT_RULES
from gateloop_jax.train.optimizer import DECAYS

# The values a string field of base_config may take (ModelConfig's are _CHOICES in gateloop_jax/model_config.py);
# tests/knobs_test.py trains each.
CHOICES = {
    "eval_split": ("validation", "test"),
    "optimizer.decay": DECAYS,
    "data.query_gaps": synthetic.MQAR_QUERY_GAPS,
    "data.packing": data.PACKINGS,
}


def model_config(**overrides) -> ml_collections.ConfigDict:
    """Every ModelConfig field with its default (documented field by field in gateloop_jax/model_config.py).

    Fields whose default is None become typed placeholders, so `--config.model.d_qk=8` works on the command line.
    """
    c = ml_collections.ConfigDict()
    for field in dataclasses.fields(ModelConfig):
        value = overrides.pop(field.name, field.default)
        if value is None:
            c[field.name] = config_dict.placeholder(int)
        else:
            c[field.name] = value
    if overrides:
        raise ConfigError(f"model_config: unknown ModelConfig field(s) {sorted(overrides)}.")
    return c


def base_config(task: str) -> ml_collections.ConfigDict:
    """The defaults every task starts from (unlocked: the task file edits it, then locks it)."""
    c = ml_collections.ConfigDict()
    # Seed of parameter initialisation, dropout and the training-data order.
    c.seed = 0
    # The architecture: ModelConfig fields (gateloop_jax/model_config.py). vocab_size is set from the data.
    c.model = model_config()
    # The data: fields of gateloop_jax.data.default_config(task) (documented there).
    c.data = data.default_config(task)
    # Sequences per optimizer step, over all devices and processes (divisible by the data-parallel size).
    c.global_batch_size = 32
    # Sequences per evaluation batch, over all devices and processes.
    c.eval_batch_size = 32
    # Evaluation split (WikiText: "validation" or "test"; synthetic tasks have one fixed eval set).
    c.eval_split = "validation"
    # Micro-batches per optimizer step (gradient accumulation); global_batch_size must be divisible by it.
    c.grad_accum_steps = 1
    # Optimizer steps of the run; the learning-rate schedule ends here.
    c.total_steps = 10_000
    # Cadence (each also fires on the last step): metrics to metrics.jsonl/TensorBoard, evaluation, checkpoint.
    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.ckpt_every_steps = 1000
    # Checkpoints kept in <workdir>/checkpoints (older ones are deleted); None keeps all.
    c.keep_ckpts = 3
    # Start from this checkpoint's parameters (a workdir or a checkpoints dir) when the workdir has none;
    # the optimizer state, step and data position start fresh. Resume order: workdir > init_from > scratch.
    c.init_from = config_dict.placeholder(str)
    # Step of init_from to load; None = its latest.
    c.init_from_step = config_dict.placeholder(int)

    # AdamW with linear warmup and decay (gateloop_jax/train/optimizer.py).
    c.optimizer = ml_collections.ConfigDict()
    # Peak learning rate, reached after warmup_steps.
    c.optimizer.learning_rate = 1e-3
    # Linear warmup from 0.
    c.optimizer.warmup_steps = 1000
    # After warmup: "cosine", "linear" or "constant" (DECAYS) decay to learning_rate * end_lr_factor at total_steps.
    c.optimizer.decay = "cosine"
    c.optimizer.end_lr_factor = 0.1
    # Adam moments and epsilon.
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-8
    # Decoupled weight decay, applied to weight matrices only (not norms, biases, embeddings).
    c.optimizer.weight_decay = 0.1
    # Clip the global gradient norm to this; 0 = no clipping.
    c.optimizer.grad_clip_norm = 1.0
    # Learning-rate multiplier of the state-transition parameters (gamma/theta projections, fixed gamma/theta).
    c.optimizer.transition_lr_factor = 1.0
    # Learning-rate multiplier of the phase parameters (theta projection, fixed theta) on top of the above. Below 1 it
    # keeps the per-token phase from drifting into a random rotation over long gaps (configs/mqar.py uses 0.1).
    c.optimizer.phase_lr_factor = 1.0

    # Device mesh sizes over ("data", "fsdp", "sequence", "tensor"); -1 = all remaining devices. Batch is split over
    # data x fsdp, parameters over fsdp (along embed) and tensor (heads, mlp, vocab); sequence > 1 splits every row's
    # length into that many contiguous shards (context parallelism; data.seq_len must be divisible by it).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1})
    # Logical axis -> mesh axes (gateloop_jax/sharding.py defines the logical names once).
    c.axis_rules = tuple((name, axes) for name, axes in DEFAULT_RULES)
    # Peak FLOP/s of one device for MFU; None = looked up from the device kind (gateloop_jax/train/metrics.py).
    c.peak_flops_per_device = config_dict.placeholder(float)
    # Console progress bar with ETA (process 0).
    c.progress_bar = True
    # Stop after this many seconds of training with a checkpoint (for job time limits); None = no limit.
    c.max_train_seconds = config_dict.placeholder(float)
    # jax.profiler trace of steps START..START+COUNT-1 into <workdir>/profile (TensorBoard / Perfetto), given as
    # --config.profile_steps=START,COUNT; None = no trace. Start after step 1, which includes compilation.
    c.profile_steps = config_dict.placeholder(tuple)
    # The loss applies the output head and cross-entropy to this many positions at a time (a scan recomputed in the
    # backward; gateloop_jax/train/loss.py), so the (batch, length, vocab) float32 logits never exist at once.
    # Used when the vocabulary has >= chunked_loss_min_vocab entries (WikiText's 32k: chunked; the synthetic tasks'
    # few dozen: plain); loss_chunk_size 0 = always the plain loss.
    c.loss_chunk_size = 256
    c.chunked_loss_min_vocab = 8192
    return c


# variant=<short name> in a config arg -> the registered model name (gateloop_jax.models.MODELS).
MODEL_VARIANTS = {
    "gateloop": "gateloop", "fixed": "gateloop_fixed", "real": "gateloop_real",
    "linear_attention": "linear_attention", "transformer": "transformer", "hybrid": "hybrid",
}


def model_variant(task: str, variant: str, variants=MODEL_VARIANTS):
    """variants[variant], or one error naming the task, the value and the choices."""
    if variant not in variants:
        raise ConfigError(f"{task}: variant={variant!r} is not one of {sorted(variants)}.")
    return variants[variant]


def synthetic_task_config(task: str, arg: str | None) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(config, parsed arg) a synthetic task's get_config starts from: base_config(task) with the model of
    `variant=` (MODEL_VARIANTS) and the GateLoop computation mode of `mode=` (all modes compute the same function).
    Arg keys: variant, mode, runlocal (CPU-sized run), test (the tiny two-step test size)."""
    arg = parse_arg(arg, variant="gateloop", mode="auto", runlocal=False, test=False)
    c = base_config(task)
    c.model.name = model_variant(task, arg.variant)
    c.model.mode = arg.mode
    return c, arg


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'variant=fixed,runlocal' -> {"variant": "fixed", "runlocal": True, ...}; keys must be in `defaults`.

    A bare word is a boolean flag set to True; values are parsed as int/float/bool when they look like one.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f"config arg: unknown key {key!r} in {arg!r}; known keys are {sorted(defaults)}.")
        if not sep:
            out[key] = True
            continue
        value = value.strip()
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        if value in ("True", "true", "False", "false"):
            value = value in ("True", "true")
        out[key] = value
    return ml_collections.ConfigDict(out)


def apply_test_size(c: ml_collections.ConfigDict) -> None:
    """The tiny size every shipped config is tested at (derived, not copied): two steps, a few-kilo-parameter model."""
    c.model.update(d_model=16, num_layers=1, num_heads=2, mlp_dim=32)
    if c.model.name == "hybrid":  # the smallest stack with both block kinds
        c.model.update(num_layers=2, block_pattern="ga")
    # The quickest mode to compile on CPU; that all modes compute the same function is tests/ops_test.py's job.
    if c.model.mode == "auto":
        c.model.mode = "recurrent"
    c.global_batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 2
    c.ckpt_every_steps = 2
    c.optimizer.warmup_steps = 1
    c.progress_bar = False
    if "num_eval_batches" in c.data:
        c.data.num_eval_batches = 1
    if "read_threads" in c.data:
        c.data.read_threads = 1


def apply_text_sizes(c: ml_collections.ConfigDict, *, runlocal: bool, test: bool) -> None:
    """The runlocal and test sizes of the text LM tasks (wikitext103, text_corpus), shared so they stay alike."""
    if runlocal:
        # CPU smoke run on prepared data: a 4-layer d=128 model, context 128, float32.
        c.model.update(d_model=128, num_layers=4, num_heads=128, d_qk=1, d_v=1, dtype="float32", dropout_rate=0.0)
        c.data.seq_len = 128
        c.global_batch_size = 16
        c.eval_batch_size = 16
        c.total_steps = 500
        c.optimizer.warmup_steps = 50
        c.log_every_steps = 25
        c.eval_every_steps = 250
        c.ckpt_every_steps = 250
    if test:
        apply_test_size(c)
        c.model.update(num_heads=2, d_qk=None, d_v=None, dtype="float32", dropout_rate=0.0)
        c.data.seq_len = 16
