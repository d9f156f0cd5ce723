"""Checkpoints: Orbax CheckpointManager with four items per step.

    <workdir>/checkpoints/<step>/
        params/     the model parameters (nested dict, OCDBT/tensorstore; sharded writes from every process)
        opt_state/  the optimiser state's leaves {"0": ..., "1": ...} (the tree structure comes from tx.init)
        meta/       JSON: {"step", "config"} (the resolved config, so a checkpoint loads without its workdir)
        data/       one JSON file per process: that process's data-iterator state (process_<i>-of-<n>.json)

Saves are asynchronous (the arrays are copied to host, then written in a background thread while training goes on)
and atomic: Orbax writes into a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoints intact and a temporary directory that is ignored (and cleaned up on the next start).
A checkpoint that is present but unreadable (corrupt files) is skipped with a warning and the previous one is used.

Restoring takes abstract arrays (jax.ShapeDtypeStruct with a sharding): the arrays are read straight into that
sharding, so a checkpoint written on one mesh restores onto any other (or onto one CPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

ITEMS = ("params", "opt_state", "meta", "data")


class DataStateHandler(ocp.CheckpointHandler):
    """Per-process JSON state of the data iterators (like grain's handler, but for any JSON-serialisable state):
    every process writes and reads its own file, since each iterates over its own rows."""

    def _path(self, directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "DataStateSave"):
        self._path(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
        path = self._path(directory)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: this checkpoint was written by a different number of processes "
                f"({sorted(p.name for p in directory.iterdir())}).")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path):
        return None

    def structure(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def flatten_opt_state(opt_state) -> dict[str, Any]:
    # optax states contain empty nodes (MaskedNode, EmptyState) that serialise awkwardly; their leaves do not.
    return {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(opt_state))}


def unflatten_opt_state(like, flat: Mapping[str, Any]):
    leaves, treedef = jax.tree.flatten(like)
    if len(flat) != len(leaves):
        raise ValueError(f"checkpoint has {len(flat)} optimiser-state arrays, this optimiser needs {len(leaves)}; "
                         "was it written with a different optimizer config?")
    return jax.tree.unflatten(treedef, [flat[str(i)] for i in range(len(leaves))])


def checkpoint_dir(path: str) -> str:
    """<workdir>/checkpoints if `path` is a workdir, else `path` itself (a checkpoints directory)."""
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


class Checkpointer:
    """The trainer's view of one checkpoints directory."""

    def __init__(self, directory: str, *, keep: int | None = None, async_save: bool = True, read_only=False):
        self.directory = os.path.abspath(directory)
        # read_only: never create, clean up or delete anything here (a checkpoint being loaded elsewhere). Orbax's
        # own read_only option would warn on every open, so it is expressed with the options below.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, *, params, opt_state, config_json: str, data_state) -> None:
        """Starts an asynchronous save (returns once the arrays are on host); a save of the same step is a no-op."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(flatten_opt_state(opt_state)),
            meta=ocp.args.JsonSave({"step": int(step), "config": json.loads(config_json)}),
            data=DataStateSave(data_state),
        ), force=True)

    def restore(self, step: int, *, abstract_params=None, abstract_opt_state=None, data=True) -> dict[str, Any]:
        """Items of checkpoint `step`, restored onto the shardings of the abstract trees given."""
        args = {"meta": ocp.args.JsonRestore()}
        if abstract_params is not None:
            args["params"] = ocp.args.StandardRestore(abstract_params)
        if abstract_opt_state is not None:
            args["opt_state"] = ocp.args.StandardRestore(flatten_opt_state(abstract_opt_state))
        if data:
            args["data"] = DataStateRestore()
        out = dict(self.manager.restore(step, args=ocp.args.Composite(**args)).items())
        if abstract_opt_state is not None:
            out["opt_state"] = unflatten_opt_state(abstract_opt_state, out["opt_state"])
        return out

    def restore_latest(self, **kwargs) -> tuple[int | None, dict[str, Any] | None]:
        """The newest checkpoint that restores; (None, None) if there is none.

        An unreadable checkpoint is skipped with a warning when an older one restores (so the newer one is damaged,
        not incompatible) and set aside. If none restores, that is more likely a config that no longer matches the
        checkpoints (another model or optimizer) than damage everywhere: an error, and nothing is renamed.
        """
        steps = self.all_steps()
        errors = []
        for step in reversed(steps):
            try:
                restored = self.restore(step, **kwargs)
            except Exception as e:  # noqa: BLE001 - any failure to read means "not a good checkpoint"
                # The full error (Orbax/TensorStore print pages of spec) only in the log; the console gets one line.
                logging.info("checkpoint %s/%d is unreadable: %r", self.directory, step, e)
                errors.append((step, e))
                continue
            stamp = int(time.time())
            for bad, e in errors:
                print(f"WARNING: checkpoint step {bad} is unreadable ({type(e).__name__} reading "
                      f"{self._damaged_file(bad, e)}); falling back to step {step}; the damaged one is kept as "
                      f"{self.directory}/corrupt-{bad}-{stamp}.", flush=True)
            self._set_aside([bad for bad, _ in errors], stamp)
            return step, restored
        if steps:
            raise RuntimeError(
                f"none of the checkpoints {steps} in {self.directory} restores with this config (a different model "
                f"or optimizer?); use another workdir or fix the config. Newest error: {errors[0][1]!r}"
            ) from errors[0][1]
        return None, None

    def _damaged_file(self, step: int, error: Exception) -> str:
        """The first path under the step's directory that the error (or one it was raised from) names, else that
        directory (a JSONDecodeError, say, names no file)."""
        step_dir = os.path.join(self.directory, str(step))
        while error is not None:
            found = re.search(re.escape(step_dir) + r"/[^\s'\",}]*", str(error))
            if found:
                return found.group(0)
            error = error.__cause__ or error.__context__
        return step_dir

    def _set_aside(self, steps, stamp: int) -> None:
        """Renames unreadable checkpoints to corrupt-<step>-<time> (kept for inspection): the resumed run saves
        those steps again, and Orbax would otherwise list (and refuse to overwrite) them."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self.directory, str(step))
                if os.path.isdir(src):
                    os.rename(src, os.path.join(self.directory, f"corrupt-{step}-{stamp}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("gateloop_jax:set_aside_corrupt_checkpoints")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
