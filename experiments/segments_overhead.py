"""What segment_ids cost: bench_modes.py runs with and without --segment_length, compared config by config.

    for s in 0 2048 512 128; do
        python experiments/bench_modes.py --out experiments/results/segments/len$s --scopes op --modes pallas,chunked \
            --peers "" --dtypes bfloat16 --passes fwd,fwdbwd --lengths 2048,8192 --segment_length $s
    done
    python experiments/segments_overhead.py experiments/results/segments 2048,512,128

Prints, per (setting, dtype, length, mode, pass), the median time without segments, with them, and the ratio (also for
the pipelined medians), and writes <folder>/overhead.json. Each --segment_length run lives in <folder>/len<s>/.
"""

from __future__ import annotations

import argparse
import json
import os


def compare(folder: str, lengths: list[str]) -> list[dict]:
    def records(s):
        with open(os.path.join(folder, f"len{s}", "modes.json")) as f:
            return json.load(f)["records"]

    key = lambda r: (r["setting"], r["dtype"], r["length"], r["mode"], r["pass"])  # noqa: E731
    base = {key(r): r for r in records(0) if "median_s" in r}
    rows = []
    for s in lengths:
        for r in records(s):
            b = base.get(key(r))
            if b is None or "median_s" not in r:
                continue
            row = dict(zip(("setting", "dtype", "length", "mode", "pass"), key(r)), segment_length=int(s))
            for field in ("median_s", "pipelined_median_s"):
                if field in r and field in b:
                    row[field] = {"none": b[field], "segments": r[field], "overhead": r[field] / b[field] - 1}
            row["error_max_rel"] = r.get("error", {}).get("max_rel")
            rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="holds len0/, len<s>/ ... from bench_modes.py --out")
    p.add_argument("segment_lengths", help="comma list of the --segment_length runs to compare with len0")
    args = p.parse_args(argv)
    rows = compare(args.folder, [s for s in args.segment_lengths.split(",") if s])
    for r in rows:
        m = r["median_s"]
        line = (f"seg {r['segment_length']:>5}  {r['setting']:9} {r['dtype']:8} L={r['length']:<6} {r['mode']:8} "
                f"{r['pass']:6} {m['none'] * 1e3:8.3f} -> {m['segments'] * 1e3:8.3f} ms ({m['overhead']:+.1%})")
        if "pipelined_median_s" in r:
            line += f"  pipelined {r['pipelined_median_s']['overhead']:+.1%}"
        print(line + f"  err {r['error_max_rel']:.1e}" if r["error_max_rel"] is not None else line)
    with open(os.path.join(args.folder, "overhead.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
