"""Benchmark of the GateLoop computation modes: the op and the whole GateLoop layer, forward and forward+backward.

    python experiments/bench_modes.py --out experiments/results            # `make bench`: the full grid
    python experiments/bench_modes.py --out /tmp/b --tokens 256 --lengths 16,32 --heads 2 --d_head 8 --d_model 8 \
        --isolate none                                                       # what tests/bench_test.py runs (CPU)

Grid: lengths 512..16384 at a fixed number of tokens per batch (batch = tokens / length, 32768 by default), two
settings - "multihead" (8 heads, d_qk = d_v = 64) and "maxheaded" (heads = d_model = 512, d_qk = d_v = 1) - every mode
of gateloop_jax.ops.MODES and ops.KERNEL_MODES plus "auto" (a mode added there is picked up), bf16 and float32 inputs,
scope "op" (gateloop_jax.ops.gateloop) and "layer" (gateloop_jax.layers.GateLoopMixer, d_model 512). Peers in the
same run: causal softmax attention of the same shape through jax.nn.dot_product_attention (implementation "cudnn"
and "xla"; for the layer, the CausalSelfAttention layer), and jax-linear-attention / fla when importable (else
reported as skipped with the reason): jla_gla (jla's Mosaic GPU GLA kernel with real gates at key width d_qk, a
different function, timed only; GateLoop through that kernel is the kernel mode "gla_rotation"), and fla's chunk_gla /
chunk_hgrn in a PyTorch child (fla_peers). The transition is complex (|a| in [0.5, 0.9975], phases in [-pi, pi)) and
passed in polar form, float32, as the layer passes it; q, k, v (and the cotangent) are in the benchmark dtype.

Per config: compile time (separately; compiles run `--compile_workers` at a time), median of `--reps` timed runs after
`--warmup` (block_until_ready; with `--pipeline N`, default 5, also the median per call of N calls in flight per
synchronisation, which hides the host's launch gaps as a training loop does), tokens/s, peak device memory, the
memory-bandwidth bound of the op (bytes read and written once at the copy bandwidth measured in the same run), and
the max relative error against `--reference`
(mode "recurrent", in float32 on the same inputs, for GateLoop; the "xla" implementation in float32 for softmax).
A config is never silently dropped: it is measured, or skipped with the reason (XLA's compile-time memory estimate
over the card, too slow for the per-config budget, a compile error, the overall time budget).

Peak memory: JAX has no way to reset the device's peak counter, so each (scope, setting, dtype) group runs in a fresh
process (--isolate group) and its configs run in ascending order of XLA's compile-time estimate of their peak; the row
records device.memory_stats()['peak_bytes_in_use'] after the config and `peak_exact`: true when that reading rose
during this config (so it is this config's own peak), false when an earlier config's peak was higher (the reading is
then only an upper bound). XLA's estimate is recorded beside it.

The code: bench_modes_work.py (what is timed), bench_modes_group.py (one group's timing), bench_modes_peers.py (the
peers, the copy bandwidth); this file is the command line and the parent process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_modes_group import run_group  # noqa: E402
from bench_modes_peers import (  # noqa: E402
    PEER_MODES,
    bandwidth_bound,
    csv,
    fla_peers,
    measure_copy,
    peer_status,
)
from bench_modes_work import key_of, op_fn, op_inputs, setting_dims  # noqa: E402, F401 - op_* used by the tests


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="experiments/results", help="folder for modes.json and modes.md")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens // length)")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--layer_lengths", default="", help="lengths of scope=layer (default: --lengths)")
    p.add_argument("--settings", default="multihead,maxheaded")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--passes", default="fwd,fwdbwd")
    p.add_argument("--scopes", default="op,layer")
    p.add_argument("--modes", default="", help="comma list; default gateloop_jax.ops.MODES + auto; "
                   "mosaic_gpu:VARIANT (op scope) times a variant of ops/pallas_mosaic_gpu.VARIANTS")
    p.add_argument(
        "--peers",
        default="softmax_cudnn,softmax_xla,jla_gla",
        help="peers in the same run (multihead only; the jla_* ones scope op, where `jla` is importable)",
    )
    p.add_argument("--heads", type=int, default=8, help="multihead: number of heads")
    p.add_argument("--d_head", type=int, default=64, help="multihead: d_qk = d_v")
    p.add_argument("--d_model", type=int, default=512, help="maxheaded heads, and the layer's d_model")
    p.add_argument("--chunk_size", type=int, default=None, help="chunk length of mode=chunked (default: the op's)")
    p.add_argument("--reference", default="recurrent", help="mode the errors are measured against")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--gates_file",
        default="",
        help="scope op: log|a| from a trained model (path.npz:layerN, tame_fraction.py --save_gates) tiled "
        "to each shape, instead of the random gates; the kernels' speed depends on the gates",
    )
    p.add_argument(
        "--segment_length",
        type=int,
        default=0,
        help="scope op: pack each row with segments (segment_ids, a state reset at each start) of this "
        "mean length, starts at random (seeded); 0: one segment. Peers are skipped (no resets there)",
    )
    p.add_argument(
        "--pipeline",
        type=int,
        default=5,
        help="also time this many calls in flight per sync (pipelined_median_s); 0: synchronised only",
    )
    p.add_argument(
        "--config_budget_s",
        type=float,
        default=10.0,
        help="skip timing a config whose warm-up + reps would exceed this (estimated from one run)",
    )
    p.add_argument("--budget_s", type=float, default=0.0, help="overall time budget (0: none), shared by the groups")
    p.add_argument("--copy_bytes", type=int, default=4 << 30, help="array size of the copy-bandwidth measurement")
    p.add_argument(
        "--order",
        choices=("memory", "priority"),
        default="memory",
        help="memory: run configs in ascending XLA memory estimate (clean peak readings); priority: "
        "fwdbwd first and --priority_lengths first (what a short time budget should cover)",
    )
    p.add_argument("--priority_lengths", default="1024,8192,4096,2048,512,16384")
    p.add_argument(
        "--compile_workers",
        type=int,
        default=0,
        help="concurrent compiles (0: 4 on GPU, 1 elsewhere); compile_s is measured under this load",
    )
    p.add_argument(
        "--isolate",
        choices=("group", "none"),
        default="group",
        help="group: a fresh process per (scope, setting, dtype) for clean memory statistics",
    )
    p.add_argument("--json", default="modes.json")
    # Internal: one group run as a child process.
    p.add_argument("--_group", default="", help=argparse.SUPPRESS)
    p.add_argument("--_jsonl", default="", help=argparse.SUPPRESS)
    p.add_argument("--_deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--_skip", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args._group:
        deadline = args._deadline or 0.0

        def emit(obj):
            with open(args._jsonl, "a") as f:
                f.write(json.dumps(obj, default=bc._json_default) + "\n")

        skip = set(csv(args._skip))
        # Deadlines travel as seconds-from-now: the clocks of parent and child (perf_counter) do not compare.
        run_group(args, args._group, emit, skip, time.perf_counter() + deadline if deadline else 0.0)
        return
    if args._jsonl == "copy":
        print(json.dumps(measure_copy(args), default=bc._json_default))
        return
    if args._jsonl == "fla":
        print(json.dumps(fla_peers(args), default=bc._json_default))
        return

    start = time.perf_counter()
    out_path = os.path.join(args.out, args.json)
    os.makedirs(args.out, exist_ok=True)
    command = os.environ.get("BENCH_COMMAND") or bc.command_line()
    result = {
        "benchmark": "modes",
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "peers": peer_status(),
        "records": [],
        "notes": [
            "time: median of reps timed runs after warm-up, each synchronised with block_until_ready",
            "peak_bytes: device.memory_stats()['peak_bytes_in_use'] after the config, in a fresh process per "
            "(scope, setting, dtype); peak_exact false means an earlier config of that process peaked higher",
            "error: max|out-ref|/max|ref| (max over outputs: y for fwd, y and the input gradients for fwdbwd) "
            "against the reference on the same inputs",
            "compile_s: measured with up to compile_workers compiles in flight",
            "inputs exceed the 60 MB L2 of an H200 at the default sizes, so they are not rotated",
        ],
    }

    # Copy bandwidth (and the environment) from a child, so the parent never holds device memory.
    if args.isolate == "group":
        code, text = bc.run_child(
            [os.path.abspath(__file__), "--_jsonl", "copy", "--copy_bytes", str(args.copy_bytes)], timeout_s=300
        )
        try:
            info = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            info = {"env": {}, "copy_bandwidth": {"skipped": f"child failed ({code}): {text[-500:]}"}}
    else:
        info = measure_copy(args)
    result["env"] = {**info.get("env", {}), "command": command}
    result["copy_bandwidth"] = info["copy_bandwidth"]
    copy_bps = info["copy_bandwidth"].get("bytes_per_s")
    print(f"copy bandwidth: {copy_bps / 1e12 if copy_bps else float('nan'):.3f} TB/s", flush=True)

    groups = [
        f"{scope}:{setting}:{dtype}"
        for scope in csv(args.scopes)
        for dtype in csv(args.dtypes)
        for setting in csv(args.settings)
    ]
    # The op is what the performance targets are stated for: its groups get twice the layer's share of the budget.
    weights = [2.0 if g.startswith("op:") else 1.0 for g in groups]
    records: dict[str, dict] = {}
    for i, group in enumerate(groups):
        remaining = args.budget_s - (time.perf_counter() - start) if args.budget_s else 0.0
        group_budget = remaining * weights[i] / sum(weights[i:]) if args.budget_s else 0.0
        if args.budget_s and group_budget <= 5:
            records[group] = {
                "scope": group.split(":")[0],
                "group_skipped": f"overall time budget (--budget_s {args.budget_s}) spent before group {group}",
            }
            print(f"[{group}] skipped: time budget", flush=True)
            continue
        group_records = (
            run_group_isolated(args, group, group_budget)
            if args.isolate == "group"
            else run_group_inprocess(args, group, group_budget)
        )
        records.update(group_records)
        finish(result, records, copy_bps, out_path, start)  # after every group: a partial run still leaves JSON

    if args.isolate == "group" and result["peers"]["fla"]["status"] == "available":
        code, text = bc.run_child(
            [
                os.path.abspath(__file__),
                "--_jsonl",
                "fla",
                "--lengths",
                args.lengths,
                "--tokens",
                str(args.tokens),
                "--settings",
                args.settings,
                "--heads",
                str(args.heads),
                "--d_head",
                str(args.d_head),
                "--d_model",
                str(args.d_model),
            ],
            timeout_s=300,
        )
        try:
            for rec in json.loads(text.strip().splitlines()[-1]):
                records[key_of(rec)] = rec
        except (ValueError, IndexError):
            result["peers"]["fla"] = {"status": "skipped", "reason": f"fla child failed ({code}): {text[-300:]}"}

    finish(result, records, copy_bps, out_path, start)
    import plot_bench

    table = plot_bench.modes_table(result, lengths=None, passes=("fwdbwd",), scopes=("op",), compact=True)
    with open(os.path.join(args.out, "modes.md"), "w") as f:
        f.write(plot_bench.modes_markdown(result))
    print(table)
    print(f"wrote {out_path} ({len(result['records'])} records) in {result['wall_s']:.0f} s")


def finish(result, records, copy_bps, out_path, start) -> None:
    for rec in records.values():
        if "length" in rec:
            rec.update(bandwidth_bound(rec, copy_bps))
    # Aliases ("auto" -> a concrete mode) take that mode's measurement.
    for rec in records.values():
        if "alias_of" in rec:
            target = records.get(key_of({**rec, "mode": rec["alias_of"]}))
            if target:
                for field, value in target.items():
                    rec.setdefault(field, value)
    result["records"] = list(records.values())
    result["wall_s"] = time.perf_counter() - start
    bc.write_json(out_path, result)


def run_group_isolated(args, group: str, budget: float) -> dict[str, dict]:
    """Run a group in a child process; if the child dies, record the config it died on and resume after it."""
    import tempfile

    records: dict[str, dict] = {}
    crashed: set[str] = set()
    jsonl = tempfile.mktemp(suffix=".jsonl", prefix="bench_modes_")
    t0 = time.perf_counter()
    for attempt in range(3):
        left = budget - (time.perf_counter() - t0) if budget else 0.0
        if budget and left <= 5:
            break
        argv = [os.path.abspath(__file__), "--_group", group, "--_jsonl", jsonl]
        argv += _public_argv(args)
        argv += ["--_deadline", str(left), "--_skip", ",".join(sorted(set(records) | crashed))]
        code, text = bc.run_child(argv, timeout_s=(left + 120) if budget else 3600, log_prefix="  ")
        started = set()
        if os.path.exists(jsonl):
            with open(jsonl) as f:
                for line in f:
                    obj = json.loads(line)
                    if "record" in obj:
                        records[obj["key"]] = obj["record"]
                    elif obj.get("started"):
                        started.add(obj["key"])
            os.remove(jsonl)
        if code == 0:
            break
        lost = started - set(records)
        for k in lost:
            scope, setting, dtype, length, mode, pass_ = k.split("/")
            records[k] = {
                "scope": scope,
                "setting": setting,
                "dtype": dtype,
                "length": int(length),
                "mode": mode,
                "pass": pass_,
                "kind": "peer" if mode in PEER_MODES else "gateloop",
                "skipped": f"process died running it (exit {code}): {text.strip()[-300:]}",
            }
        crashed |= lost
        if not lost:
            records[f"{group}/child"] = {"group_skipped": f"group child failed (exit {code}): {text.strip()[-500:]}"}
            break
    return records


def _public_argv(args) -> list[str]:
    """The parsed public flags, re-spelled for a child process."""
    out = []
    for name, value in vars(args).items():
        if name.startswith("_") or value is None:
            continue
        out += [f"--{name}", str(value)]
    return out


def run_group_inprocess(args, group: str, budget: float) -> dict[str, dict]:
    records: dict[str, dict] = {}

    def emit(obj):
        if "record" in obj:
            records[obj["key"]] = dict(obj["record"])

    run_group(args, group, emit, set(), time.perf_counter() + budget if budget else 0.0)
    return records


if __name__ == "__main__":
    main()
