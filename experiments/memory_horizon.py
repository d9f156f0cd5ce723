r"""Memory horizon: GateLoop against its ablations and a Transformer, same size and step budget, several seeds.

Reproduce (2-core CPU; skips runs whose workdir already holds a finished run, so re-running resumes the sweep):
    python experiments/memory_horizon.py run         # trains every (variant, seed) with the trainer CLI
    python experiments/memory_horizon.py aggregate   # -> experiments/results/memory_horizon.{json,md}, curves PNG
    python experiments/memory_horizon.py transitions # -> experiments/results/memory_horizon_transitions.png
    python experiments/memory_horizon.py all         # the three in order

Each run is `python -m gateloop_jax.main --config configs/memory_horizon.py:variant=V,runlocal --config.seed=S ...`
in workdirs/experiments/memory_horizon/<V>_s<S> (git-ignored); the driver writes driver.json there (command, wall
time, return code). Nothing here forks the trainer: the variants differ only by config overrides (VARIANTS).

`--size full` is the config without runlocal (batch 64, 5000 steps: the accelerator-scale run), in workdirs
<V>_s<S>_full and results memory_horizon_full.{json,md} + _curves.png; with --budget_s and `pack` for a time-limited
remote machine:
    python experiments/memory_horizon.py run --size full --parallel 9 --budget_s 520
    python experiments/memory_horizon.py pack --size full --to mh_full.tar.gz
    python experiments/memory_horizon.py aggregate --size full --root DIR   # DIR: where the archive was unpacked
"""

from __future__ import annotations

import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
# The repository root (configs, gateloop_jax) and experiments/ (the shared helpers), from any working directory.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import results_common as cr  # noqa: E402

WORKROOT = cr.workroot("memory_horizon")
RESULTS = cr.RESULTS
CONFIG = "configs/memory_horizon.py"

# The runlocal size (d_model 32, 2 layers, batch 32) and budget, identical for every variant.
TOTAL_STEPS = 3000
# config arg, default steps, workdir suffix, result stem and the setting's description of each size.
SIZES = {
    "runlocal": {"arg": ",runlocal", "steps": TOTAL_STEPS, "suffix": "", "stem": "memory_horizon",
                 "about": "d_model 32, 2 layers, batch 32"},
    "full": {"arg": "", "steps": 5000, "suffix": "_full", "stem": "memory_horizon_full",
             "about": "d_model 32, 2 layers, batch 64, the config's full size"},
}
# Evaluate more often than the config's 500 for the learning curves (the eval set is fixed, so this changes nothing
# about training).
EVAL_EVERY = 250
SEEDS = (0, 1, 2)

# variant label -> (config arg variant, extra --config overrides). The GateLoop variants share the max-headed layout
# (32 heads, d_qk = d_v = 1). Softmax attention with d_qk = 1 is degenerate (a rank-1 score), so the Transformer uses
# 4 heads of 8: the q/k/v/o projections have the same d_model x d_model shapes; the parameter counts are reported.
VARIANTS = {
    "gateloop": ("gateloop", {}),
    "fixed": ("fixed", {}),
    "real": ("real", {}),
    "linear_attention": ("linear_attention", {}),
    "transformer": ("transformer", {"model.num_heads": 4, "model.d_qk": 8, "model.d_v": 8}),
    # A GateLoop block then an attention block, both 4 heads of 8 (attention needs d_qk >= 2 for RoPE).
    "hybrid": ("hybrid", {"model.num_heads": 4, "model.d_qk": 8, "model.d_v": 8, "model.block_pattern": "ga"}),
}
LABELS = {
    "gateloop": "GateLoop (data-controlled)", "fixed": "fixed transition", "real": "real-only (phase 0)",
    "linear_attention": "linear attention (a = 1)", "transformer": "Transformer",
    "hybrid": "hybrid (GateLoop + attention)",
}


def workdir(variant: str, seed: int, steps: int | None = None, size: str = "runlocal", root: Path = WORKROOT) -> Path:
    # A budget other than the size's (e.g. a longer supplementary run) gets its own workdir.
    s = SIZES[size]
    steps = steps or s["steps"]
    return Path(root) / (f"{variant}_s{seed}" + s["suffix"] + ("" if steps == s["steps"] else f"_steps{steps}"))


def stem(size: str, steps: int) -> str:
    return SIZES[size]["stem"] + ("" if steps == SIZES[size]["steps"] else f"_steps{steps}")


def command(variant: str, seed: int, total_steps: int | None = None, eval_every: int = EVAL_EVERY,
            size: str = "runlocal", root: Path = WORKROOT) -> list[str]:
    arg, overrides = VARIANTS[variant]
    total_steps = total_steps or SIZES[size]["steps"]
    overrides = {
        "seed": seed,
        "total_steps": total_steps,
        "eval_every_steps": eval_every,
        "progress_bar": False,
        **overrides,
    }
    config = f"{CONFIG}:variant={arg}{SIZES[size]['arg']}"
    return cr.trainer_command(config, workdir(variant, seed, total_steps, size, root), overrides)


def _where(args) -> dict:
    return {"size": args.size, "root": args.root}


def run(args) -> dict:
    jobs = [(v, s) for s in args.seeds for v in args.variants]  # seed-major: complete seeds first if time runs out
    name = SIZES[args.size]["suffix"]
    return cr.run_jobs(
        [(f"{v}_s{s}{name}", command(v, s, args.steps, **_where(args)), workdir(v, s, args.steps, **_where(args)),
          args.steps) for v, s in jobs],
        parallel=args.parallel, root=args.root, budget_s=args.budget_s, grace_s=args.grace_s,
    )


def aggregate(args) -> dict:
    groups = {v: [workdir(v, s, args.steps, **_where(args)) for s in args.seeds] for v in args.variants}
    summary = cr.summarize_runs(groups)
    summary["task"] = "memory_horizon"
    summary["setting"] = {
        "config": f"{CONFIG}:variant=<v>{SIZES[args.size]['arg']}",
        "size": args.size,
        "total_steps": args.steps,
        "eval_every_steps": EVAL_EVERY,
        "seeds": list(args.seeds),
        # The CPU-scale runs were aggregated where they ran; remote runs' machines come from their driver records.
        "hardware": (cr.hardware() if args.size == "runlocal"
                     else cr.run_hardware(wd for wds in groups.values() for wd in wds)),
        "labels": LABELS,
        "commands": {v: " ".join(command(v, args.seeds[0], args.steps, **_where(args))) for v in args.variants},
    }
    out = stem(args.size, args.steps)
    title = f"Memory horizon ({args.steps} steps, {SIZES[args.size]['about']})"
    cr.write_summary(out, summary, cr.markdown_table(summary, LABELS, title=title), out=args.out)
    cr.plot_curves(
        summary,
        Path(args.out) / f"{out}_curves.png",
        LABELS,
        title=f"Memory horizon: eval accuracy at QUERY positions, {args.steps} steps\n"
        f"(mean over seeds {','.join(map(str, args.seeds))}; shaded: min..max)",
    )
    return summary


def transitions(args) -> None:
    import transition_plots

    wds = {v: workdir(v, args.seeds[0], **_where(args)) for v in ("gateloop", "fixed", "real")}
    out = SIZES[args.size]["stem"] + "_transitions"
    transition_plots.plot_memory_horizon_transitions(
        {v: wd for v, wd in wds.items() if wd.exists()}, RESULTS / f"{out}.png", RESULTS / f"{out}.json", LABELS
    )


def main(argv=None) -> None:
    p = cr.driver_parser(__doc__, ("run", "aggregate", "transitions", "pack", "all"), seeds=SEEDS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--size", choices=tuple(SIZES), default="runlocal",
                   help="runlocal: the 2-core CPU comparison; full: the config's accelerator size (batch 64)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the size's, 3000 / 5000)")
    p.add_argument("--to", type=Path, default=None, help="pack: the archive to write (.tar.gz)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where aggregate writes its table, JSON and curves")
    cr.add_run_options(p, default_root=WORKROOT)
    args = p.parse_args(argv)
    args.steps = args.steps or SIZES[args.size]["steps"]
    if args.action == "pack" and args.to is None:
        p.error("pack needs --to FILE.tar.gz")
    if args.action == "pack":
        wds = [workdir(v, s, args.steps, **_where(args)) for s in args.seeds for v in args.variants]
        print(f"{cr.pack(wds, args.to)} files from {args.root} -> {args.to}")
    if args.action in ("run", "all"):
        run(args)
    if args.action in ("aggregate", "all"):
        aggregate(args)
    if args.action in ("transitions", "all"):
        transitions(args)


if __name__ == "__main__":
    main()
