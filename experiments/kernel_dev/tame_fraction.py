"""How often the multi-head Pallas kernel takes its fast path with learned gates.

The kernel (gateloop_jax/ops/pallas_chunked.py) computes a 16-row diagonal sub-block as two matrix products when the
sub-block is "tame" - every key channel of the head decays by at most Config.tame_nats nats over its rows (48 by
default; --nats here, default 16 as in the committed results) - and by the exact row loop otherwise (1.5x slower
over the op, perf_notes.md, "Matrix-product diagonal sub-blocks"). This reads a trained workdir's transitions on its
eval data (synthetic tasks: data.synthetic.TASKS) and reports the tame fraction of those (batch, head, sub-block)
tiles, for blocks of 16 (the kernel's) and, for comparison, 32 and 64 rows.

    python experiments/kernel_dev/tame_fraction.py --workdir WORKDIR \
        [--out experiments/results/kernel_dev/tame_fraction.json] \
        [--save_gates experiments/results/kernel_dev/gates_X.npz]

--save_gates keeps the learned log|a| (one array per layer, (b, t, h * k), float16) so that the GPU profiler can time
the kernel on them (profile_pallas_chunked.py --gates_file), where the model stack is not installed.

Shape legend: b batch, t length, h heads, k d_qk (channels = h * k).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/
from bench_common import load_gates, tile_gates  # noqa: E402, F401 - part of this tool's interface


def _block_sums(log_r: np.ndarray, heads: int, block: int) -> np.ndarray:
    """log_r (b, t, h * k) -> each channel's sum of log|a| over each block of rows, (b, blocks, h, k); the tail of t
    beyond whole blocks is left out."""
    b, t, channels = log_r.shape
    if channels % heads:
        raise ValueError(f"tame_fraction: {channels} channels do not split into heads={heads}")
    n = t // block
    if n == 0:
        raise ValueError(f"tame_fraction: length {t} is shorter than one block of {block}")
    return np.asarray(log_r, np.float64)[:, : n * block].reshape(b, n, block, heads, channels // heads).sum(2)


def tame_fraction(log_r: np.ndarray, heads: int, block: int, nats: float) -> float:
    """Fraction of (b, head, block) tiles of log_r (b, t, h * k) in which every channel's sum of log|a| over the
    block's rows is >= -nats (the kernel's test: the sub-block's inclusive prefix is smallest on its last row)."""
    return float((_block_sums(log_r, heads, block) >= -nats).all(-1).mean())


def untame_channel_share(log_r: np.ndarray, heads: int, block: int, nats: float) -> float:
    """Among the untame tiles (tame_fraction), the mean share of a head's channels that decay by more than nats:
    how much of a tile an exact path restricted to the forgetting channels would have to cover (nan: none untame)."""
    over = _block_sums(log_r, heads, block) < -nats  # (b, n, heads, k)
    untame = over.any(-1)
    return float(over.mean(-1)[untame].mean()) if untame.any() else float("nan")


def measure(
    workdir: str, blocks=(16, 32, 64), nats: float = 16.0, batch_size: int = 64, save_gates: str | None = None
) -> dict:
    import gateloop_jax
    from gateloop_jax import inspection
    from gateloop_jax.data import synthetic

    model, config, _ = gateloop_jax.load(workdir, tokenizer=False)
    if config.model.d_qk == 1 and config.model.d_v == 1:
        raise ValueError(
            f"{workdir}: a max-headed model (d_qk = d_v = 1) runs the elementwise kernel, which has no "
            "tame / untame forms; train a multi-head one (e.g. --config.model.d_qk=16)"
        )
    d = config.data
    batch = synthetic.global_batch(d, batch_size=batch_size, seed=d.eval_seed, index=0, stream=synthetic.EVAL_STREAM)
    layers = inspection.transitions(model, np.asarray(batch["inputs"]))
    if save_gates:
        np.savez_compressed(
            save_gates,
            **{f"layer{i}": layer["log_magnitude"][:16].astype(np.float16) for i, layer in enumerate(layers)},
        )
    out = {
        "workdir": str(workdir),
        "task": d.name,
        "heads": config.model.num_heads,
        "d_qk": config.model.d_qk,
        "tame_nats": nats,
        "layers": [],
    }
    for layer in layers:
        lr = layer["log_magnitude"]
        out["layers"].append(
            {
                "tame_fraction": {
                    str(bl): tame_fraction(lr, config.model.num_heads, bl, nats) for bl in blocks if bl <= lr.shape[1]
                },
                "untame_channel_share": {
                    str(bl): untame_channel_share(lr, config.model.num_heads, bl, nats)
                    for bl in blocks
                    if bl <= lr.shape[1]
                },
                "log_magnitude_quantiles": {str(p): float(np.quantile(lr, p)) for p in (0.01, 0.1, 0.5, 0.9)},
            }
        )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    p.add_argument("--nats", type=float, default=16.0)
    p.add_argument("--save_gates", default=None, help="npz path: the learned log|a| of 16 eval sequences per layer")
    a = p.parse_args(argv)
    result = measure(a.workdir, nats=a.nats, save_gates=a.save_gates)
    text = json.dumps(result, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
