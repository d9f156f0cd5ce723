"""Tables and plots of the benchmark results (JSON written by bench_modes.py, bench_decode.py, bench_train.py).

    python experiments/plot_bench.py --results experiments/results

Writes, next to the JSON: bench.md (every table), modes_<scope>_<pass>_<setting>.png (time and peak memory vs length,
log-log, one line per mode, both dtypes) and decode.png (per-token latency vs context).
"""

from __future__ import annotations

import argparse
import json
import os

SKIP_MARK = "skip"


def _records(result, **match):
    return [r for r in result.get("records", []) if all(r.get(k) == v for k, v in match.items())]


def _short_reason(rec) -> str:
    reason = rec.get("skipped", "")
    if reason.startswith("would need"):
        return "mem"
    if reason.startswith("too slow"):
        return "slow"
    if "time budget" in reason:
        return "budget"
    if reason:
        return SKIP_MARK
    return "-"


def _cell_ms(rec) -> str:
    if rec is None:
        return ""
    if "median_s" in rec:
        piped = f" [{rec['pipelined_median_s'] * 1e3:.3g}]" if "pipelined_median_s" in rec else ""
        return f"{rec['median_s'] * 1e3:.3g}{piped}"
    if "single_run_s" in rec:
        return f"({rec['single_run_s'] * 1e3:.3g})"
    return _short_reason(rec)


def _cell_gib(rec) -> str:
    if rec is None or "peak_bytes" not in rec:
        return "" if rec is None else _short_reason(rec) if "skipped" in rec else "-"
    mark = "" if rec.get("peak_exact", True) else "≤"
    return f"{mark}{rec['peak_bytes'] / 2**30:.2f}"


def _memory_bytes(rec):
    """The device's peak where the reading is this config's own (peak_exact), else XLA's compile-time estimate."""
    if rec.get("peak_exact") and rec.get("peak_bytes"):
        return rec["peak_bytes"]
    return rec.get("xla_memory", {}).get("estimated_peak_bytes")


def _cell_xla(rec) -> str:
    if rec is None:
        return ""
    est = rec.get("xla_memory", {}).get("estimated_peak_bytes")
    return "-" if est is None else f"{est / 2**30:.2f}"


def _cell_err(rec) -> str:
    if rec is None or "error" not in rec:
        return "" if rec is None else "-"
    return f"{rec['error']['max_rel']:.1e}"


def _modes_in(recs):
    seen = []
    for r in recs:
        if r.get("mode") and r["mode"] not in seen:
            seen.append(r["mode"])
    return seen


def _lengths_in(recs):
    return sorted({r["length"] for r in recs if "length" in r})


def _grid(result, scope, pass_, setting, dtype, cell, lengths=None):
    recs = _records(result, scope=scope, **{"pass": pass_}, setting=setting, dtype=dtype)
    if not recs:
        return None
    lengths = lengths or _lengths_in(recs)
    index = {(r["mode"], r["length"]): r for r in recs if "length" in r}
    rows = []
    for mode in _modes_in(recs):
        label = mode
        alias = next((r.get("alias_of") for r in recs if r["mode"] == mode and r.get("alias_of")), None)
        if alias:
            label = f"auto (={alias})"
        rows.append([label] + [cell(index.get((mode, t))) for t in lengths])
    return ["mode"] + [str(t) for t in lengths], rows


def _text_table(header, rows) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:>%d}" % w if i else "{:<%d}" % w for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _settings_dtypes(result):
    settings = [s for s in ("multihead", "maxheaded") if _records(result, setting=s)]
    dtypes = [d for d in ("bfloat16", "float32") if _records(result, dtype=d)]
    return settings, dtypes


def modes_table(result, lengths=None, passes=("fwd", "fwdbwd"), scopes=("op", "layer"), compact=False) -> str:
    """Plain-text tables of median milliseconds (what the benchmark prints last)."""
    out = []
    settings, dtypes = _settings_dtypes(result)
    bw = result.get("copy_bandwidth", {}).get("bytes_per_s")
    if bw:
        out.append(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for scope in scopes:
        for pass_ in passes:
            for setting in settings:
                for dtype in dtypes:
                    grid = _grid(result, scope, pass_, setting, dtype, _cell_ms, lengths)
                    if grid is None:
                        continue
                    out.append(
                        f"\n{scope} {pass_} {setting} {dtype}: median ms "
                        "(mem/slow/budget/skip = skipped, (x) = one run, [x] = pipelined)"
                    )
                    out.append(_text_table(*grid))
    return "\n".join(out)


def modes_markdown(result) -> str:
    env = result.get("env", {})
    lines = [
        "# GateLoop modes benchmark",
        "",
        f"Command: `{env.get('command', '?')}`  ",
        f"Device: {env.get('device_kind', '?')} ({env.get('platform', '?')}), jax {env.get('jax', '?')}, "
        f"jaxlib {env.get('jaxlib', '?')}, commit {env.get('git_commit', '?')}, {env.get('date_utc', '')}  ",
        f"Tokens per batch: {result.get('args', {}).get('tokens')}; reps {result.get('args', {}).get('reps')} "
        "after warm-up; time = median.",
        "",
    ]
    bw = result.get("copy_bandwidth", {})
    if "bytes_per_s" in bw:
        lines.append(f"Copy bandwidth (same run): **{bw['bytes_per_s'] / 1e12:.2f} TB/s** ({bw['how']}).")
        lines.append("")
    for name, st in result.get("peers", {}).items():
        lines.append(f"- peer {name}: {st['status']}" + (f" ({st['reason']})" if st.get("reason") else ""))
    lines += [
        "",
        "Cells: median ms of synchronised calls, [x] = per call with several calls in flight (pipelined: "
        "launch gaps hidden); `mem` = skipped, would not fit (XLA's estimate); `slow` = skipped, over the "
        "per-config budget ((x) = the one run's ms); `budget` = the overall time budget ran out; "
        "memory in GiB from the device's peak counter, `≤` = an upper bound (see bench_modes.py).",
        "",
    ]
    settings, dtypes = _settings_dtypes(result)
    for scope in ("op", "layer"):
        for pass_ in ("fwdbwd", "fwd"):
            for setting in settings:
                for dtype in dtypes:
                    for title, cell in (
                        ("time (ms)", _cell_ms),
                        ("peak memory, device (GiB)", _cell_gib),
                        ("peak memory, XLA's compile-time estimate (GiB)", _cell_xla),
                        ("max rel. error vs reference", _cell_err),
                    ):
                        grid = _grid(result, scope, pass_, setting, dtype, cell)
                        if grid is None:
                            continue
                        lines += [f"### {scope} {pass_}, {setting}, {dtype}: {title}", "", _md_table(*grid), ""]
                    bound = [
                        r
                        for r in _records(result, scope=scope, setting=setting, dtype=dtype, **{"pass": pass_})
                        if "bandwidth_bound_s" in r
                    ]
                    if bound:
                        by_len = {}
                        for r in bound:
                            by_len[r["length"]] = r["bandwidth_bound_s"]
                        lines.append(
                            "Bandwidth bound (bytes read and written once at the copy bandwidth), ms: "
                            + ", ".join(f"{t}: {s * 1e3:.3g}" for t, s in sorted(by_len.items()))
                        )
                        lines.append("")
    skipped = [r for r in result.get("records", []) if r.get("skipped") or r.get("group_skipped")]
    if skipped:
        lines += ["### Skipped", ""]
        for r in skipped:
            if "group_skipped" in r:
                lines.append(f"- {r['group_skipped']}")
            else:
                lines.append(
                    f"- {r['scope']} {r['pass']} {r['setting']} {r['dtype']} L={r['length']} {r['mode']}: "
                    f"{r['skipped']}"
                )
        lines.append("")
    return "\n".join(lines)


def decode_markdown(result) -> str:
    env = result.get("env", {})
    lines = [
        "# Decode benchmark",
        "",
        f"Command: `{env.get('command', '?')}`  ",
        f"Device: {env.get('device_kind', '?')}, jax {env.get('jax', '?')}, commit {env.get('git_commit', '?')}",
        "",
        "| model | batch | context | ms / token | tokens/s | cache (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.get("records", []):
        if "median_s" in r:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['context']} | {r['ms_per_token']:.3f} | "
                f"{r['tokens_per_s']:.0f} | {r['cache_bytes'] / 2**20:.1f} |"
            )
        else:
            lines.append(f"| {r['model']} | {r['batch']} | {r['context']} | {r.get('skipped', '-')} | | |")
    return "\n".join(lines) + "\n"


def train_markdown(result) -> str:
    env = result.get("env", {})
    lines = [
        "# Training-step benchmark",
        "",
        f"Command: `{env.get('command', '?')}`  ",
        f"Device: {env.get('device_kind', '?')}, jax {env.get('jax', '?')}, commit {env.get('git_commit', '?')}",
        "",
    ]
    mm = result.get("matmul")
    if mm and "flops_per_s" in mm:
        lines.append(
            f"Measured bf16 matmul rate (same run, n={mm['n']}): {mm['flops_per_s'] / 1e12:.0f} TFLOP/s; "
            f"datasheet peak {result.get('peak_flops', 0) / 1e12:.0f} TFLOP/s."
        )
        lines.append("")
    lines += [
        "| model | mode | params | batch x length | step ms | tokens/s | MFU (datasheet) | MFU (measured "
        "matmul) | XLA FLOPs util. | peak GiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("records", []):
        if "median_s" in r:
            lines.append(
                f"| {r['model']} | {r.get('mode', '-')} | {r['params'] / 1e6:.1f}M | {r['batch']}x{r['length']} | "
                f"{r['median_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {r['mfu']:.3f} | "
                f"{r.get('mfu_measured_peak', float('nan')):.3f} | "
                f"{r.get('xla_flops_utilization', float('nan')):.3f} | "
                f"{bytes_gib(r.get('peak_bytes'))} | {r.get('compile_s', float('nan')):.1f} |"
            )
        else:
            lines.append(f"| {r['model']} | {r.get('mode', '-')} | | | {r.get('skipped', '-')} | | | | | | |")
    return "\n".join(lines) + "\n"


def bytes_gib(x):
    return "-" if x is None else f"{x / 2**30:.2f}"


def plot_modes(result, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    settings, dtypes = _settings_dtypes(result)
    for scope in ("op", "layer"):
        for pass_ in ("fwdbwd", "fwd"):
            for setting in settings:
                recs = _records(result, scope=scope, setting=setting, **{"pass": pass_})
                if not recs:
                    continue
                fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
                for mode in _modes_in(recs):
                    if mode == "auto":
                        continue
                    for dtype, style in zip(dtypes, ("-o", "--s")):
                        pts = sorted(
                            ((r["length"], r) for r in recs if r["mode"] == mode and r["dtype"] == dtype),
                            key=lambda p: p[0],
                        )
                        xt = [(t, r["median_s"] * 1e3) for t, r in pts if "median_s" in r]
                        xm = [(t, _memory_bytes(r) / 2**30) for t, r in pts if _memory_bytes(r) and "median_s" in r]
                        if xt:
                            ax_t.plot(*zip(*xt), style, label=f"{mode} {dtype}", markersize=4)
                        if xm:
                            ax_m.plot(*zip(*xm), style, label=f"{mode} {dtype}", markersize=4)
                bound = sorted(
                    (r["length"], r["bandwidth_bound_s"] * 1e3)
                    for r in recs
                    if "bandwidth_bound_s" in r and r["mode"] == _modes_in(recs)[0] and r["dtype"] == dtypes[0]
                )
                if bound:
                    ax_t.plot(*zip(*bound), ":", color="gray", label=f"bandwidth bound {dtypes[0]}")
                memory_label = "peak memory, GiB (device peak if exact, else XLA est.)"
                for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, memory_label)):
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.set_xlabel("sequence length (tokens per batch fixed)")
                    ax.set_ylabel(ylabel)
                    ax.grid(True, which="both", alpha=0.3)
                ax_t.legend(fontsize=7, ncol=2)
                dev = result.get("env", {}).get("device_kind", "")
                fig.suptitle(f"GateLoop {scope} {pass_}, {setting} ({dev}, {result['args']['tokens']} tokens/batch)")
                fig.tight_layout()
                path = os.path.join(out_dir, f"modes_{scope}_{pass_}_{setting}.png")
                fig.savefig(path, dpi=110)
                plt.close(fig)
                paths.append(path)
    return paths


def plot_decode(result, out_dir) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in result.get("records", []) if "median_s" in r]
    if not recs:
        return []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for model in sorted({r["model"] for r in recs}):
        for batch in sorted({r["batch"] for r in recs}):
            pts = sorted((r["context"], r["ms_per_token"]) for r in recs if r["model"] == model and r["batch"] == batch)
            if pts:
                ax.plot(*zip(*pts), "-o", markersize=4, label=f"{model}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length")
    ax.set_ylabel("ms per decoded token (per step of the batch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"Decode latency ({result.get('env', {}).get('device_kind', '')})")
    fig.tight_layout()
    path = os.path.join(out_dir, "decode.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _config_key(record):
    return tuple(record.get(k) for k in ("scope", "setting", "pass", "mode", "dtype", "length"))


def merge_modes(result, results_dir):
    """modes.json plus any modes_*.json of the same folder (e.g. the layer scope run in a second device call): records
    of the later files are added, each replacing an earlier record of the same configuration (a re-run supersedes);
    each file's command is listed."""
    extra = sorted(f for f in os.listdir(results_dir) if f.startswith("modes_") and f.endswith(".json"))
    commands = [result.get("env", {}).get("command", "?")]
    for name in extra:
        with open(os.path.join(results_dir, name)) as f:
            other = json.load(f)
        newer = {_config_key(r) for r in other.get("records", [])}
        result["records"] = [r for r in result.get("records", []) if _config_key(r) not in newer] + other.get(
            "records", []
        )
        commands.append(other.get("env", {}).get("command", "?"))
        if "bytes_per_s" in other.get("copy_bandwidth", {}):
            result.setdefault("copy_bandwidth_other_runs", []).append(other["copy_bandwidth"])
    if extra:
        result.setdefault("env", {})["command"] = "` + `".join(commands)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="experiments/results")
    p.add_argument("--no_plots", action="store_true")
    args = p.parse_args(argv)
    parts, written = [], []
    for name, md, plot in (
        ("modes.json", modes_markdown, plot_modes),
        ("decode.json", decode_markdown, plot_decode),
        ("train.json", train_markdown, None),
    ):
        path = os.path.join(args.results, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            result = json.load(f)
        if name == "modes.json":
            result = merge_modes(result, args.results)
        parts.append(md(result))
        if plot and not args.no_plots:
            written += plot(result, args.results)
    md_path = os.path.join(args.results, "bench.md")
    with open(md_path, "w") as f:
        f.write("\n\n".join(parts))
    written.append(md_path)
    print("\n".join(written))
    return written


if __name__ == "__main__":
    main()
