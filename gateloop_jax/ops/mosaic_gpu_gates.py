"""The gates' decay factors for mode="mosaic_gpu" (ops/pallas_mosaic_gpu.py has the method): from log|a| and arg a,
every exponent a sum of the gates over a window of a chunk's rows, and its e^{.}, in one Mosaic GPU kernel.

Per chunk (rows c of the chunk's 64), as (Re, Im) of e^{sum of log|a| + i sum of arg a} over the rows s of:
  P: s <= c (from the chunk start, inclusive), F: s > c (to the chunk end, exclusive); and for the "_subblock"
  variants, with 16-row sub-blocks, P_sub: s <= c within c's sub-block, Q_d: s > c up to the end of the (d - 1)-th
  sub-block after c's (d = 1, 2, 3; rows past the chunk end count for nothing: the kernels never use such a Q_d).
And the chunk totals T (b, h, n, k), a plain reduction in XLA.

Each exponent is a direct sum over its own window (no difference of prefix sums, which cancels catastrophically at
|a| ~ 1e-6). The kernel forms all of them on the tensor cores: one (64, 64) 0/1 matrix per window times the chunk's
gates split exactly into three bfloat16 parts (8 + 8 + 8 significant bits: every product with 1 is exact, float32
accumulation), then e^{.}, by default by the special-function units (exp2, sin, cos approximations: relative error
~1e-7 at the exponents <= 0 and the phases in [-pi, pi] used here, as in the intra-chunk kernels). It stands for about
20 XLA fusions (window sums by 0/1 products, their transposes, the polar forms) between the intra-chunk kernels: it
reads the gates once and writes each factor once. method="xla" forms the same factors in XLA
(mosaic_gpu_common._window_sums); GATE_FACTORS chooses."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gateloop_jax.ops.mosaic_gpu_common import (CHUNK, SUB, TILE, _f32_staging, _polar, _store_split, _swizzled_bf16,
                                               _window_sums, _wrap, pl, plgpu)

GATE_FACTOR_METHODS = ("kernel", "xla")
# How the op forms them (trace_mosaic_gpu.py --gate_factors compares the two in the op). On an H100 (L = 8192, 32768
# tokens x 8 heads of 64, bf16, fwd+bwd; experiments/perf_notes.md, "the gate factors in one kernel"): 9.17 ms of
# device time with the kernel (0.70 ms over its two launches) against 10.74 with XLA's forms, in one call.
GATE_FACTORS = "kernel"
# How the kernel runs (kernel_dev/bench_gate_factors.py times each): plain loads and stores or TMA ("direct", "tma"),
# chunks per program, exp / cos / sin by the special-function units or in full precision, the six windows in one loop
# body or unrolled. Alone, at the shape above (H100): 0.43 ms with TMA and approximate math, 0.49 direct, 1.90 in full
# precision (its inlined library calls are the cost), XLA's forms 1.39.
GATES_IO = "tma"
GATES_PER_PROGRAM = 1
GATES_APPROX_MATH = True
GATES_LOOP = "rolled"

# The windows of the kernel's sums, in its output order: rows s counted towards row c when s > c ("after") or s <= c,
# and the sub-block gap sub-block(s) - sub-block(c) in [lo, hi] (None: no bound).
_CHUNK_WINDOWS = ((False, None, None), (True, None, None))  # P, F
_SUB_WINDOWS = ((False, 0, None), (True, None, 0), (True, None, 1), (True, None, 2))  # P_sub, Q_1, Q_2, Q_3


class GateFactors(NamedTuple):
    """(Re, Im) pairs, float32: p (b, t, h, k) = e^{G + i Phi} summed from the chunk start (inclusive), f (b, t, h, k)
    = e^{.} of the rows after to the chunk end, t (b, h, n, k) the chunk totals; sub the 8 sub-block factors (P_sub,
    Q_1, Q_2, Q_3, each Re then Im; () without sub-blocks)."""

    p_re: jax.Array
    p_im: jax.Array
    f_re: jax.Array
    f_im: jax.Array
    t_re: jax.Array
    t_im: jax.Array
    sub: tuple


def gate_factors(lr, th, *, sub, interpret, method=None):
    """lr = log|a|, th = arg a (wrapped), (b, t, h, k) float32, t and k multiples of 64 -> GateFactors. sub: also the
    sub-block factors. method (default GATE_FACTORS): "kernel" (Mosaic GPU; interpret: its GPU interpret mode) or
    "xla"."""
    method = GATE_FACTORS if method is None else method
    if method not in GATE_FACTOR_METHODS:
        raise ValueError(f"gate_factors: method={method!r} is not one of {GATE_FACTOR_METHODS}")
    b, tp, h, dkp = lr.shape
    n = tp // CHUNK
    chunks = lambda z: z.reshape(b, n, CHUNK, h, dkp)  # noqa: E731
    tot_r = jnp.transpose(jnp.sum(chunks(lr), axis=2), (0, 2, 1, 3))
    tot_p = jnp.transpose(_wrap(jnp.sum(chunks(th), axis=2)), (0, 2, 1, 3))
    totals = _polar(tot_r, tot_p)
    if method == "xla":
        factors = _factors_xla(lr, th, sub)
    else:
        factors = _factors_kernel(lr, th, sub=sub, interpret=interpret)
    return GateFactors(*factors[:4], *totals, tuple(factors[4:]))


def _factors_xla(lr, th, sub):
    """The factors of _windows (chunk ones, then sub-block ones) in XLA, by _window_sums."""
    b, tp, h, dkp = lr.shape

    def windowed(rows):
        return lr.reshape(b, tp // rows, rows, h, dkp), th.reshape(b, tp // rows, rows, h, dkp)

    def after(z):
        return _window_sums(z, 2, reverse=True, inclusive=False)

    lr_c, th_c = windowed(CHUNK)
    exps = [(_window_sums(lr_c, 2), _wrap(_window_sums(th_c, 2))), (after(lr_c), _wrap(after(th_c)))]
    if sub:
        lr_s, th_s = windowed(SUB)
        tot_r, tot_p = jnp.sum(lr_s, axis=2, keepdims=True), _wrap(jnp.sum(th_s, axis=2, keepdims=True))

        def later(z, i):  # the totals of the i-th next sub-block (zero past the end)
            return jnp.concatenate([z[:, i:], jnp.zeros_like(z[:, :i])], axis=1)

        exps.append((_window_sums(lr_s, 2), _wrap(_window_sums(th_s, 2))))
        exps.append((after(lr_s), _wrap(after(th_s))))
        for i in (1, 2):
            q_r, q_p = exps[-1]
            exps.append((q_r + later(tot_r, i), _wrap(q_p + later(tot_p, i))))
    return tuple(z.reshape(b, tp, h, dkp) for r, p in exps for z in _polar(r, p))


def _windows(sub):
    return _CHUNK_WINDOWS + (_SUB_WINDOWS if sub else ())


def _window_matrix(out_row, in_row, one, zero, after, lo, hi):
    """The 0/1 matrix M[c, s] of a window (_windows): 1 where row s counts towards output row c. after (0 or 1), lo
    and hi (-CHUNK, CHUNK for no bound) may be traced scalars: the kernel walks the windows in a loop."""
    def sub_block(row):
        return jax.lax.shift_right_arithmetic(row, SUB.bit_length() - 1)

    before = jnp.where(in_row <= out_row, one, zero)
    direction = before + (one - before - before) * after  # s <= c, or s > c where after is 1
    gap = sub_block(in_row) - sub_block(out_row)
    return jnp.where(gap - lo >= 0, jnp.where(gap - hi <= 0, direction, zero), zero)


def _window_bounds(windows):
    """Per window: (after as 0.0 / 1.0, lo, hi), +-CHUNK standing for no bound (sub-block gaps are within +-3)."""
    return [(float(after), -CHUNK if lo is None else lo, CHUNK if hi is None else hi) for after, lo, hi in windows]


def _chunk_window(pid, h, n_chunks):
    """window(ref): the (64 rows, 64 columns) window of a (b, t, h, d) array for program pid (of batch x head x chunk)
    and this program's d_qk tile."""
    bi, hi, j = pid // (h * n_chunks), (pid // n_chunks) % h, pid % n_chunks
    cols = pl.ds(jax.lax.axis_index("dk") * TILE, TILE)
    return lambda ref: ref.at[bi, pl.ds(j * CHUNK, CHUNK), hi, cols]


def _row_indices(wg):
    """(out_row, in_row, one, zero): a window matrix's row and column indices and its two values, in the WGMMA
    layout."""
    return (plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 0, layout=wg),
            plgpu.broadcasted_iota(jnp.int32, (CHUNK, CHUNK), 1, layout=wg),
            plgpu.layout_cast(jnp.ones((CHUNK, CHUNK), jnp.float32), wg),
            plgpu.layout_cast(jnp.zeros((CHUNK, CHUNK), jnp.float32), wg))


def _polar_exact_at_zero(log_magnitude, phase, one, zero):
    """_polar, with exactly 1 + 0i where both sums are 0 (an empty window: F at a chunk's last row, Q_1 at a sub-block's
    last row). The special-function units promise only ~1e-6 absolute for cos and sin, and that error would multiply
    a whole undecayed k^T v term: with |a| ~ 1e-6 the imaginary part of the end state is itself ~1e-6, so an
    approximate sin(0) alone would be a relative error of ~0.2 there (an error model of the units on CPU, experiments/
    kernel_dev/approx_math_model.py)."""
    re, im = _polar(log_magnitude, phase)
    at_zero = log_magnitude == 0
    return (jnp.where(at_zero, jnp.where(phase == 0, one, re), re),
            jnp.where(at_zero, jnp.where(phase == 0, zero, im), im))


def _pick(i, values):
    """values[i] for a traced index i (the windows' loop) as a chain of selects."""
    out = values[-1]
    for k in range(len(values) - 2, -1, -1):
        out = jnp.where(i == k, values[k], out)
    return out


def _gates_kernel(lr_ref, th_ref, *refs, h, n_chunks, sub, io, per_program, loop):
    """One (batch x head x chunk, d_qk tile): each window's 0/1 matrix times the gates' three bf16 parts (log|a| and
    arg a under one wait), then e^{.} of the sums to the outputs. io: "direct" (plain loads and stores between
    registers and global memory) or "tma" (through two float32 staging tiles, each store left in flight until its tile
    is next written). per_program: chunks taken in turn by one program; loop: the windows "rolled" (one loop body) or
    "unrolled"."""
    windows = _windows(sub)
    outs, refs = refs[:2 * len(windows)], refs[2 * len(windows):]
    ones, *parts = refs[:7]
    staging, bars = (refs[7:9], refs[9]) if io == "tma" else ((), None)
    for step in range(per_program):  # static
        _gates_chunk(jax.lax.axis_index("bhc") * per_program + step, lr_ref, th_ref, outs, ones, parts, staging, bars,
                     h=h, n_chunks=n_chunks, windows=windows, io=io, loop=loop)


def _gates_chunk(pid, lr_ref, th_ref, outs, ones, parts, staging, bars, *, h, n_chunks, windows, io, loop):
    """_gates_kernel's work for the chunk pid (of batch x head x chunk)."""
    wg = plgpu.Layout.WGMMA
    window = _chunk_window(pid, h, n_chunks)
    gates = (lr_ref, th_ref)
    if io == "tma":
        for slot, ref in enumerate(gates):
            plgpu.copy_gmem_to_smem(window(ref), staging[slot], bars.at[slot])
    for slot, (ref, dst) in enumerate(zip(gates, (parts[:3], parts[3:]))):
        if io == "tma":
            plgpu.barrier_wait(bars.at[slot])
            value = plgpu.load(staging[slot], layout=wg)
        else:
            value = plgpu.load(window(ref), layout=wg, optimized=False)
        _store_split(dst, value)  # three parts: x exactly

    def put(x, i):
        if io != "tma":
            window(outs[i])[...] = x
            return
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store issued two outputs ago has read this tile
        plgpu.commit_smem()  # every thread past that wait (and done reading the gates from the staging tiles)
        staging[i % 2][...] = x
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(staging[i % 2], window(outs[i]))

    out_row, in_row, one, zero = _row_indices(wg)

    def sums(acc_r, acc_p):
        for part in parts[:3]:
            plgpu.wgmma(acc_r, ones, part)
        for part in parts[3:]:
            plgpu.wgmma(acc_p, ones, part)
        plgpu.wgmma_wait(0)  # the products are done reading `ones`: the next window may rewrite it
        return acc_r[...], acc_p[...]

    def window_factors(i, bounds):
        ones[...] = _window_matrix(out_row, in_row, one, zero, *bounds).astype(jnp.bfloat16)
        plgpu.commit_smem()  # the matrix (and, the first time, the parts) visible to the tensor cores
        s_r, s_p = pl.run_scoped(sums, *(plgpu.ACC((CHUNK, TILE), jnp.float32) for _ in range(2)))
        return _polar_exact_at_zero(s_r, _wrap(s_p), one, zero)

    bounds = _window_bounds(windows)
    if loop == "unrolled":
        for i in range(len(windows)):  # static
            re, im = window_factors(i, bounds[i])
            put(re, 2 * i)
            put(im, 2 * i + 1)
    else:
        # One body for all windows (the matrix, the products and e^{.}), so the kernel's code stays small: unrolled,
        # its full-precision exp / cos / sin alone are 288 inlined library calls.
        def body(i, carry):
            re, im = window_factors(i, [_pick(i, [b[f] for b in bounds]) for f in range(3)])
            for k in range(len(windows)):  # static: the outputs are separate arrays
                @pl.when(i == k)
                def _():
                    put(re, 2 * k)
                    put(im, 2 * k + 1)
            return carry

        jax.lax.fori_loop(0, len(windows), body, 0)
    if io == "tma":
        plgpu.wait_smem_to_gmem(0)


def _factors_kernel(lr, th, *, sub, interpret, approx_math=None, io=None, per_program=None, loop=None):
    """The factors of _windows (Re, Im each, (b, t, h, k) float32) by _gates_kernel. approx_math: exp / cos / sin by
    the special-function units; io, per_program and loop: _gates_kernel's (fewer chunks per program where they do not
    divide); by default the module's GATES_ settings."""
    approx_math = GATES_APPROX_MATH if approx_math is None else approx_math
    io = GATES_IO if io is None else io
    loop = GATES_LOOP if loop is None else loop
    per_program = GATES_PER_PROGRAM if per_program is None else per_program
    b, tp, h, dkp = lr.shape
    n = tp // CHUNK
    per_program = math.gcd(per_program, b * h * n)
    out_type = (jax.ShapeDtypeStruct(lr.shape, jnp.float32),) * (2 * len(_windows(sub)))
    scratch = tuple(_swizzled_bf16(CHUNK, TILE) for _ in range(7))  # the 0/1 matrix, 3 parts each of lr and th
    if io == "tma":
        scratch += (_f32_staging(), _f32_staging(), plgpu.Barrier(num_barriers=2))
    body = functools.partial(_gates_kernel, h=h, n_chunks=n, sub=sub, io=io, per_program=per_program,
                             loop=loop)
    params = plgpu.CompilerParams(approx_math=approx_math, lowering_semantics=plgpu.LoweringSemantics.Lane)
    return plgpu.kernel(body, out_type=out_type, grid=(b * h * n // per_program, dkp // TILE),
                        grid_names=("bhc", "dk"),
                        scratch_types=scratch, compiler_params=params,
                        interpret=plgpu.InterpretGPUParams() if interpret else False,
                        kernel_name="gateloop_gate_factors")(lr, th)


# The backward's gate-gradient sums (pallas_mosaic_gpu._backward): per chunk, each row j's dlog|a| and darg a are sums
# over the rows whose decay crosses step j, from at or after j for the query-side terms and before j for the
# key-side ones (so no term is added and later cancelled). "xla" forms them by _window_sums (each a transpose, a 0/1
# gemm and a transpose back around its producers); "kernel" (_gate_grad_sums_kernel) reads the eight arrays they are
# made of once and sums on the tensor cores as above. Timed in the op by trace_mosaic_gpu.py --gate_grad_sums: on an
# H100 (L = 8192, 32768 tokens x 8 heads of 64, bf16, fwd+bwd), 8.44 ms of device time with the kernel (0.28 ms of it)
# against 8.57 with XLA's sums, the op's worst error against the float64 oracle 4.8e-5 either way
# (experiments/results/mosaic_gpu_h100/gate_kernels/).
GATE_GRAD_SUM_METHODS = ("kernel", "xla")
GATE_GRAD_SUMS = "kernel"


def gate_grad_sums(q, k, dq, dk_in, dk_f, xim, yim_in, yim_f, *, interpret, method=None):
    """-> (dlog_r, dtheta) without the chunk-start terms, float32 (b, t, h, k), every array (b, t, h, k) float32 with t
    and k multiples of 64:
      dlog_r_j = sum_{n >= j} (q dq - k dk_in)_n + sum_{m < j} (k dk_f)_m,
      dtheta_j = sum_{n >= j} (k yim_in - q xim)_n - sum_{m < j} (k yim_f)_m,
    each sum within j's chunk. method (default GATE_GRAD_SUMS): "kernel" (Mosaic GPU; interpret: its GPU interpret
    mode) or "xla"."""
    method = GATE_GRAD_SUMS if method is None else method
    if method not in GATE_GRAD_SUM_METHODS:
        raise ValueError(f"gate_grad_sums: method={method!r} is not one of {GATE_GRAD_SUM_METHODS}")
    if method == "kernel":
        return _gate_grad_sums_kernel(q, k, dq, dk_in, dk_f, xim, yim_in, yim_f, interpret=interpret)
    b, tp, h, dkp = q.shape

    def sums(z, reverse):
        z = _window_sums(z.reshape(b, tp // CHUNK, CHUNK, h, dkp), 2, reverse=reverse, inclusive=reverse)
        return z.reshape(b, tp, h, dkp)

    dlr = sums(q * dq - k * dk_in, True) + sums(k * dk_f, False)
    dth = sums(k * yim_in - q * xim, True) - sums(k * yim_f, False)
    return dlr, dth


def _gate_grads_kernel(q_ref, k_ref, dq_ref, dkin_ref, dkf_ref, xim_ref, yimin_ref, yimf_ref, dlr_ref, dth_ref, *refs,
                       h, n_chunks):
    """One (batch x head x chunk, d_qk tile): the suffix and prefix windows' 0/1 matrices times the three exact bf16
    parts of each sum's terms, dlog|a| then darg a, one accumulator each."""
    suffix, prefix, *parts = refs
    wg = plgpu.Layout.WGMMA
    window = _chunk_window(jax.lax.axis_index("bhc"), h, n_chunks)

    def tile(ref):
        return plgpu.load(window(ref), layout=wg, optimized=False)

    out_row, in_row, one, zero = _row_indices(wg)
    # s >= c (from the row on) and s < c (the rows before): the windows of the query-side and key-side terms.
    suffix[...] = jnp.where(in_row >= out_row, one, zero).astype(jnp.bfloat16)
    prefix[...] = jnp.where(in_row < out_row, one, zero).astype(jnp.bfloat16)
    q, k = tile(q_ref), tile(k_ref)
    terms = ((dlr_ref, lambda: (q * tile(dq_ref) - k * tile(dkin_ref), k * tile(dkf_ref))),
             (dth_ref, lambda: (k * tile(yimin_ref) - q * tile(xim_ref), -(k * tile(yimf_ref)))))
    for out_ref, make in terms:  # static: dlog|a|, then darg a
        after, before = make()
        plgpu.commit_smem()  # every thread is done with the parts' last products (wgmma_wait below)
        _store_split(parts[:3], after)
        _store_split(parts[3:], before)
        plgpu.commit_smem()  # the parts (and, the first time, the matrices) visible to the tensor cores

        def sums(acc):
            for part in parts[:3]:
                plgpu.wgmma(acc, suffix, part)
            for part in parts[3:]:
                plgpu.wgmma(acc, prefix, part)
            plgpu.wgmma_wait(0)
            return acc[...]

        window(out_ref)[...] = pl.run_scoped(
            sums, plgpu.ACC((CHUNK, TILE), jnp.float32))


def _gate_grad_sums_kernel(*arrays, interpret):
    """gate_grad_sums by _gate_grads_kernel: one program per (batch x head x chunk, d_qk tile), plain loads and
    stores, approximate nothing (sums only)."""
    b, tp, h, dkp = arrays[0].shape
    n = tp // CHUNK
    out_type = (jax.ShapeDtypeStruct(arrays[0].shape, jnp.float32),) * 2
    scratch = tuple(_swizzled_bf16(CHUNK, TILE) for _ in range(8))  # two 0/1 matrices, 3 parts of each window's terms
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)
    return plgpu.kernel(functools.partial(_gate_grads_kernel, h=h, n_chunks=n), out_type=out_type,
                        grid=(b * h * n, dkp // TILE), grid_names=("bhc", "dk"), scratch_types=scratch,
                        compiler_params=params, interpret=plgpu.InterpretGPUParams() if interpret else False,
                        kernel_name="gateloop_gate_grad_sums")(*arrays)
