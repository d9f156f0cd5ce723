"""Probe the chained max-headed kernel on a GPU at tiny size: compile time, then one call per variant, each under
its own alarm (a deadlock shows as a timeout, not a hang of the whole run)."""
import os, signal, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402
import jax  # noqa: E402
from gateloop_jax.ops import pallas_elementwise as pe  # noqa: E402

VARIANTS = {"pid16": pe.Config(chain=True, chain_ticket=False), "ticket16": pe.Config(chain=True),
            "pid8_withhold": pe.Config(chain=True, chain_segment=8, chain_ticket=False, chain_withhold=True)}
x = bk.make_inputs(jax.random.PRNGKey(7), 1, 64, 128, 1, 1)
ref = bk.op_fwd_bwd(bk.scan.gateloop_scan)
for name in sys.argv[1].split(","):
    cfg = VARIANTS[name]
    for what, f in (("fwd", jax.jit(lambda *a, cfg=cfg: pe.gateloop_pallas_elementwise(*a[:5], None, config=cfg)[0])),
                    ("fwdbwd", bk.op_fwd_bwd(lambda *a, cfg=cfg: pe.gateloop_pallas_elementwise(*a, config=cfg)))):
        t0 = time.time()
        comp = f.lower(*x[:5] if what == "fwd" else x).compile()
        t1 = time.time()
        print(name, what, f"compile {t1 - t0:.1f}s", flush=True)
        signal.alarm(20)
        try:
            out = jax.block_until_ready(comp(*x[:5] if what == "fwd" else x))
            print(name, what, f"ran {time.time() - t1:.2f}s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(name, what, "error", repr(e)[:300], flush=True)
        signal.alarm(0)
    print(name, "check", bk.check(f, ref, x), flush=True)

if len(sys.argv) > 2:  # timing at the benchmark shape: 4 x 8192 x 512 channels, fwd+bwd, pipelined ms
    import bench_common as bc  # noqa: E402
    big = bk.make_inputs(jax.random.PRNGKey(8192), 4, 8192, 512, 1, 1)
    for name in ["default"] + sys.argv[2].split(","):
        cfg = pe.Config() if name == "default" else VARIANTS[name]
        fn = bk.op_fwd_bwd(lambda *a, cfg=cfg: pe.gateloop_pallas_elementwise(*a, config=cfg))
        signal.alarm(40)
        jax.block_until_ready(fn(*big))
        r = bc.time_sync_and_pipelined(fn, big, runs=5)
        signal.alarm(0)
        print("time", name, r, flush=True)
