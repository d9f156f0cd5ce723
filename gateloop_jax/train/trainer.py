"""The training loop: train_and_evaluate(config, workdir), importable from a notebook.

Order of events:
  1. validate the settings against the devices and the data (one clear error, before anything compiles);
  2. mesh from config.mesh, shardings from the parameters' logical names under config.axis_rules;
  3. state: resume order is  checkpoint in <workdir>/checkpoints  >  config.init_from  >  scratch;
  4. loop: train_step (pure, jitted once, state donated); logging, evaluation and checkpoints through `every`,
     which always fires on the last step; SIGTERM/SIGINT (preemption) save a checkpoint and stop cleanly.

Shapes: b batch, t length.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gateloop_jax import data
from gateloop_jax.errors import ConfigError, MissingPathError, UserError
from gateloop_jax.models import build_model, check_platform, resolve_config
from gateloop_jax.models.config import ModelConfig
from gateloop_jax.sharding import BATCH, LENGTH, logical_to_spec, make_mesh
from gateloop_jax.train import checkpoint as ckpt_lib
from gateloop_jax.train import loss as loss_lib
from gateloop_jax.train import metrics as metrics_lib
from gateloop_jax.train import settings
from gateloop_jax.train.optimizer import learning_rate_schedule, make_optimizer
from gateloop_jax.train.profiler import StepProfiler, check_profile_steps
from gateloop_jax.train.steps import ModelParts, TrainState, make_eval_step, make_train_step


def _rules(config) -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.axis_rules)


def model_config_from(config) -> ModelConfig:
    """The ModelConfig of a run: config.model with vocab_size taken from the data (data.vocab_size)."""
    fields = dict(config.model)
    fields["vocab_size"] = data.vocab_size(config.data)
    return resolve_config(ModelConfig.from_mapping(fields))


def validate(config, mesh_devices=None) -> tuple[jax.sharding.Mesh, ModelConfig]:
    """Everything that can be checked before compiling; raises ConfigError / MissingPathError naming the setting.

    Every check here is about the settings (a field's range, a ModelConfig field, the mesh against the devices, the
    batch against the mesh), so a ValueError raised by one is re-raised as the ConfigError (a ValueError too) that the
    command lines answer in one line.
    """
    try:
        return _validate(config, mesh_devices)
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise ConfigError(str(e)) from e


def _validate(config, mesh_devices=None) -> tuple[jax.sharding.Mesh, ModelConfig]:
    settings.check_settings(config)
    mesh = make_mesh(config.mesh, mesh_devices)
    learning_rate_schedule(config)  # checks optimizer.decay
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    b, accum, procs = config.global_batch_size, config.grad_accum_steps, jax.process_count()
    if accum < 1 or b % accum:
        raise ValueError(f"global_batch_size={b} is not divisible by grad_accum_steps={accum}.")
    if (b // accum) % dp:
        raise ValueError(
            f"global_batch_size={b} / grad_accum_steps={accum} = {b // accum} sequences per micro-batch is not "
            f"divisible by the data-parallel size {dp} (mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}).")
    if b % procs or config.eval_batch_size % procs:
        raise ValueError(f"global_batch_size={b} and eval_batch_size={config.eval_batch_size} must be divisible by "
                         f"the number of processes {procs}.")
    if config.eval_batch_size % dp:
        raise ValueError(f"eval_batch_size={config.eval_batch_size} is not divisible by the data-parallel size {dp}.")
    data.check_config(config.data)
    seq_len, shards = config.data.get("seq_len"), mesh.shape["sequence"]
    if seq_len is not None and seq_len % shards:
        raise ValueError(f"data.seq_len={seq_len} is not divisible by mesh.sequence={shards} (context parallelism "
                         "splits every row into that many equal shards); choose a sequence size that divides it.")
    check_profile_steps(config.profile_steps)
    loss_lib.chunk_size_for(config.loss_chunk_size, config.chunked_loss_min_vocab, 0)
    if config.data.name in data.TEXT_NAMES:
        data_dir = os.path.expanduser(config.data.data_dir)
        if not os.path.isdir(data_dir):
            raise MissingPathError(
                f"data.data_dir={config.data.data_dir!r} does not exist. Prepare it with\n"
                f"  {data.prepare_command(config.data)}")
    model_config = model_config_from(config)  # also checks the data's tokenizer / files exist
    check_platform(model_config, mesh.devices.flat[0].platform)
    return mesh, model_config


class _Preemption:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and stops.
    A second SIGINT interrupts immediately (the default handler is back by then)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _local_rows(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    # segment_ids only where the data packs documents: a batch without it compiles the unsegmented model.
    return {k: np.asarray(batch[k]) for k in ("inputs", "targets", "mask", "segment_ids") if k in batch}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains config on all visible devices (of all processes), writing to workdir; returns the last metrics."""
    settings.check_workdir(workdir)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    mesh, model_config = validate(config)
    # The saved config is the resolved one: the model's vocab_size is the data's.
    config = copy.deepcopy(config)
    config.model.vocab_size = model_config.vocab_size
    rules = _rules(config)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    config_json = config.to_json_best_effort()

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = NamedSharding(mesh, logical_to_spec((BATCH, LENGTH), rules))

    # --- model, optimizer and their shardings (nothing is allocated until the jitted init) -----------------------
    def create_model():
        return build_model(model_config, rngs=nnx.Rngs(config.seed))

    with nnx.logical_axis_rules(rules):
        abstract_model = nnx.eval_shape(create_model)
        parts, abstract_params = ModelParts.split(abstract_model)
        param_specs = nnx.to_pure_dict(nnx.get_partition_spec(parts.template))
    param_sharding = jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))
    tx, schedule = make_optimizer(config, abstract_params)
    abstract_opt_state = jax.eval_shape(tx.init, abstract_params)
    # A multi_transform / masked optimizer (optimizer.transition_lr_factor != 1) keeps, per inner optimizer, a copy
    # of the parameter tree with MaskedNode where the other one owns the parameter: those stay MaskedNode.
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    opt_sharding = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abstract_opt_state, param_sharding,
                                         transform_non_params=lambda _: replicated, is_leaf=masked)
    state_sharding = TrainState(step=replicated, params=param_sharding, opt_state=opt_sharding)
    rest_sharding = jax.tree.map(lambda _: replicated, parts.rest)

    def init():
        graphdef_, params_, rest_ = nnx.split(create_model(), nnx.Param, ...)
        params_ = nnx.to_pure_dict(params_)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params_, opt_state=tx.init(params_)), rest_

    def with_sharding(tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    mesh_ctx = lambda: jax.set_mesh(mesh)  # noqa: E731 - activations' `constrain` needs the mesh while tracing
    with mesh_ctx(), nnx.logical_axis_rules(rules):
        init_jit = jax.jit(init, out_shardings=(state_sharding, rest_sharding))

    # --- resume: checkpoint in workdir > init_from > scratch ------------------------------------------------------
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_ckpts)
    restored_step, restored = checkpointer.restore_latest(
        abstract_params=with_sharding(abstract_params, param_sharding),
        abstract_opt_state=with_sharding(abstract_opt_state, opt_sharding))
    with mesh_ctx(), nnx.logical_axis_rules(rules):
        if restored is None:
            fresh_state, rest = init_jit()
        else:  # only the RNG variables; XLA drops the unused parameter initialisation
            rest = jax.jit(lambda: init()[1], out_shardings=rest_sharding)()
    parts = ModelParts(parts.graphdef, parts.template, rest)
    data_state = None
    if restored is not None:
        state = TrainState(step=jax.device_put(jnp.int32(restored_step), replicated), params=restored["params"],
                           opt_state=restored["opt_state"])
        data_state = restored["data"]
        origin = f"resumed from {checkpointer.directory}/{restored_step}"
    elif config.init_from:
        source = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(config.init_from), read_only=True)
        steps = source.all_steps()
        step = config.init_from_step if config.init_from_step is not None else (steps[-1] if steps else None)
        if step not in steps:
            raise FileNotFoundError(f"init_from={config.init_from!r}: no checkpoint step {step}; it has {steps}.")
        loaded = source.restore(step, abstract_params=with_sharding(abstract_params, param_sharding), data=False)
        state = fresh_state.replace(params=loaded["params"])
        origin = f"initialised from {source.directory}/{step}"
    else:
        state = fresh_state
        origin = "initialised from scratch"
    start_step = int(state.step)

    # --- data ------------------------------------------------------------------------------------------------------
    train_iter = data.train_iterator(config.data, global_batch_size=config.global_batch_size, seed=config.seed,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    if data_state is not None:
        train_iter.set_state(data_state)

    def to_global(batch):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in _local_rows(batch).items()}

    # --- the two compiled functions ------------------------------------------------------------------------------
    # The computation mode is the model config's (config.model.mode); the steps do not override it.
    loss_chunk = loss_lib.chunk_size_for(config.loss_chunk_size, config.chunked_loss_min_vocab,
                                         model_config.vocab_size)
    train_step = make_train_step(parts, tx, schedule, grad_accum_steps=config.grad_accum_steps, seed=config.seed,
                                 loss_chunk_size=loss_chunk)
    eval_step = make_eval_step(parts, loss_chunk_size=loss_chunk)
    with mesh_ctx(), nnx.logical_axis_rules(rules):
        train_step_jit = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                                 out_shardings=(state_sharding, replicated), donate_argnums=(0,))
        eval_step_jit = jax.jit(eval_step, in_shardings=(param_sharding, batch_sharding), out_shardings=replicated)

    def evaluate(params) -> dict[str, float]:
        totals = {"nll": 0.0, "correct": 0.0, "count": 0.0}
        batches = data.eval_batches(config.data, split=config.eval_split, batch_size=config.eval_batch_size,
                                    process_index=jax.process_index(), process_count=jax.process_count())
        with mesh_ctx(), nnx.logical_axis_rules(rules):
            for batch in batches:
                out = jax.device_get(eval_step_jit(params, to_global(batch)))
                for k in totals:
                    totals[k] += float(out[k])
        if totals["count"] == 0:
            raise ValueError("evaluation set has no scored tokens (mask all zero).")
        extra = {}
        if config.data.name in data.TEXT_NAMES:
            stats = data.split_statistics(config.data, config.eval_split)
            extra = dict(num_words=stats["num_words"], num_bytes=stats["num_bytes"])
        lm = data.lm_metrics(totals["nll"], int(totals["count"]), **extra)
        out = {f"eval/{k}": v for k, v in lm.items()}
        out["eval/accuracy"] = totals["correct"] / totals["count"]
        return out

    # --- bookkeeping ---------------------------------------------------------------------------------------------
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
    seq_len = int(config.data.seq_len)
    tokens_per_step = config.global_batch_size * seq_len
    flops_per_step = metrics_lib.flops_per_token(model_config, abstract_params, seq_len) * tokens_per_step
    peak = metrics_lib.peak_flops_per_device(config.peak_flops_per_device) * jax.device_count()
    writer = metrics_lib.MetricWriter(workdir)
    total = config.total_steps
    last_saved: int | None = restored_step
    if is_main:
        print(f"gateloop_jax: {model_config.name}, {n_params:,} parameters, mesh {dict(mesh.shape)} over "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s), {jax.process_count()} process(es); "
              f"{origin} at step {start_step}; training to step {total}.", flush=True)

    bar = None
    if is_main and config.progress_bar and start_step < total:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def save(step: int):
        nonlocal last_saved
        checkpointer.save(step, params=state.params, opt_state=state.opt_state, config_json=config_json,
                          data_state=train_iter.get_state())
        last_saved = step

    def check_finite(pending):
        for step, m in pending:
            if not math.isfinite(m["train/loss"]):
                where = f"{checkpointer.directory}/{last_saved}" if last_saved is not None else "none (no checkpoint)"
                raise FloatingPointError(
                    f"train/loss is {m['train/loss']} at step {step}; stopping. Last good checkpoint: {where}.")

    profiler = StepProfiler(config.profile_steps, workdir)
    last_metrics: dict[str, float] = {}
    pending: list[tuple[int, Any]] = []
    t_interval, steps_in_interval, compile_seconds = None, 0, None
    train_start = time.time()
    step = start_step
    try:
        with _Preemption() as preemption:
            while step < total:
                batch = to_global(next(train_iter))
                profiler.before(step + 1)
                with mesh_ctx(), nnx.logical_axis_rules(rules), profiler.annotate(step + 1):
                    state, m = train_step_jit(state, batch)
                step += 1
                profiler.after(step, m)
                pending.append((step, m))
                if bar is not None:
                    bar.update(1)
                if compile_seconds is None:
                    # The first step includes compilation; time the rest.
                    jax.block_until_ready(m)
                    compile_seconds = time.time() - train_start
                    t_interval, steps_in_interval = time.time(), 0
                else:
                    steps_in_interval += 1
                stop = preemption.signal is not None or (
                    config.max_train_seconds is not None and time.time() - train_start > config.max_train_seconds)
                log_now = metrics_lib.every(step, config.log_every_steps, total)
                ckpt_now = metrics_lib.every(step, config.ckpt_every_steps, total) or stop
                eval_now = metrics_lib.every(step, config.eval_every_steps, total)
                if log_now or ckpt_now or eval_now:
                    fetched = [(s, {k: float(v) for k, v in jax.device_get(mm).items()}) for s, mm in pending]
                    pending = []
                    check_finite(fetched)
                if log_now:
                    now = time.time()
                    logged = {k: float(np.mean([mm[k] for _, mm in fetched])) for k in fetched[-1][1]}
                    logged["train/lr"] = fetched[-1][1]["train/lr"]
                    if steps_in_interval:
                        step_time = (now - t_interval) / steps_in_interval
                        logged["perf/step_time"] = step_time
                        logged["perf/tokens_per_sec"] = tokens_per_step / step_time
                        logged["perf/mfu"] = flops_per_step / step_time / peak
                    t_interval, steps_in_interval = now, 0
                    if step == start_step + 1 or step == total:
                        logged["perf/compile_seconds"] = compile_seconds
                    writer.write(step, logged)
                    last_metrics.update(logged)
                    if bar is not None:
                        bar.set_postfix(loss=f"{logged['train/loss']:.4f}", acc=f"{logged['train/accuracy']:.3f}")
                if eval_now:
                    t_eval = time.time()
                    ev = evaluate(state.params)
                    writer.write(step, ev)
                    last_metrics.update(ev)
                    if is_main:
                        msg = " ".join(f"{k}={v:.4g}" for k, v in ev.items())
                        (bar.write if bar is not None else print)(f"step {step}: {msg}")
                    t_interval += time.time() - t_eval  # evaluation time is not training time
                if ckpt_now:
                    save(step)
                if stop:
                    why = (f"signal {signal.Signals(preemption.signal).name}" if preemption.signal is not None
                           else f"max_train_seconds={config.max_train_seconds}")
                    if is_main:
                        print(f"\nstopping at step {step} ({why}); checkpoint saved.", flush=True)
                    break
    finally:
        profiler.close(state)
        if bar is not None:
            bar.close()
        checkpointer.close()
        writer.close()

    if is_main:
        print(f"done at step {step} in {time.time() - train_start:.1f}s.\n"
              f"  checkpoints: {checkpointer.directory} (steps {checkpointer.all_steps()})\n"
              f"  metrics:     {writer.path}\n"
              f"  tensorboard: {os.path.join(workdir, 'tensorboard')}\n"
              f"  load with:   gateloop_jax.load({workdir!r})", flush=True)
    last_metrics["step"] = step
    return last_metrics
