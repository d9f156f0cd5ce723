"""Shared by the experiment drivers (memory_horizon.py, mqar.py, mqar_grid.py, sweeps.py): launch trainer runs (with
a time budget), read their metrics.jsonl, aggregate over seeds, write the JSON / Markdown tables and the learning-curve
plots, and pack a sweep's small files (metrics, configs, driver records; no checkpoints) into one archive.

Runs are launched as subprocesses of the trainer CLI (`python -m gateloop_jax.main`), never by a forked trainer:
an experiment is a config plus `--config.<field>=<value>` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Where the drivers write their tables, JSON and plots (committed), and where their trainer runs go (git-ignored).
RESULTS = ROOT / "experiments" / "results"


# Every driver's default workdirs are under this root; their trainer processes share the `parallel` slots.
EXPERIMENTS_ROOT = ROOT / "workdirs" / "experiments"


def workroot(task: str) -> Path:
    return EXPERIMENTS_ROOT / task


def driver_parser(doc: str, actions: Sequence[str], *, seeds: Sequence[int]) -> argparse.ArgumentParser:
    """The command line every driver shares: the action, the seeds, trainer processes at once."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=tuple(actions))
    p.add_argument("--seeds", nargs="+", type=int, default=list(seeds))
    p.add_argument("--parallel", type=int, default=2, help="trainer processes at once (2 on the 2-core CPU)")
    return p


def add_run_options(p: argparse.ArgumentParser, default_root: Path | None) -> None:
    """--root (where the workdirs go and aggregate reads them), --budget_s and --grace_s (run_jobs's time budget).
    default_root None: the driver picks the root after parsing (e.g. by size)."""
    where = default_root or "workdirs/experiments/<task>"
    # Absolute: the trainers run from the repository root, and live_runs compares resolved paths.
    p.add_argument("--root", type=lambda text: Path(text).resolve(), default=default_root,
                   help=f"directory of the run workdirs, for run, aggregate and pack (default {where})")
    p.add_argument("--budget_s", type=float, default=None,
                   help="launch no new run after this many seconds from the start (default: no limit)")
    p.add_argument("--grace_s", type=float, default=45.0,
                   help="runs still going at budget_s + grace_s get SIGTERM (the trainer saves a checkpoint and "
                        f"stops, so a rerun resumes them), SIGKILL {KILL_AFTER_S:.0f} s later")


def write_summary(stem: str, summary: dict, markdown: str, out: Path = RESULTS) -> None:
    """<out>/<stem>.json and <out>/<stem>.md (out: results/ by default)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    write_json(Path(out) / f"{stem}.json", summary)
    (Path(out) / f"{stem}.md").write_text(markdown)


# ---------------------------------------------------------------- launching


def trainer_command(config: str, workdir: Path, overrides: Mapping[str, object]) -> list[str]:
    """The trainer CLI for one run: config path[:arg], workdir, then `--config.<field>=<value>` per override."""
    cmd = [sys.executable, "-m", "gateloop_jax.main", f"--config={config}", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    return cmd


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written by a live run
                pass
    return rows


def is_done(workdir: Path, total_steps: int) -> bool:
    """A run is finished when its metrics hold an evaluation at the last step."""
    return any(r.get("step") == total_steps and "eval/accuracy" in r for r in read_metrics(workdir))


def live_runs(root: Path | None = None) -> set[str]:
    """Workdirs (resolved paths) of trainer processes running now under `root` (default workdirs/experiments),
    found from /proc: every driver counts every other driver's runs, so several drivers (and runs left behind by a
    killed driver) share the same slots and no workdir is trained twice at once."""
    root = os.path.realpath(root or EXPERIMENTS_ROOT)
    out = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in args]
        if "gateloop_jax.main" not in args:
            continue
        for a in args:
            if a.startswith("--workdir="):
                wd = os.path.realpath(a.split("=", 1)[1])
                if wd == root or wd.startswith(root + os.sep):
                    out.add(wd)
    return out


# Seconds between polls of the running jobs, and from SIGTERM (at the budget's end) to SIGKILL.
POLL_S = 3.0
KILL_AFTER_S = 20.0


def run_jobs(
    jobs: Sequence[tuple[str, list[str], Path, int]],
    parallel: int = 2,
    log=None,
    *,
    root: Path | None = None,
    budget_s: float | None = None,
    grace_s: float = 45.0,
) -> dict:
    """Run (name, command, workdir, total_steps) jobs in order with at most `parallel` trainer processes at once under
    workdirs/experiments (or under `root` when it lies elsewhere), counted across drivers (see live_runs); finished
    ones are skipped, and a job whose workdir is being trained by another process is waited for, not restarted.

    With `budget_s`, no job is launched after budget_s seconds; jobs still running at budget_s + grace_s get SIGTERM
    (the trainer saves a checkpoint at the next step and stops, so a rerun resumes them) and SIGKILL KILL_AFTER_S
    later, so that the whole call ends within about budget_s + grace_s + KILL_AFTER_S (plus a checkpoint write).

    Each workdir gets driver.log (the trainer's stdout/stderr) and driver.json (command, wall seconds, return code,
    the machine). Wall time is of the whole process (import + compile + train + eval + checkpoints), on a machine
    shared with the other runs. Returns {"finished": [...], "failed": [...], "stopped": [...], "not_started": [...]}.
    """
    log = log or (lambda msg: print(time.strftime("%H:%M:%S"), msg, flush=True))
    # A root inside workdirs/experiments shares the slots with every driver there; one elsewhere counts its own runs.
    shared = Path(os.path.realpath(EXPERIMENTS_ROOT))
    if root is None or shared in (Path(os.path.realpath(root)), *Path(os.path.realpath(root)).parents):
        root = shared
    t0 = time.time()
    outcome = {"finished": [], "failed": [], "stopped": [], "not_started": []}
    machine = hardware(with_jax=False)
    pending = []
    for job in jobs:
        if is_done(job[2], job[3]):
            log(f"[skip] {job[0]}: finished in {job[2]}")
        else:
            pending.append(job)
    running: list[tuple[str, subprocess.Popen, Path, float, list[str]]] = []
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device per run, as the trainer's runlocal configs expect
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Several trainer processes share one accelerator: JAX's default preallocation (75% of its memory per process)
    # would fail every process after the first.
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    stopping: dict[Path, float] = {}  # workdir -> when SIGTERM was sent
    while pending or running:
        elapsed = time.time() - t0
        if budget_s is not None and elapsed >= budget_s and pending:
            log(f"[budget] {elapsed:.0f} s >= {budget_s:.0f} s: {len(pending)} runs not started: "
                + ", ".join(j[0] for j in pending))
            outcome["not_started"] += [j[0] for j in pending]
            pending.clear()
        if budget_s is not None and elapsed >= budget_s + grace_s:
            for name, proc, wd, _, _ in running:
                if wd not in stopping:
                    log(f"[budget] SIGTERM {name} at {elapsed:.0f} s")
                    proc.terminate()
                    stopping[wd] = time.time()
                elif time.time() - stopping[wd] >= KILL_AFTER_S and proc.poll() is None:
                    log(f"[budget] SIGKILL {name}")
                    proc.kill()
        live = live_runs(root)
        for job in list(pending):
            if len(live) >= parallel:
                break
            name, cmd, wd, steps = job
            if os.path.realpath(wd) in live:  # another driver (or an orphan) is training it: wait for it
                continue
            pending.remove(job)
            if is_done(wd, steps):
                log(f"[skip] {name}: finished in {wd}")
                continue
            wd.mkdir(parents=True, exist_ok=True)
            log(f"[start] {name}: {' '.join(cmd)}")
            logf = open(wd / "driver.log", "a")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
            running.append((name, proc, wd, time.time(), cmd))
            live.add(os.path.realpath(wd))
        if not pending and not running:
            break
        time.sleep(POLL_S)
        for item in list(running):
            name, proc, wd, start, cmd = item
            if proc.poll() is None:
                continue
            running.remove(item)
            wall = time.time() - start
            prev = _read_json(wd / "driver.json")
            # A resumed run adds to the wall time of its earlier attempts.
            record = {
                "command": " ".join(cmd),
                "returncode": proc.returncode,
                "wall_seconds": wall + (prev.get("wall_seconds", 0.0) if prev else 0.0),
                "attempts": (prev.get("attempts", 0) if prev else 0) + 1,
                "finished": time.time(),
                "stopped_by_budget": wd in stopping,
                "hardware": machine,
            }
            write_json(wd / "driver.json", record)
            if wd in stopping:
                status, key = "stopped", "stopped"
            elif proc.returncode == 0:
                status, key = "done", "finished"
            else:
                status, key = f"FAILED rc={proc.returncode}", "failed"
            outcome[key].append(name)
            log(f"[{status}] {name}: {wall:.0f} s")
    return outcome


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def hardware(with_jax: bool = True) -> dict:
    """The machine: CPU, load average (how shared it was), GPUs (nvidia-smi) and, with_jax, JAX's device kind.

    run_jobs records it without importing JAX: a driver holding the accelerator would take memory from its runs."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["gpus"] = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if not with_jax:
        return info
    try:
        import jax

        info["jax"] = jax.__version__
        info["device"] = str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001 - hardware info is best effort
        pass
    return info


def run_hardware(workdirs: Iterable[Path]) -> list[dict]:
    """The distinct machines (run_jobs's driver.json records, load average left out) the runs in `workdirs` ran on."""
    out = []
    for wd in workdirs:
        driver = _read_json(Path(wd) / "driver.json") or {}
        machine = {k: v for k, v in (driver.get("hardware") or {}).items() if k != "load_average"}
        if machine and machine not in out:
            out.append(machine)
    return out


# Per workdir, what aggregation reads (the trainer's metrics and resolved config, the driver's record and log):
# small files, so a sweep run on a remote machine comes back without its checkpoints.
SMALL_FILES = ("metrics.jsonl", "config.json", "driver.json", "driver.log")


def pack(workdirs: Iterable[Path], archive: Path, names: Sequence[str] = SMALL_FILES) -> int:
    """<archive> (.tar.gz): the SMALL_FILES of each workdir that exists, as <workdir name>/<file>; unpack with
    `tar xzf <archive> -C <dir>` and aggregate with --root <dir>. Returns the number of files."""
    count = 0
    Path(archive).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for wd in map(Path, workdirs):
            for name in names:
                if (wd / name).is_file():
                    tar.add(wd / name, arcname=f"{wd.name}/{name}")
                    count += 1
    return count


# ---------------------------------------------------------------- aggregation


def eval_curve(rows: Iterable[dict], key: str = "eval/accuracy") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of an eval metric; a step logged twice (a resumed run) keeps the last value."""
    by_step = {}
    for r in rows:
        if key in r:
            by_step[int(r["step"])] = float(r[key])
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def param_count(workdir: Path) -> int | None:
    """Parameter count of a run's model, built from its config.json (no checkpoint needed)."""
    cfg = _read_json(Path(workdir) / "config.json")
    if not cfg:
        return None
    try:
        from flax import nnx

        from gateloop_jax.models import build_model
        from gateloop_jax.models.config import ModelConfig
        from gateloop_jax.models.lm import param_count as count

        model = build_model(ModelConfig.from_mapping(cfg["model"]), rngs=nnx.Rngs(0))
        return int(count(model))
    except Exception:  # noqa: BLE001 - a missing count should not stop the table
        return None


def summarize_runs(groups: Mapping[str, Sequence[Path]], count_params: bool = True) -> dict:
    """Per group (a model/variant): per-run final eval accuracy, curve, wall time; mean ± std over the runs.

    Runs without any evaluation are listed as missing; a run that has not reached its last step counts with what it
    has, flagged `complete: False`.
    """
    out = {"models": {}}
    for name, workdirs in groups.items():
        runs, missing = [], []
        for wd in workdirs:
            rows = read_metrics(wd)
            steps, acc = eval_curve(rows)
            if not len(steps):
                missing.append(str(Path(wd).name))
                continue
            cfg = _read_json(Path(wd) / "config.json") or {}
            total = cfg.get("total_steps")
            driver = _read_json(Path(wd) / "driver.json") or {}
            if "wall_seconds" not in driver and (Path(wd) / "config.json").exists() and "time" in rows[-1]:
                # No driver record (launched by hand): from the resolved config's write to the last metric.
                driver["wall_seconds"] = float(rows[-1]["time"]) - (Path(wd) / "config.json").stat().st_mtime
            _, loss = eval_curve(rows, "eval/loss")
            runs.append(
                {
                    "workdir": str(Path(wd).relative_to(ROOT))
                    if Path(wd).is_absolute() and ROOT in Path(wd).parents
                    else str(wd),
                    "seed": cfg.get("seed"),
                    "final_step": int(steps[-1]),
                    "total_steps": total,
                    "complete": total is not None and int(steps[-1]) == int(total),
                    "final_accuracy": float(acc[-1]),
                    "final_eval_loss": float(loss[-1]) if len(loss) else None,
                    "best_accuracy": float(acc.max()),
                    "wall_seconds": driver.get("wall_seconds"),
                    "steps": steps.tolist(),
                    "accuracy": acc.tolist(),
                }
            )
        finals = np.array([r["final_accuracy"] for r in runs])
        walls = [r["wall_seconds"] for r in runs if r["wall_seconds"] is not None]
        out["models"][name] = {
            "num_runs": len(runs),
            "missing": missing,
            "final_accuracy_mean": float(finals.mean()) if len(finals) else None,
            "final_accuracy_std": float(finals.std(ddof=0)) if len(finals) else None,
            "final_accuracy_min": float(finals.min()) if len(finals) else None,
            "final_accuracy_max": float(finals.max()) if len(finals) else None,
            "wall_seconds_mean": float(np.mean(walls)) if walls else None,
            "params": param_count(workdirs[0]) if (count_params and workdirs) else None,
            "runs": runs,
        }
    return out


def _fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def markdown_table(summary: dict, labels: Mapping[str, str] | None = None, title: str | None = None) -> str:
    """The final-accuracy table (mean ± std over seeds: population std, ddof=0) as Markdown."""
    labels = labels or {}
    lines = [f"## {title}", ""] if title else []
    lines += [
        "| model | params | runs (seeds) | final eval accuracy (mean ± std) | min / max | wall time per run (s) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, m in summary["models"].items():
        seeds = ",".join(str(r["seed"]) for r in m["runs"])
        incomplete = [r for r in m["runs"] if not r["complete"]]
        note = f" ({len(incomplete)} unfinished)" if incomplete else ""
        if m["missing"]:
            note += f" (missing: {', '.join(m['missing'])})"
        lines.append(
            f"| {labels.get(name, name)} | {_fmt(m['params'], ',')} | {m['num_runs']} ({seeds}){note} | "
            f"{_fmt(m['final_accuracy_mean'], '.3f')} ± {_fmt(m['final_accuracy_std'], '.3f')} | "
            f"{_fmt(m['final_accuracy_min'], '.3f')} / {_fmt(m['final_accuracy_max'], '.3f')} | "
            f"{_fmt(m['wall_seconds_mean'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(
    summary: dict, path: Path, labels: Mapping[str, str] | None = None, title: str = "", chance: float | None = 0.1
) -> None:
    """Eval accuracy vs step, one line per model (mean over its runs), the seed spread (min..max) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, m in summary["models"].items():
        runs = m["runs"]
        if not runs:
            continue
        # Runs of one model share the eval steps; an unfinished run is cut to the common prefix.
        n = min(len(r["steps"]) for r in runs)
        steps = np.array(runs[0]["steps"][:n])
        acc = np.array([r["accuracy"][:n] for r in runs])
        (line,) = ax.plot(steps, acc.mean(0), marker="o", ms=3, label=f"{labels.get(name, name)} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(steps, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="gray", ls=":", lw=1, label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("eval accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def config_of_command(cmd: Sequence[str]):
    """The locked config a trainer command line would train, parsed by the same absl config flag as main.py
    (`--config=path:arg` plus every `--config.<field>=<value>`; an unknown field or a bad value is an error), and its
    model section validated through ModelConfig. Nothing is trained: for tests and dry runs of the drivers."""
    from absl import flags
    from ml_collections import config_flags

    from gateloop_jax.models.config import ModelConfig

    args = ["trainer"] + [a for a in cmd if a.startswith("--config")]
    values = flags.FlagValues()
    # The overrides are read from the argv given here (by default the config flag reads sys.argv).
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, lock_config=True, sys_argv=args)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)  # config paths are relative to the repository root, as the drivers run the trainer there
        values(args)
        config = values.config
    finally:
        os.chdir(cwd)
    model = config.model.to_dict()
    model["vocab_size"] = model.get("vocab_size") or 16  # filled in from the data by the trainer
    ModelConfig.from_mapping(model)
    return config
