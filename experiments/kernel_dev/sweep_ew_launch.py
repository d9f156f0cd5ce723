"""The max-headed kernel's launch shapes, swept on the H200 (results/kernel_dev/bench_kernels_h200_launch_sweep.json:
none beat the default): adds these variants to bench_kernels' and runs its ew suite.

Usage (GPU machine): python experiments/kernel_dev/sweep_ew_launch.py --out $OUT [--suite ew,mh ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402

C = bk.pe.Config
SWEEP = {
    "p256": C(min_programs=256),
    "p1024": C(min_programs=1024),
    "p2048": C(min_programs=2048),
    "u4": C(unroll=4),
    "u4_p1024": C(unroll=4, min_programs=1024),
    "u4_p2048": C(unroll=4, min_programs=2048),
    "s1": C(num_stages=1),
    "s2": C(num_stages=2),
    "seg64": C(segment_length=64),
    "seg128": C(segment_length=128),
    "seg512": C(segment_length=512),
    "cb64_w2_p1024": C(block_channels=64, num_warps=2, min_programs=1024),
    "cb64_w2_p2048": C(block_channels=64, num_warps=2, min_programs=2048),
    "cb128_w2": C(block_channels=128, num_warps=2),
    "cb128_w2_p1024": C(block_channels=128, num_warps=2, min_programs=1024),
    "cb32_w1_p4096": C(block_channels=32, num_warps=1, min_programs=4096),
}
bk.EW_VARIANTS.update(SWEEP)
sys.argv = [
    sys.argv[0],
    "--suite",
    "ew",
    "--ew-variants",
    "default," + ",".join(SWEEP) + ",default_again",
    "--lengths",
    "1024,8192",
    "--runs",
    "10",
] + sys.argv[1:]
bk.main()
