r"""Memory horizon: GateLoop against its ablations and a Transformer, same size and step budget, several seeds.

Reproduce (2-core CPU; skips runs whose workdir already holds a finished run, so re-running resumes the sweep):
    python experiments/memory_horizon.py run         # trains every (variant, seed) with the trainer CLI
    python experiments/memory_horizon.py aggregate   # -> experiments/results/memory_horizon.{json,md}, curves PNG
    python experiments/memory_horizon.py transitions # -> experiments/results/memory_horizon_transitions.png
    python experiments/memory_horizon.py all         # the three in order

Each run is `python -m gateloop_jax.main --config configs/memory_horizon.py:variant=V,runlocal --config.seed=S ...`
in workdirs/experiments/memory_horizon/<V>_s<S> (git-ignored); the driver writes driver.json there (command, wall
time, return code). Nothing here forks the trainer: the variants differ only by config overrides (VARIANTS).
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


def workdir(variant: str, seed: int, steps: int = TOTAL_STEPS) -> Path:
    # A budget other than the comparison's (e.g. a longer supplementary run) gets its own workdir.
    return WORKROOT / (f"{variant}_s{seed}" + ("" if steps == TOTAL_STEPS else f"_steps{steps}"))


def command(variant: str, seed: int, total_steps: int = TOTAL_STEPS, eval_every: int = EVAL_EVERY) -> list[str]:
    arg, overrides = VARIANTS[variant]
    overrides = {
        "seed": seed,
        "total_steps": total_steps,
        "eval_every_steps": eval_every,
        "progress_bar": False,
        **overrides,
    }
    return cr.trainer_command(f"{CONFIG}:variant={arg},runlocal", workdir(variant, seed, total_steps), overrides)


def run(args) -> None:
    jobs = [(v, s) for s in args.seeds for v in args.variants]  # seed-major: complete seeds first if time runs out
    cr.run_jobs(
        [(f"{v}_s{s}", command(v, s, args.steps), workdir(v, s, args.steps), args.steps) for v, s in jobs],
        parallel=args.parallel,
    )


def aggregate(args) -> dict:
    summary = cr.summarize_runs({v: [workdir(v, s, args.steps) for s in args.seeds] for v in args.variants})
    summary["task"] = "memory_horizon"
    summary["setting"] = {
        "config": f"{CONFIG}:variant=<v>,runlocal",
        "total_steps": args.steps,
        "eval_every_steps": EVAL_EVERY,
        "seeds": list(args.seeds),
        "hardware": cr.hardware(),
        "labels": LABELS,
        "commands": {v: " ".join(command(v, args.seeds[0], args.steps)) for v in args.variants},
    }
    stem = "memory_horizon" + ("" if args.steps == TOTAL_STEPS else f"_steps{args.steps}")
    title = f"Memory horizon ({args.steps} steps, d_model 32, 2 layers, batch 32)"
    cr.write_summary(stem, summary, cr.markdown_table(summary, LABELS, title=title))
    cr.plot_curves(
        summary,
        RESULTS / f"{stem}_curves.png",
        LABELS,
        title=f"Memory horizon: eval accuracy at QUERY positions, {args.steps} steps\n"
        f"(mean over seeds {','.join(map(str, args.seeds))}; shaded: min..max)",
    )
    return summary


def transitions(args) -> None:
    import transition_plots

    runs = {v: workdir(v, args.seeds[0]) for v in ("gateloop", "fixed", "real") if workdir(v, args.seeds[0]).exists()}
    transition_plots.plot_memory_horizon_transitions(
        runs, RESULTS / "memory_horizon_transitions.png", RESULTS / "memory_horizon_transitions.json", LABELS
    )


def main(argv=None) -> None:
    p = cr.driver_parser(__doc__, ("run", "aggregate", "transitions", "all"), seeds=SEEDS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=TOTAL_STEPS)
    args = p.parse_args(argv)
    if args.action in ("run", "all"):
        run(args)
    if args.action in ("aggregate", "all"):
        aggregate(args)
    if args.action in ("transitions", "all"):
        transitions(args)


if __name__ == "__main__":
    main()
