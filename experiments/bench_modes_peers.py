"""bench_modes.py's peers: softmax attention, jax-linear-attention and fla (availability, fla's PyTorch timing), the
copy bandwidth and the bandwidth bound of a config.
"""

from __future__ import annotations

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

PEERS_SOFTMAX = ("softmax_cudnn", "softmax_xla")
# jax-linear-attention's Mosaic GPU GLA kernel (module `jla`, Hopper, bf16) with real gates at key width d_qk: what
# complex transitions are to cost no more than. GateLoop through that kernel (the rotation identity, key width 2 d_qk;
# the "GateLoop through jax-linear-attention", "jla_gateloop" in results/peers_h200.json) is the kernel mode
# "gla_rotation" of gateloop_jax.ops, benchmarked with the other modes.
PEERS_JLA = ("jla_gla",)
PEER_MODES = PEERS_SOFTMAX + PEERS_JLA
# Modes whose time at a fixed number of tokens grows ~linearly with the length (see the skip estimate in run_group).
LENGTH_BOUND_MODES = ("recurrent", "attention")


def csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def peer_status() -> dict[str, dict]:
    """Optional peers: importable or skipped with the reason (nothing is installed or fetched here)."""
    status = {}
    for name, module, note in (
        (
            "jax-linear-attention",
            "jla",
            "not importable (pip install jax-linear-attention: Python >= 3.12, jax 0.11.2, a Hopper GPU)",
        ),
        ("fla", "fla", "flash-linear-attention (fla-core: Triton/PyTorch chunk_gla, chunk_hgrn) is not installed"),
    ):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        status[name] = {"status": "available" if found else "skipped", "module": module}
        if not found:
            status[name]["reason"] = note
    if status["fla"]["status"] == "available":
        status["fla"]["note"] = (
            "importable: chunk_gla (key width 2 d_qk) and chunk_hgrn timed in a PyTorch child "
            "after the groups (fla_peers; CUDA only, --isolate group)"
        )
    if status["jax-linear-attention"]["status"] == "available":
        status["jax-linear-attention"]["note"] = (
            "importable: peer jla_gla (real gates, key width d_qk) and mode "
            "gla_rotation (GateLoop through its kernel, key width 2 d_qk)"
        )
    return status


def measure_copy(args) -> dict:
    bc.configure_jax_memory()
    out = {"env": bc.env_record()}
    try:
        out["copy_bandwidth"] = bc.copy_bandwidth(args.copy_bytes)
    except Exception as err:  # noqa: BLE001
        out["copy_bandwidth"] = {"skipped": f"{type(err).__name__}: {err}"}
    return out


def fla_peers(args) -> list[dict]:
    """fla's chunk_gla (multi-head, real gates, key width 2 d_qk as the rotation identity needs) and chunk_hgrn
    (max-headed, real gates), forward+backward in bf16, timed with triton.testing.do_bench (median). CUDA only."""
    import torch
    import triton
    from bench_modes_work import setting_dims  # here: bench_modes_work imports this module

    records = []
    for t in map(int, csv(args.lengths)):
        b = args.tokens // t
        for setting in csv(args.settings):
            dims = setting_dims(args, setting)
            rec = {
                "scope": "op",
                "setting": setting,
                "dtype": "bfloat16",
                "length": t,
                "batch": b,
                "tokens": b * t,
                "pass": "fwdbwd",
                "kind": "peer",
                **dims,
            }
            try:
                dev = "cuda"
                if setting == "multihead":
                    from fla.ops.gla import chunk_gla

                    rec["mode"] = "fla_chunk_gla"
                    h, dk, dv = dims["heads"], 2 * dims["d_qk"], dims["d_v"]
                    q = torch.randn(b, t, h, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    k = torch.randn(b, t, h, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    v = torch.randn(b, t, h, dv, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    g = torch.nn.functional.logsigmoid(torch.rand(b, t, h, dk, device=dev) * 6).requires_grad_()
                    dy = torch.randn(b, t, h, dv, device=dev, dtype=torch.bfloat16)

                    def step():
                        o, _ = chunk_gla(q, k, v, g)
                        o.backward(dy)
                else:
                    from fla.ops.hgrn import chunk_hgrn

                    rec["mode"] = "fla_chunk_hgrn"
                    d = dims["heads"]
                    x = torch.randn(b, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    g = torch.nn.functional.logsigmoid(torch.rand(b, t, d, device=dev) * 6).requires_grad_()
                    dy = torch.randn(b, t, d, device=dev, dtype=torch.bfloat16)

                    def step():
                        o, _ = chunk_hgrn(x, g)
                        o.backward(dy)

                ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                rec["median_s"] = ms / 1e3
                rec["tokens_per_s"] = b * t / rec["median_s"]
                rec["note"] = "real gates only (no phase); timed with triton.testing.do_bench, median"
            except Exception as err:  # noqa: BLE001
                rec.setdefault("mode", "fla")
                rec["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            records.append(rec)
    return records


def bandwidth_bound(c: dict, copy_bps: float | None) -> dict:
    """Bytes an op must move at least (inputs read once, outputs written once) and that time at the copy bandwidth.
    fwd: q, k, v, log|a|, arg a in, y out. fwdbwd: the same inputs and dy in, y and their five gradients out."""
    if c["scope"] != "op" or c["kind"] != "gateloop":
        return {}
    item = {"bfloat16": 2, "float32": 4}.get(c["dtype"], 4)
    n_qk = c["tokens"] * c["heads"] * c["d_qk"]
    n_v = c["tokens"] * c["heads"] * c["d_v"]
    inputs = (2 * n_qk + n_v) * item + 2 * n_qk * 4
    y = n_v * item
    # fwdbwd: the inputs and dy read, y and the gradients (the inputs' sizes) written.
    moved = inputs + y if c["pass"] == "fwd" else 2 * inputs + 2 * y
    out = {"min_bytes": moved}
    if copy_bps:
        out["bandwidth_bound_s"] = moved / copy_bps
    return out
