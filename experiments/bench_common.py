"""Shared pieces of the benchmarks: timing, compilation, device memory statistics, the environment record.

Every benchmark in experiments/ measures the same way (the device README's METHOD.md):
  * compile ahead of time (jit(...).lower(...).compile()), compile time reported on its own;
  * warm-up runs, then >= 10 timed runs, each synchronised with block_until_ready; the median is the figure;
  * inputs drawn at random on the device (never zeros); a correctness check in the same run;
  * peak memory read from the device's own statistics (device.memory_stats()['peak_bytes_in_use']).
JAX cannot reset the peak counter, so a process's peak is the maximum over everything it ran; bench_modes.py runs
configs in ascending order of XLA's compile-time estimate and says per row whether the reading is exact.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Datasheet dense bf16 matrix rate of an H100/H200 SXM (FLOP/s). MFU is also reported against the rate measured in
# the same run (bench_train.py), which is the ceiling actually reachable on the card.
H200_BF16_PEAK_FLOPS = 989.4e12


def configure_jax_memory() -> None:
    """Allocate on demand rather than grabbing 75% of the card up front. Must run before jax is imported.

    With preallocation the allocator's pool is reserved at start, but peak_bytes_in_use still counts only live
    buffers; on-demand growth lets a parent and its child processes share the card and lets the largest configs
    use up to 95% of it.
    """
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def git_commit() -> str:
    """HEAD of the repository (with '-dirty' when the tree differs), or $BENCH_GIT_COMMIT where .git is absent
    (the device machine receives a copy of the working tree, not always the repository)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("BENCH_GIT_COMMIT", "unknown")


def command_line() -> str:
    return " ".join(
        shlex.quote(a)
        for a in [os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO) else "python"]
        + [os.path.relpath(sys.argv[0], REPO)]
        + sys.argv[1:]
    )


def env_record(command: str | None = None) -> dict[str, Any]:
    """Device, versions, commit and command: what every result file starts with."""
    import jax
    import jaxlib

    device = jax.devices()[0]
    record = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or os.environ.get("BENCH_COMMAND") or command_line(),
        "git_commit": git_commit(),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "host": platform.machine(),
    }
    try:
        import flax

        record["flax"] = flax.__version__
    except ImportError:
        pass
    stats = memory_stats()
    if stats.get("bytes_limit"):
        record["device_memory_limit_bytes"] = stats["bytes_limit"]
    return record


def memory_stats() -> dict[str, int]:
    """The first device's allocator statistics ({} where the backend keeps none, e.g. some CPU builds)."""
    import jax

    try:
        return dict(jax.devices()[0].memory_stats() or {})
    except Exception:  # noqa: BLE001 - backends without statistics raise various errors
        return {}


def block(tree):
    import jax

    return jax.block_until_ready(tree)


def compile_fn(fn: Callable, abstract_args: Sequence, *, donate_argnums=()) -> tuple[Any, float, dict[str, int]]:
    """jit(fn).lower(*abstract_args).compile(): (executable, seconds, XLA's memory analysis in bytes)."""
    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*abstract_args).compile()
    seconds = time.perf_counter() - start
    analysis = {}
    try:
        mem = compiled.memory_analysis()
        for field in (
            "argument_size_in_bytes",
            "output_size_in_bytes",
            "temp_size_in_bytes",
            "alias_size_in_bytes",
            "generated_code_size_in_bytes",
        ):
            analysis[field] = int(getattr(mem, field, 0) or 0)
        analysis["estimated_peak_bytes"] = (
            analysis["argument_size_in_bytes"]
            + analysis["output_size_in_bytes"]
            + analysis["temp_size_in_bytes"]
            - analysis["alias_size_in_bytes"]
        )
    except Exception:  # noqa: BLE001 - memory_analysis is unavailable on some backends
        pass
    return compiled, seconds, analysis


def compile_many(jobs: dict[Any, tuple[Callable, Sequence]], workers: int, deadline: float = 0.0) -> dict[Any, tuple]:
    """Compile several functions concurrently (XLA compiles outside the GIL), in the order of `jobs`. Value per key:
    (executable, seconds, analysis) or the exception raised; a job not started by `deadline` (time.perf_counter())
    gets a TimeoutError. Compile seconds are measured with up to `workers` compiles in flight."""
    results: dict[Any, tuple] = {}

    def one(key):
        if deadline and time.perf_counter() > deadline:
            return key, TimeoutError("overall time budget (--budget_s) spent before this config compiled")
        fn, args = jobs[key]
        try:
            return key, compile_fn(fn, args)
        except Exception as err:  # noqa: BLE001 - reported per config as a skip reason
            return key, err

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for key, value in pool.map(one, list(jobs)):
            results[key] = value
    return results


def time_calls(
    call: Callable[[], Any], *, warmup: int, reps: int, budget_s: float | None = None, pipeline: int = 0
) -> dict[str, Any]:
    """Median wall time of call() synchronised with block_until_ready, after warm-up.

    When budget_s is given, the first warm-up run decides: if warm-up + reps runs would exceed it, timing stops there
    and the result says so (with the one run's time as the estimate) instead of blocking the benchmark.
    pipeline > 0 also times `pipeline` calls in flight per synchronisation ("pipelined_median_s", per call): the
    host's launch gaps then overlap the device's work, as in a training loop; the synchronised figure counts them,
    which matters for ops of a millisecond or less.
    """
    start = time.perf_counter()
    block(call())
    first = time.perf_counter() - start
    total_runs = max(warmup - 1, 0) + reps * (1 + pipeline)
    if budget_s is not None and first * total_runs > budget_s:
        return {
            "skipped": f"too slow: one run took {first:.3g} s, {total_runs} more would take "
            f"{first * total_runs:.3g} s (budget {budget_s:.3g} s per config)",
            "single_run_s": first,
        }
    for _ in range(max(warmup - 1, 0)):
        block(call())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        block(call())
        times.append(time.perf_counter() - start)
    out = {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": times,
        "reps": reps,
        "warmup": warmup,
    }
    if pipeline > 0:
        piped = []
        for _ in range(reps):
            start = time.perf_counter()
            block([call() for _ in range(pipeline)])
            piped.append((time.perf_counter() - start) / pipeline)
        out.update(pipelined_median_s=statistics.median(piped), pipeline=pipeline)
    return out


def time_sync_and_pipelined(fn, args, *, runs: int = 10, reps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Two medians of fn(*args) in ms: "ms_sync", one call per block_until_ready, and "ms", `reps` calls in flight
    per sync (launch gaps hidden, the kernel-to-kernel figure); "ms_min" is the fastest pipelined run."""
    for _ in range(warmup):
        block(fn(*args))
    sync, piped = [], []
    for _ in range(runs):
        start = time.perf_counter()
        block(fn(*args))
        sync.append(time.perf_counter() - start)
    for _ in range(runs):
        start = time.perf_counter()
        block([fn(*args) for _ in range(reps)])
        piped.append((time.perf_counter() - start) / reps)
    return {
        "ms": 1e3 * statistics.median(piped),
        "ms_sync": 1e3 * statistics.median(sync),
        "ms_min": 1e3 * min(piped),
        "runs": runs,
        "reps": reps,
    }


def copy_bandwidth(nbytes: int, *, reps: int = 20) -> dict[str, Any]:
    """Device-memory bandwidth of a large elementwise pass (y = -x, float32): bytes read + bytes written over the
    median time. This is the ceiling the memory-bound ops are held against (METHOD.md: measure it in the same run)."""
    import jax
    import jax.numpy as jnp

    n = max(nbytes // 4, 1024)
    x = jax.jit(lambda key: jax.random.normal(key, (n,), jnp.float32))(jax.random.key(0))
    compiled, _, _ = compile_fn(lambda z: -z, (x,))
    result = time_calls(lambda: compiled(x), warmup=3, reps=reps)  # noqa: F821 - x is deleted below, after use
    y = compiled(x)
    correct = bool(jnp.array_equal(y, -x))
    moved = 2 * n * 4
    del x, y
    return {
        "bytes_moved": moved,
        "median_s": result["median_s"],
        "bytes_per_s": moved / result["median_s"],
        "correct": correct,
        "how": "jit(lambda x: -x) on a float32 array: bytes read + written / median time",
    }


def matmul_rate(n: int, *, reps: int = 10) -> dict[str, Any]:
    """bf16 n x n x n matrix product on random data: FLOP/s (2 n^3 / median time)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    compiled, _, _ = compile_fn(lambda x, y: x @ y, (a, b))
    result = time_calls(lambda: compiled(a, b), warmup=3, reps=reps)
    return {"n": n, "median_s": result["median_s"], "flops_per_s": 2 * n**3 / result["median_s"]}


def max_rel_error(out, ref) -> dict[str, float]:
    """Errors of `out` against `ref` (host arrays or pytrees of them), the worst over the leaves:
    max_rel = max|out - ref| / max|ref| (normwise, so near-zero entries do not blow it up), rel_l2 = |out-ref|/|ref|.
    Non-finite outputs give inf. leaf_max_rel: max_rel of each leaf, in tree order (which output is the worst)."""
    import jax
    import numpy as np

    worst_max, worst_l2, per_leaf = 0.0, 0.0, []
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        o = np.asarray(o, np.float64)
        r = np.asarray(r, np.float64)
        if not np.all(np.isfinite(o)):
            return {"max_rel": float("inf"), "rel_l2": float("inf")}
        scale = max(float(np.max(np.abs(r))), 1e-30)
        per_leaf.append(float(np.max(np.abs(o - r))) / scale)
        worst_max = max(worst_max, per_leaf[-1])
        worst_l2 = max(worst_l2, float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)))
    return {"max_rel": worst_max, "rel_l2": worst_l2, "leaf_max_rel": per_leaf}


def write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
    except ImportError:
        pass
    return str(x)


def run_child(argv: Sequence[str], *, timeout_s: float, log_prefix: str = "") -> tuple[int, str]:
    """Run a Python child (a fresh process: fresh device memory statistics); returns (exit code, last output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        proc = subprocess.run(
            [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
        )
        output = proc.stdout + proc.stderr
        code = proc.returncode
    except subprocess.TimeoutExpired as err:
        output = ((err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")) + (
            (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        )
        code = -9
    log = os.environ.get("BENCH_LOG")
    if log:  # the whole output of every child, for the record (the device call returns only a tail)
        with open(log, "a") as f:
            f.write(f"\n===== {' '.join(argv)} (exit {code})\n{output}")
    if log_prefix:
        for line in output.strip().splitlines()[-5:]:
            print(f"{log_prefix} {line}", flush=True)
    return code, output[-4000:]


def gib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f}"


def model_bench_parser(doc: str, *, json_name: str, dtype_help: str) -> argparse.ArgumentParser:
    """The flags bench_decode.py and bench_train.py share: output, models (name:preset), repetitions, dtype."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default="experiments/results")
    p.add_argument(
        "--models",
        default="gateloop:125m,gateloop:125m_multihead,transformer:125m_multihead",
        help="comma list of name:preset (gateloop_jax.models registry name and preset)",
    )
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", help=f"{dtype_help} (parameters float32)")
    p.add_argument("--json", default=json_name)
    return p


def kernel_part_parser(doc: str, *, json_name: str, forms: Sequence[str]) -> argparse.ArgumentParser:
    """The flags of the kernel_dev benches that time one part of mode mosaic_gpu by form (bench_gate_factors.py,
    bench_backward_kernel.py): output, the shape (tokens, length; 8 heads of 64), repetitions, forms, --smoke."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "experiments/results/kernel_dev"))
    p.add_argument("--json", default=json_name, help="file name under --out")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--forms", default=",".join(forms))
    p.add_argument("--smoke", action="store_true", help="a tiny shape in interpret mode (CPU)")
    return p


def kernel_part_shape(args) -> tuple[int, int, int, int]:
    """(batch, length, heads, d) of kernel_part_parser's flags: batch x length = tokens, 8 heads of 64; --smoke one
    head, two chunks."""
    return (1, 128, 1, 64) if args.smoke else (max(1, args.tokens // args.length), args.length, 8, 64)


# ---------------------------------------------------------------------------------------------------------------
# Learned gates (kernel_dev/tame_fraction.py --save_gates) as benchmark inputs: --gates_file path.npz:layerN


def tile_gates(log_r: np.ndarray, b: int, t: int, h: int, k: int) -> np.ndarray:
    """A (b, t, h, k) log|a| array made of log_r (b0, t0, c0) repeated cyclically along batch, time and channels:
    learned gate statistics at a benchmark's shape (each tile of rows sees the model's own sequences)."""
    import numpy as np

    b0, t0, c0 = log_r.shape
    rows = np.arange(b)[:, None] % b0, np.arange(t)[None, :] % t0
    out = np.asarray(log_r, np.float32)[rows[0], rows[1]]  # (b, t, c0)
    return out[..., np.arange(h * k) % c0].reshape(b, t, h, k)


def load_gates(spec: str) -> np.ndarray:
    """ "path.npz:layerN" (--save_gates) -> that layer's learned log|a|, (b0, t0, channels) float32."""
    import numpy as np

    path, _, layer = spec.partition(":")
    with np.load(path) as f:
        return np.asarray(f[layer or "layer0"], np.float32)
