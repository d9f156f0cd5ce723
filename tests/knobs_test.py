"""Every documented knob works: each config field at each of its values trains, evaluates and decodes a token.

The settings are generated from the config definitions, so a new field is covered without editing this file: every
field of configs/mqar.py:test (the smallest size), walked as a ConfigDict - the model (ModelConfig's fields), the
trainer, optimizer, cadence, checkpoint, mesh and data fields. Values: the documented choices (model_config.py
_CHOICES, the registered model names, configs/common.py CHOICES), the other side of a bool, and a representative
non-default for a number. Below, with their reasons: fields with no non-default to try (NO_ALTERNATIVE), values
the generic rule gets wrong (VALUES), documented special values (EXTRA), settings that only act together with
another (REQUIRES), values this CPU cannot run (UNAVAILABLE) and combinations meant to be refused (REFUSED).

Cost: one training run per setting would be ~90 runs. The settings are packed greedily into few runs instead (no two
values of one field in a run, every run passing the trainer's validation), so each run turns many knobs at once and
compiles once; when a packed run fails, its settings are rerun one at a time to name the one that breaks.
Mesh fields run on the 8 fake CPU devices of conftest.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

import gateloop_jax
from configs import common
from gateloop_jax.decode import generate
from gateloop_jax.models import MODELS
from gateloop_jax.ops import pallas_mosaic_gpu
from gateloop_jax.models.config import _CHOICES, ModelConfig
from gateloop_jax.sharding import DEFAULT_RULES, EMBED
from gateloop_jax.train import train_and_evaluate, validate
from gateloop_jax.train.optimizer import is_transition
from train_test import ROOT, get_config  # noqa: F401 - also sets the compilation cache

TASK, SIZE = "mqar", "test"
# Stands for the workdir of a finished run (the defaults run), for the fields that load a checkpoint.
SOURCE = "<the defaults run's workdir>"

NO_ALTERNATIVE = {
    "model.vocab_size": "set from the data by the trainer (data.vocab_size is swept)",
    "data.name": "the task itself: another task is another data config (tests/configs_test.py trains every task)",
}
# Values replacing the generic rule's, with why.
VALUES = {
    # Half the default (0.4995) would fall below init_min_magnitude (0.9); a refused combination, tested below.
    "model.init_max_magnitude": [0.95],
    # A finished run's checkpoint, and the step it saved (the last, 2).
    "init_from": [SOURCE],
    "init_from_step": [2],
    # 0 stops after the first step with a checkpoint (the job-time-limit path); a positive limit never triggers here.
    "max_train_seconds": [0.0],
    # Trace the second step (the first one compiles).
    "profile_steps": [(1, 1)],
    # A free-form pattern over {g, a}: the hybrid's two kinds, one attention block after one GateLoop block.
    "model.block_pattern": ["ag"],
    # The paper's layer (no convolution) and one with shifts that reach past the previous token.
    "model.short_conv_size": [0, 3],
    # Tensor parallelism off, parameters sharded along embed over fsdp x tensor (FSDP over every device).
    "axis_rules": [tuple((name, ("fsdp", "tensor") if name == EMBED else (None if axes == "tensor" else axes))
                         for name, axes in DEFAULT_RULES)],
}
# Documented special values, tried besides the generic one.
EXTRA = {
    "keep_ckpts": [None],  # keep all
    "optimizer.grad_clip_norm": [0.0],  # no clipping
    "optimizer.transition_lr_factor": [0.1, 0.0],  # issue 26: the multi-transform optimizer; 0 freezes transitions
    "eval_every_steps": [0],  # never, except the last step
    "ckpt_every_steps": [0],
    "log_every_steps": [0],
}
# Settings that only act together with others: each value runs once with each companion.
REQUIRES = {
    # chunk_size acts in the chunked modes; "auto" resolves to "chunked" here (multi-head, CPU); "recurrent" (what
    # the test size turns "auto" into) ignores it, as documented at ModelConfig.chunk_size.
    "model.chunk_size": [{"model.mode": "chunked"}, {"model.mode": "auto"}, {"model.mode": "recurrent"}],
    "model.magnitude_temperature": [{"model.magnitude_activation": "sigmoid_tempered"}],
    # Fields of the Transformer baseline; every other model field is swept on the default name (GateLoop).
    "model.attention_impl": [{"model.name": "transformer"}],
    "model.rope_base": [{"model.name": "transformer"}],
    "model.rope_fraction": [{"model.name": "transformer"}],
    # The test size has one layer, and a hybrid needs both block kinds within its layers.
    "model.block_pattern": [{"model.name": "hybrid", "model.num_layers": 2}],
    "model.name": [{"model.num_layers": 2, "model.block_pattern": "ga"}],
    "init_from_step": [{"init_from": SOURCE}],
    # Two micro-batches of 8 / 2 = 4 rows cannot split over the 8 data-parallel devices.
    "grad_accum_steps": [{"global_batch_size": 16}],
    # The rules above shard over the tensor axis, which has size 1 by default.
    "axis_rules": [{"mesh.tensor": 2}],
}
# (field, value) -> the error it gives on this CPU, before compiling.
UNAVAILABLE = {
    ("model.mode", "gla_rotation"): r"mode='gla_rotation' cannot run here: .*jax-linear-attention",
    ("model.attention_impl", "cudnn"): r"attention_impl='cudnn' needs an NVIDIA GPU, this is cpu",
}
if pallas_mosaic_gpu.unavailable_reason():  # jax < 0.11 (Python 3.11); on jax 0.11 it runs in GPU interpret mode
    UNAVAILABLE[("model.mode", "mosaic_gpu")] = r"mode='mosaic_gpu' needs jax >= 0.11"
# Combinations meant to be refused: one error naming both fields, before compiling.
REFUSED = {
    "remat_with_dropout": ({"model.remat": True, "model.dropout_rate": 0.1}, r"remat=True with dropout_rate=0.1"),
    "groupnorm_max_headed": ({"model.output_norm": "groupnorm", "model.d_qk": 1, "model.d_v": 1},
                             r"output_norm='groupnorm' .* d_v, which is 1"),
    "init_magnitudes": ({"model.init_min_magnitude": 0.99, "model.init_max_magnitude": 0.95},
                        r"init_min_magnitude <= init_max_magnitude .* 0.99, 0.95"),
    "heads_vs_width": ({"model.num_heads": 3}, r"d_model=16 is not divisible by num_heads=3"),
    "name_vs_transition": ({"model.name": "gateloop_fixed", "model.transition": "real"},
                           r"name='gateloop_fixed' fixes transition='fixed', but transition='real'"),
    "accumulation_vs_batch": ({"grad_accum_steps": 3}, r"global_batch_size=8 is not divisible by grad_accum_steps=3"),
    "batch_vs_mesh": ({"global_batch_size": 12}, r"global_batch_size=12 .* data-parallel size 8 \(mesh data=8"),
}

# Fields packed only with each other, with why.
APART = {
    # Stopping early leaves a run's other settings without evaluation.
    "max_train_seconds": "stops",
    # Loading the defaults run's parameters needs its architecture and vocabulary.
    "init_from": "init", "init_from_step": "init",
}


def base_config() -> ml_collections.ConfigDict:
    return get_config(TASK, SIZE)


def walk(c: ml_collections.ConfigDict, prefix: str = ""):
    """(dotted path, value, type) of every leaf field."""
    for key in c.keys():
        value = c[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, c.get_type(key)


def choices(path: str):
    if path == "model.name":
        return tuple(MODELS)
    if path.startswith("model.") and path[len("model."):] in _CHOICES:
        return _CHOICES[path[len("model."):]]
    return common.CHOICES.get(path)


def values(path: str, default, kind) -> list:
    """The non-default values of a field to train."""
    if path in VALUES:
        out = list(VALUES[path])
    elif choices(path):
        out = [v for v in choices(path) if v != default]
    elif kind is bool:
        out = [not default]
    elif kind is int:
        out = [4 if default is None else 1 if default == 0 else 2 if default == -1 else 2 * default]
    elif kind is float:
        out = [1.0 if default is None else 0.1 if default == 0 else default / 2]
    else:
        raise ValueError(f"knobs_test: no rule for {path} ({kind.__name__}, default {default!r}); add its choices to "
                         "configs/common.py CHOICES, values to VALUES here, or a reason to NO_ALTERNATIVE.")
    return out + EXTRA.get(path, [])


@dataclasses.dataclass(frozen=True)
class Setting:
    field: str
    value: object
    changes: tuple  # ((path, value), ...): the field's and its companions'

    @property
    def label(self) -> str:
        return ",".join(f"{p}={v!r}" for p, v in self.changes)


def configure(changes, source: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    for path, value in dict(changes).items():
        *parents, key = path.split(".")
        node = c
        for parent in parents:
            node = node[parent]
        node[key] = source if value == SOURCE and source is not None else value
    return c


def settings() -> list[Setting]:
    out = []
    for path, default, kind in walk(base_config()):
        if path in NO_ALTERNATIVE:
            continue
        for value in values(path, default, kind):
            for companion in REQUIRES.get(path, [{}]):
                changes = {**companion, path: value}
                # Model fields are GateLoop's unless a companion names the model (they would be no-ops elsewhere).
                if path.startswith("model.") and path != "model.name":
                    changes.setdefault("model.name", "gateloop")
                out.append(Setting(path, value, tuple(changes.items())))
    return out


def valid(changes) -> bool:
    # init_from must name an existing directory to validate (what it holds is read only when training starts).
    try:
        validate(configure(changes, source=os.path.dirname(os.path.abspath(__file__))))
    except ValueError:
        return False
    return True


def pack(items: list[Setting]) -> list[list[Setting]]:
    """First-fit: each setting joins the first run that agrees on every shared field and still validates."""
    runs: list[list[Setting]] = []
    merged: list[dict] = []
    for item in items:
        for run, changes in zip(runs, merged):
            if all(changes.get(p, v) == v for p, v in item.changes) and valid({**changes, **dict(item.changes)}):
                run.append(item)
                changes.update(item.changes)
                break
        else:
            runs.append([item])
            merged.append(dict(item.changes))
    return runs


SETTINGS = settings()
UNAVAILABLE_SETTINGS = [s for s in SETTINGS if (s.field, s.value) in UNAVAILABLE]
RUNS = [run for group in (None, *sorted(set(APART.values())))
        for run in pack([s for s in SETTINGS if APART.get(s.field) == group and s not in UNAVAILABLE_SETTINGS])]


def train_evaluate_decode(items: list[Setting], workdir: str, source: str | None):
    changes = [c for item in items for c in item.changes]
    config = configure(changes, source)
    result = train_and_evaluate(config, workdir)
    stops_early = config.max_train_seconds is not None
    assert result["step"] == (1 if stops_early else config.total_steps)
    assert math.isfinite(result["train/loss"])
    if not stops_early:  # evaluation always fires on the last step
        assert math.isfinite(result["eval/loss"]) and 0.0 <= result["eval/accuracy"] <= 1.0
    model, loaded, _ = gateloop_jax.load(workdir, tokenizer=False)
    # The prefill in the model's own mode, then the O(1) step; greedy.
    token = np.asarray(generate(model, [[1, 2, 3]], 1, temperature=0.0, mode=None))
    assert token.shape == (1, 1) and 0 <= token[0, 0] < loaded.model.vocab_size


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The all-defaults run: a checkpoint for init_from."""
    workdir = str(tmp_path_factory.mktemp("defaults"))
    train_evaluate_decode([], workdir, None)
    return workdir


def test_every_field_is_swept():
    """Each field of the config has a setting (or a reason), and every table here names a field that exists."""
    fields = {path for path, _, _ in walk(base_config())}
    assert {f.name for f in dataclasses.fields(ModelConfig)} == {p[len("model."):] for p in fields
                                                                 if p.startswith("model.")}
    swept = {s.field for s in SETTINGS}
    assert fields - set(NO_ALTERNATIVE) == swept
    for table in (NO_ALTERNATIVE, VALUES, EXTRA, REQUIRES, APART):
        assert set(table) <= fields, set(table) - fields
    assert {f for f, _ in UNAVAILABLE} <= fields
    placed = [s for run in RUNS for s in run] + UNAVAILABLE_SETTINGS
    assert sorted(placed, key=SETTINGS.index) == SETTINGS
    assert len(RUNS) < len(SETTINGS) / 4  # the packing is what keeps the sweep within CI's budget


def failures(items: list[Setting], workdir, source: str | None) -> list[str]:
    """The settings that fail, found by halving (a few runs per culprit); [] if the run works."""
    try:
        train_evaluate_decode(items, os.path.join(workdir, str(len(os.listdir(workdir)))), source)
        return []
    except Exception as error:  # noqa: BLE001 - reported by the caller, setting by setting
        if len(items) == 1:
            return [f"{items[0].label}: {type(error).__name__}: {error}"]
        half = len(items) // 2
        found = failures(items[:half], workdir, source) + failures(items[half:], workdir, source)
        return found or [f"only together: {[s.label for s in items]}: {type(error).__name__}: {error}"]


@pytest.mark.parametrize("run", RUNS, ids=[f"run{i}" for i in range(len(RUNS))])
def test_settings_train_evaluate_and_decode(run, tmp_path, request):
    source_dir = request.getfixturevalue("source") if any(v == SOURCE for s in run for _, v in s.changes) else None
    found = failures(run, str(tmp_path), source_dir)
    assert not found, "settings that fail:\n" + "\n".join(found)


@pytest.mark.parametrize("changes, error", [(s.changes, UNAVAILABLE[s.field, s.value]) for s in UNAVAILABLE_SETTINGS]
                         + list(REFUSED.values()), ids=[s.label for s in UNAVAILABLE_SETTINGS] + list(REFUSED))
def test_refused_settings_raise_before_compiling(changes, error, tmp_path, monkeypatch):
    config = configure(changes)
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before validating"))
    with pytest.raises(ValueError, match=error):
        train_and_evaluate(config, str(tmp_path))


def test_transition_lr_factor_freezes_transitions_and_resumes(tmp_path):
    """transition_lr_factor=0 (a multi-transform optimizer, its state sharded over fsdp): the transition parameters
    do not move, the others do; its checkpoint resumes to the uninterrupted run's loss."""
    config = configure({"optimizer.transition_lr_factor": 0.0, "mesh.fsdp": 2, "total_steps": 3,
                        "ckpt_every_steps": 2, "eval_every_steps": 0})
    workdir = str(tmp_path)
    first = train_and_evaluate(config, workdir)
    params = {step: nnx_params(gateloop_jax.load(workdir, step, tokenizer=False)[0]) for step in (2, 3)}
    moved = jax.tree_util.tree_map_with_path(lambda p, a, b: (is_transition(p), bool(np.any(a != b))), *params.values())
    flags = jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple))
    assert any(t for t, _ in flags) and not any(m for t, m in flags if t)
    assert all(m for t, m in flags if not t)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
    resumed = train_and_evaluate(config, workdir)
    # The same program on the same devices from the restored state: equal up to float32 rounding of the restore.
    np.testing.assert_allclose(resumed["train/loss"], first["train/loss"], rtol=1e-6, atol=0)


def nnx_params(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("mode, passed", [("chunked", 4), ("auto", 4), ("recurrent", None), ("scan", None)])
def test_chunk_size_reaches_the_op_where_the_mode_chunks(mode, passed, monkeypatch):
    """ModelConfig.chunk_size goes to the chunked op where the mode (or what "auto" resolves to: "chunked" for
    multi-head on CPU) chunks; the other modes ignore it instead of refusing it."""
    from flax import nnx

    from gateloop_jax.models import build_model, preset_config
    from gateloop_jax.ops import dispatch

    seen = []
    chunked = dispatch._MODE_FNS["chunked"]
    monkeypatch.setitem(dispatch._MODE_FNS, "chunked",
                        lambda *args, chunk_size=None: seen.append(chunk_size) or chunked(*args, chunk_size=chunk_size))
    model = build_model(preset_config("test", vocab_size=16, mode=mode, chunk_size=4), rngs=nnx.Rngs(0))
    assert model.config.head_dims[0] > 1  # multi-head, where "auto" is "chunked" on CPU
    logits = nnx.jit(lambda m, x: m(x))(model, jax.numpy.zeros((1, 5), jax.numpy.int32))  # eager would take ~40 s
    assert np.all(np.isfinite(logits))
    assert seen == ([passed] * model.config.num_layers if passed else [])


def test_gpu_only_settings_load_as_auto_on_cpu():
    """gateloop_jax.load places the model on a CPU: GPU-only kernels become "auto" there, elsewhere nothing changes."""
    from gateloop_jax.models import portable_config

    cudnn = ModelConfig(name="transformer", attention_impl="cudnn")
    assert portable_config(cudnn, "cpu") == cudnn.replace(attention_impl="auto")
    assert portable_config(cudnn, "gpu") == cudnn
    gla = ModelConfig(mode="gla_rotation", dtype="bfloat16")
    assert portable_config(gla, "cpu") == gla.replace(mode="auto")
    assert portable_config(gla.replace(mode="chunked"), "cpu") == gla.replace(mode="chunked")
