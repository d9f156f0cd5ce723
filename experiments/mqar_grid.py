r"""MQAR at the Zoology standard (Arora et al. 2023, Figure 2): eval accuracy against model width, one panel per
(sequence length L, key-value pairs K), for GateLoop, its ablations, linear attention and a Transformer, each cell the
best of a small learning-rate sweep. Meant for an accelerator (one H100 runs about 8-10 of these trainers at once).

    python experiments/mqar_grid.py run --parallel 10 --budget_s 480   # resumable: finished runs are skipped
    python experiments/mqar_grid.py pack --to grid.tar.gz              # metrics + configs + driver records only
    python experiments/mqar_grid.py aggregate                          # -> experiments/results/mqar_grid.{json,md,png}

Grid: (L, K) in LK x d_model in D_MODELS x VARIANTS x LRS, 4 heads at every width (d_qk = d_v = d_model / 4). Each run
is the trainer CLI on the full-size `configs/mqar.py:variant=V` (vocabulary 8192, 2 layers, batch 64, whatever model
defaults that config ships) with `--config.data.seq_len=L --config.data.num_kv_pairs=K --config.model.d_model=D
--config.optimizer.learning_rate=LR --config.total_steps=S` and the cadence derived from S (WARMUP_FRACTION, evaluation
every S/10, one checkpoint at the end), in <root>/L<L>_K<K>_d<D>_<variant>_lr<LR>. The run order puts the issue's cell
(L=256, K=16, d_model 128) first for every variant, so a grid cut short by --budget_s still answers the main question.
`--size test` is the same driver at the config's two-step test size (for tests/experiments_test.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import results_common as cr  # noqa: E402

CONFIG = "configs/mqar.py"
# Zoology's Figure 2 settings: K grows with L, so the pairs take the same share of every sequence.
LK = ((64, 4), (128, 8), (256, 16), (512, 32))
D_MODELS = (64, 128, 256)
VARIANTS = ("gateloop", "real", "fixed", "linear_attention", "transformer")
LRS = (1e-3, 3e-3)
# The same head layout at every width, as in Zoology: the recurrent state then grows as d_model^2.
NUM_HEADS = 4
# configs/mqar.py's own schedule: at the cell the recurrences need 7k-18k steps (results/mqar_full_h100.md).
TOTAL_STEPS = 20000
WARMUP_FRACTION = 0.05
# The full-size setting: run first for every variant.
FIRST_CELL = (256, 16, 128)

# The config size (its arg) and the grid's defaults at that size. `test` is a few seconds of CPU per run.
SIZES = {
    "full": {"arg": "", "lk": LK, "d_models": D_MODELS, "steps": TOTAL_STEPS, "stem": "mqar_grid"},
    "test": {"arg": ",test", "lk": ((16, 2),), "d_models": (16,), "steps": 2, "stem": "mqar_grid_test"},
}
LABELS = {
    "gateloop": "GateLoop (data-controlled)", "real": "real-only (phase 0)", "fixed": "fixed transition",
    "linear_attention": "linear attention (a = 1)", "transformer": "Transformer (softmax)",
}


def state_size(variant: str, seq_len: int, d_model: int, num_heads: int = NUM_HEADS) -> int:
    """Real numbers the token mixer of one layer carries from token to token: a complex d_qk x d_v matrix per head for
    GateLoop and the fixed transition, a real one for real-only and linear attention; the Transformer's KV cache
    (keys and values of every position) at the end of a length-L sequence."""
    d_qk = d_v = d_model // num_heads
    if variant in ("gateloop", "fixed"):
        return 2 * num_heads * d_qk * d_v
    if variant in ("real", "linear_attention"):
        return num_heads * d_qk * d_v
    if variant == "transformer":
        return 2 * seq_len * d_model
    raise ValueError(f"state_size: variant={variant!r} is not one of {VARIANTS}.")


def run_name(seq_len: int, kv: int, d_model: int, variant: str, lr: float) -> str:
    return f"L{seq_len}_K{kv}_d{d_model}_{variant}_lr{lr:g}"


def cadence(steps: int, eval_every: int | None = None) -> dict:
    """Warm-up, evaluation and checkpoint cadence of a `steps`-step run (evaluation every steps / 10 by default)."""
    return {
        "optimizer.warmup_steps": max(1, round(WARMUP_FRACTION * steps)),
        "eval_every_steps": eval_every or max(1, steps // 10),
        # One checkpoint, at the end (and on SIGTERM, when the budget runs out): little disk for ~100 runs.
        "ckpt_every_steps": steps,
    }


def command(args, seq_len: int, kv: int, d_model: int, variant: str, lr: float) -> list[str]:
    overrides = {
        "seed": args.seed,
        "data.seq_len": seq_len,
        "data.num_kv_pairs": kv,
        "model.d_model": d_model,
        "model.num_heads": NUM_HEADS,
        "optimizer.learning_rate": lr,
        "total_steps": args.steps,
        **cadence(args.steps, args.eval_every),
        "progress_bar": False,
    }
    config = f"{CONFIG}:variant={variant}{SIZES[args.size]['arg']}"
    return cr.trainer_command(config, Path(args.root) / run_name(seq_len, kv, d_model, variant, lr), overrides)


def grid(args) -> list[tuple[int, int, int, str, float]]:
    """(L, K, d_model, variant, lr) in run order: FIRST_CELL for every variant at the first lr, then by (L, K),
    d_model, variant, lr."""
    cells = [(L, K, D, v, lr) for L, K in args.lk for D in args.d_models for v in args.variants for lr in args.lrs]
    first = [c for c in cells if c[:3] == FIRST_CELL and c[4] == args.lrs[0]]
    return first + [c for c in cells if c not in first]


def run(args) -> dict:
    jobs = [(run_name(*c), command(args, *c), Path(args.root) / run_name(*c), args.steps) for c in grid(args)]
    return cr.run_jobs(jobs, parallel=args.parallel, root=Path(args.root), budget_s=args.budget_s,
                       grace_s=args.grace_s)


def aggregate(args) -> dict:
    """Every run of the selected grid found under --root (metrics.jsonl + config.json + driver.json; no checkpoint),
    the best learning rate per cell, the table and the figure. Cells without an evaluation are "not run"."""
    runs = []
    for c in grid(args):
        wd = Path(args.root) / run_name(*c)
        summary = cr.summarize_runs({"run": [wd]}, count_params=False)["models"]["run"]
        if not summary["runs"]:
            continue
        r = summary["runs"][0]
        driver = cr._read_json(wd / "driver.json") or {}
        L, K, D, v, lr = c
        runs.append({
            "name": run_name(*c), "seq_len": L, "num_kv_pairs": K, "d_model": D, "variant": v, "learning_rate": lr,
            "state_size": state_size(v, L, D), **{k: r[k] for k in ("final_step", "total_steps", "complete",
                                                                     "final_accuracy", "final_eval_loss",
                                                                     "best_accuracy", "wall_seconds", "steps",
                                                                     "accuracy")},
            "returncode": driver.get("returncode"), "stopped_by_budget": driver.get("stopped_by_budget"),
            "command": driver.get("command") or " ".join(command(args, *c)),
        })
    cells = {}
    for r in runs:
        key = (r["seq_len"], r["num_kv_pairs"], r["d_model"], r["variant"])
        cells.setdefault(key, []).append(r)
    best = []
    for (L, K, D, v), rs in cells.items():
        top = max(rs, key=lambda r: r["final_accuracy"])
        best.append({
            "seq_len": L, "num_kv_pairs": K, "d_model": D, "variant": v, "state_size": state_size(v, L, D),
            "accuracy": top["final_accuracy"], "learning_rate": top["learning_rate"], "complete": top["complete"],
            "final_step": top["final_step"], "params": cr.param_count(Path(args.root) / top["name"]),
            "by_learning_rate": {f"{r['learning_rate']:g}": r["final_accuracy"] for r in rs},
            "all_complete": all(r["complete"] for r in rs), "lrs_run": len(rs), "lrs_planned": len(args.lrs),
        })
    setting = SIZES[args.size]
    summary = {
        "task": "mqar_grid",
        "setting": {
            "config": f"{CONFIG}:variant=<v>{setting['arg']}", "size": args.size, "total_steps": args.steps,
            **cadence(args.steps, args.eval_every), "seed": args.seed, "num_heads": NUM_HEADS,
            "lk": [list(x) for x in args.lk], "d_models": list(args.d_models), "variants": list(args.variants),
            "learning_rates": list(args.lrs), "root": str(args.root), "labels": LABELS,
            "accuracy": "final eval/accuracy (query positions); a cell is the best final accuracy over its lrs",
            "state_size": "real numbers per layer carried between tokens (complex counts 2; Transformer: KV cache "
                          "2 L d_model)",
            "hardware": cr.run_hardware(Path(args.root) / r["name"] for r in runs),
            "aggregated_on": cr.hardware(with_jax=False),
        },
        "cells": best,
        "runs": runs,
    }
    stem = setting["stem"]
    cr.write_summary(stem, summary, tables(summary, args), out=Path(args.out))
    plot(summary, args, Path(args.out) / f"{stem}.png")
    return summary


def _cell(summary: dict, L: int, D: int, v: str):
    return next((c for c in summary["cells"] if (c["seq_len"], c["d_model"], c["variant"]) == (L, D, v)), None)


def tables(summary: dict, args) -> str:
    """One table per L: rows variants, columns d_model, the best final accuracy and its learning rate."""
    s = summary["setting"]
    lines = [
        "# MQAR grid (Zoology Figure 2 protocol)", "",
        f"`{s['config']}`, {s['total_steps']} steps, {NUM_HEADS} heads, seed {s['seed']}; a cell is the best final "
        f"eval accuracy over learning rates {', '.join(f'{lr:g}' for lr in s['learning_rates'])} (its lr in "
        "brackets). `*`: the best run did not reach its last step (budget); `(n/m lr)`: only n of the m learning "
        "rates ran. State: real numbers per layer carried between tokens, at d_model "
        + " / ".join(str(d) for d in args.d_models) + ".", "",
    ]
    for L, K in args.lk:
        lines += [f"## L = {L}, K = {K}", "",
                  "| model | " + " | ".join(f"d_model {d}" for d in args.d_models) + " | state per layer |",
                  "|---|" + "---:|" * len(args.d_models) + "---:|"]
        for v in args.variants:
            cells = []
            for D in args.d_models:
                c = _cell(summary, L, D, v)
                if c is None:
                    cells.append("not run")
                    continue
                note = "" if c["complete"] else "*"
                if c["lrs_run"] < c["lrs_planned"]:
                    note += f" ({c['lrs_run']}/{c['lrs_planned']} lr)"
                cells.append(f"{c['accuracy']:.3f}{note} ({c['learning_rate']:g})")
            states = " / ".join(f"{state_size(v, L, D):,}" for D in args.d_models)
            lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(cells) + f" | {states} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, args, path: Path) -> None:
    """Zoology's Figure 2 layout: one panel per (L, K), best accuracy against d_model, a line per variant; hollow
    markers for cells whose best run did not finish."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.lk), figsize=(3.6 * len(args.lk) + 1, 3.6), sharey=True, squeeze=False)
    for ax, (L, K) in zip(axes[0], args.lk):
        for i, v in enumerate(args.variants):
            pts = [(D, _cell(summary, L, D, v)) for D in args.d_models]
            pts = [(D, c) for D, c in pts if c is not None]
            if not pts:
                continue
            ax.plot([D for D, _ in pts], [c["accuracy"] for _, c in pts], color=f"C{i}", label=LABELS.get(v, v))
            for D, c in pts:
                ax.plot(D, c["accuracy"], "o", color=f"C{i}", mfc=f"C{i}" if c["complete"] else "none")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(args.d_models))
        ax.set_xticklabels([str(d) for d in args.d_models])
        ax.set_title(f"L = {L}, K = {K}", fontsize=10)
        ax.set_xlabel("model dimension")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR eval accuracy (best lr)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"MQAR, {summary['setting']['total_steps']} steps, {NUM_HEADS} heads (hollow: unfinished)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lk(text: str) -> tuple[int, int]:
    try:
        seq_len, kv = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lk {text!r}: expected L,K (e.g. 256,16)") from None
    return seq_len, kv


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("run", "aggregate", "pack", "all"))
    p.add_argument("--size", choices=tuple(SIZES), default="full", help="the config's size (test: CPU, seconds)")
    p.add_argument("--parallel", type=int, default=2, help="trainer processes at once (about 8-10 on one H100)")
    p.add_argument("--steps", type=int, default=None, help=f"steps per run (default {TOTAL_STEPS}; test size 2)")
    p.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--lk", nargs="+", type=_lk, default=None, help="(L,K) cells, e.g. --lk 64,4 256,16")
    p.add_argument("--d_models", nargs="+", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_every", type=int, default=None, help="evaluation cadence (default steps / 10)")
    p.add_argument("--out", type=Path, default=cr.RESULTS, help="where aggregate writes <stem>.{json,md,png}")
    p.add_argument("--to", type=Path, default=None, help="pack: the archive to write (.tar.gz)")
    cr.add_run_options(p, default_root=None)
    args = p.parse_args(argv)
    size = SIZES[args.size]
    args.steps = args.steps or size["steps"]
    args.lk = [tuple(x) for x in (args.lk or size["lk"])]
    args.d_models = list(args.d_models or size["d_models"])
    args.root = args.root or cr.workroot(size["stem"])
    for d in args.d_models:
        if d % NUM_HEADS:
            p.error(f"--d_models {d}: must be divisible by the {NUM_HEADS} heads (d_qk = d_model / {NUM_HEADS})")
    if args.action == "pack" and args.to is None:
        p.error("pack needs --to FILE.tar.gz")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.action in ("run", "all"):
        run(args)
    if args.action == "pack":
        count = cr.pack((Path(args.root) / run_name(*c) for c in grid(args)), args.to)
        print(f"{count} files from {args.root} -> {args.to}")
    if args.action in ("aggregate", "all"):
        aggregate(args)


if __name__ == "__main__":
    main()
