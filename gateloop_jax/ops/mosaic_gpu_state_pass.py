"""The state between chunks for mode="mosaic_gpu" (ops/pallas_mosaic_gpu.py): a serial Mosaic GPU kernel per
(batch x head, segment of chunks, d_qk tile, d_v tile) with the state in registers, and the same contract in XLA (the
"_scan" variants).

The kernel's cost is its chain: one step per chunk, each waiting on the last. Where batch x heads x tiles leave SMs
idle (a long sequence at a small batch), the chunks are cut into S segments run in parallel twice: first from a zero
state, giving each segment's own increment; then, after XLA has carried the state across the S segment ends (an
associative scan of length S), from each segment's true start. That is 2n / S steps in place of n (_segment_count)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gateloop_jax.ops.chunked import _carry_states_associative
from gateloop_jax.ops.mosaic_gpu_common import (CHUNK, TILE, _einsum, _mms, _split_array, _store_split,
                                               _swizzled_bf16, _t, pl, plgpu)


def _state_pass_kernel(*refs, h, n_chunks, segments, reverse, rows_out, save):
    """The state between chunks, serial over the n_chunks chunks of one (batch x head, segment, d_qk tile, d_v tile),
    the state S in registers (float32, Re and Im of a 64 x 64 tile), from the segment's S_0 to its final state. Per
    chunk j (in reverse order with reverse):
      rows_out: out[j] = Re(R S) = [Re R] S_re + [-Im R] S_im, S the state entering the chunk (this d_qk tile's
        share, summed in XLA);
      save: S itself to saved (Re, Im);
      then S <- T_j S + A^T b (T per d_qk row).
    Every operand of a product comes as a bf16 pair (hi, lo: _split_array in _state_pass) and lands in shared memory by
    TMA, two chunks in flight: the chain's cost is its latency, so nothing on it waits for memory or computes a factor.
    Outputs go from registers straight to global memory."""
    n_in = 4 * rows_out + 6
    ins, refs = refs[:n_in], refs[n_in:]
    t_re_ref, t_im_ref, s0re_ref, s0im_ref = refs[:4]
    n_out = rows_out + 2 + 2 * save
    outs, refs = refs[4:4 + n_out], refs[4 + n_out:]
    out_ref = outs[0] if rows_out else None
    fre_ref, fim_ref, *saved = outs[rows_out:]
    bufs, t_smem, refs = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
    state, bars = (refs[:4], refs[4]) if rows_out else ((), refs[0])  # the state in SMEM only as the rows' operand
    c = CHUNK
    wg = plgpu.Layout.WGMMA
    pid = jax.lax.axis_index("bhs")
    bi, hi, si = pid // (h * segments), (pid // segments) % h, pid % segments
    kt, vt = jax.lax.axis_index("dk"), jax.lax.axis_index("dv")
    k_cols, v_cols = pl.ds(kt * TILE, TILE), pl.ds(vt * TILE, TILE)
    cols = (k_cols,) * (n_in - 2) + (v_cols,) * 2  # the b pair is last

    def chunk_of(i):
        return si * n_chunks + (n_chunks - 1 - i if reverse else i)

    def fetch(i, slot):
        rows = pl.ds(chunk_of(i) * c, c)
        for src, buf, col in zip(ins, bufs, cols):
            plgpu.copy_gmem_to_smem(src.at[bi, rows, hi, col], buf.at[slot], bars.at[slot])
        for src, buf in zip((t_re_ref, t_im_ref), t_smem):
            plgpu.copy_gmem_to_smem(src.at[bi, hi, chunk_of(i), k_cols], buf.at[slot], bars.at[slot])

    def pair(first, slot):
        return bufs[first].at[slot], bufs[first + 1].at[slot]

    def per_row(buf):
        return jax.lax.broadcast_in_dim(plgpu.load(buf, layout=wg.reduce(1), optimized=False), (c, TILE), [0])

    def store_state(s_re, s_im):
        _store_split(state[0:2], s_re)
        _store_split(state[2:4], s_im)

    def step(i, carry):
        s_re, s_im = carry
        slot = jax.lax.rem(i, 2)
        plgpu.barrier_wait(bars.at[slot])

        @pl.when(i + 1 < n_chunks)
        def _():  # the other slot's operands were last read by the previous chunk's products, which are done
            fetch(i + 1, 1 - slot)

        a0 = 4 * rows_out
        b_pair = pair(a0 + 4, slot)
        increments = [(_t(pair(a0, slot)), b_pair)], [(_t(pair(a0 + 2, slot)), b_pair)]
        if rows_out:  # all of a chunk's products under one wait: only the rows depend on the state
            inc_re, inc_im, out = _mms(*increments, [(pair(0, slot), state[0:2]), (pair(2, slot), state[2:4])])
            out_ref.at[kt, bi, pl.ds(chunk_of(i) * c, c), hi, v_cols][...] = out
        else:
            inc_re, inc_im = _mms(*increments)
        if save:
            saved[0].at[bi, hi, chunk_of(i), k_cols, v_cols][...] = s_re
            saved[1].at[bi, hi, chunk_of(i), k_cols, v_cols][...] = s_im
        t_re, t_im = per_row(t_smem[0].at[slot]), per_row(t_smem[1].at[slot])
        s_re, s_im = t_re * s_re - t_im * s_im + inc_re, t_im * s_re + t_re * s_im + inc_im
        if rows_out:
            store_state(s_re, s_im)
        return s_re, s_im

    fetch(0, 0)
    s = tuple(plgpu.load(ref.at[bi, hi, si, k_cols, v_cols], layout=wg, optimized=False)
              for ref in (s0re_ref, s0im_ref))
    if rows_out:
        store_state(*s)
    s_re, s_im = jax.lax.fori_loop(0, n_chunks, step, s)
    fre_ref.at[bi, hi, si, k_cols, v_cols][...] = s_re
    fim_ref.at[bi, hi, si, k_cols, v_cols][...] = s_im


def _state_pass(r_re, r_im, a_re, a_im, b, t_re, t_im, s0re, s0im, *, opts, reverse=False, rows_out=True,
                save=False, segments=None):
    """The state pass between chunks, over every (batch x head, d_qk tile, d_v tile): per chunk j (reversed with
    reverse), out[j] = Re(R S) with S the state entering the chunk (rows_out), S saved (save), then S <- T_j S + A^T b.
    R = r_re + i r_im and A = a_re + i a_im (b, t, h, k), b (b, t, h, v), T (b, h, n, k) as (Re, Im), S_0 (b, h, k, v)
    as (Re, Im), all float32 and padded. -> (out (b, t, h, v) or None, the final state (Re, Im), and with save the
    state entering each chunk (b, h, n, k, v) as (Re, Im)). opts: (interpret, variant); the "_scan" variants take
    _state_pass_xla, the others _state_pass_kernel, its chain cut into `segments` (default _segment_count).
    Forward: (R, A, b, T) = (q P, k F, v, T) gives y's inter-chunk part and the chunk-start states. Backward: the
    state's cotangent E, in reverse with (k conj(F), q conj(P), dy, conj(T)): out is dv's inter-chunk part Re(k
    conj(F) E_end), saved each chunk's E_end, the final value dh0."""
    interpret, variant = opts
    if variant.endswith("_scan"):
        return _state_pass_xla(r_re, r_im, a_re, a_im, b, t_re, t_im, s0re, s0im, reverse=reverse,
                               rows_out=rows_out, save=save)
    bsz, tp, h, dkp = a_re.shape
    n = tp // CHUNK
    tiles = (dkp // TILE) * (b.shape[-1] // TILE)
    if segments is None:
        segments = _default_segments(n, bsz * h * tiles, interpret)
    if n % segments:
        raise ValueError(f"_state_pass: segments={segments} does not divide the {n} chunks")
    rows = (*_split_array(r_re), *_split_array(-r_im)) if rows_out else ()
    increments = (*_split_array(a_re), *_split_array(a_im), *_split_array(b))
    run = functools.partial(_state_pass_call, increments, t_re, t_im, interpret=interpret, segments=segments,
                            reverse=reverse)
    if segments > 1:
        # Each segment's own increment (its end state from zero), then the state entering each segment by an
        # associative scan over the segments of S <- D S + E, D the product of the segment's chunk factors T.
        zeros = jnp.zeros(s0re.shape[:2] + (segments,) + s0re.shape[2:], jnp.float32)
        e_re, e_im = run((), zeros, zeros)
        d = jnp.prod(jax.lax.complex(t_re, t_im).reshape(bsz, h, segments, n // segments, dkp), axis=3)
        starts, _ = _carry_states_associative(_chain_order(d, reverse),
                                              _chain_order(jax.lax.complex(e_re, e_im), reverse),
                                              jax.lax.complex(s0re, s0im))
        starts = _chain_order(starts, reverse)
        s0re, s0im = jnp.real(starts), jnp.imag(starts)
    else:
        s0re, s0im = s0re[:, :, None], s0im[:, :, None]
    res = run(rows, s0re, s0im, save=save)  # s0: (b, h, segments, k, v), the state entering each segment
    out = jnp.sum(res[0], axis=0) if rows_out else None
    last = 0 if reverse else -1  # the segment the chain ends in
    return out, res[rows_out][:, :, last], res[rows_out + 1][:, :, last], *res[rows_out + 2:]


def _state_pass_call(increments, t_re, t_im, rows, s0re, s0im, *, interpret, segments, reverse, save=False):
    """One launch of _state_pass_kernel over (batch x head x segment, d_qk tile, d_v tile). increments: the bf16 pairs
    of (Re A, Im A, b); rows: those of (Re R, -Im R), or () without out; s0: the state entering each segment (b, h,
    segments, k, v). -> (out per d_qk tile (dk tiles, b, t, h, v) if rows, each segment's final state (Re, Im), and
    with save the state entering each chunk (Re, Im))."""
    operands = rows + increments
    bsz, tp, h, dkp = increments[0].shape
    dvp = increments[-1].shape[-1]
    n = tp // CHUNK
    f32 = jnp.float32
    out_type = [jax.ShapeDtypeStruct((dkp // TILE, bsz, tp, h, dvp), f32)] if rows else []
    out_type += [jax.ShapeDtypeStruct((bsz, h, segments, dkp, dvp), f32)] * 2
    if save:
        out_type += [jax.ShapeDtypeStruct((bsz, h, n, dkp, dvp), f32)] * 2
    scratch = (
        *(_swizzled_bf16(2, CHUNK, TILE) for _ in operands), plgpu.SMEM((2, TILE), f32), plgpu.SMEM((2, TILE), f32),
        *(_swizzled_bf16(CHUNK, TILE) for _ in range(4 if rows else 0)),  # the state, as the rows' operand
        plgpu.Barrier(num_arrivals=len(operands) + 2, num_barriers=2),  # a chunk's operands and T, per slot
    )
    body = functools.partial(_state_pass_kernel, h=h, n_chunks=n // segments, segments=segments, reverse=reverse,
                             rows_out=bool(rows), save=save)
    params = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)
    return plgpu.kernel(body, out_type=tuple(out_type), grid=(bsz * h * segments, dkp // TILE, dvp // TILE),
                        grid_names=("bhs", "dk", "dv"), scratch_types=scratch, compiler_params=params,
                        interpret=plgpu.InterpretGPUParams() if interpret else False,
                        kernel_name="gateloop_state_pass" if rows or save else "gateloop_segment_increments")(
        *operands, t_re, t_im, s0re, s0im)


def _default_segments(n_chunks, programs, interpret):
    """The chain's segments on this device (_segment_count); one in interpret mode, whose cost is per program step."""
    return 1 if interpret else _segment_count(n_chunks, programs, _multiprocessor_count())


def _multiprocessor_count():
    """The default device's SMs (132 on an H100 SXM), or 132 where the device does not say."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


# Chain steps (a few microseconds each) charged for a program's prologue and epilogue (its first fetch, the state in
# and out), and for the XLA scan over segment ends with the second launch.
_PROGRAM_OVERHEAD_STEPS = 2
_SCAN_OVERHEAD_STEPS = 8
MIN_SEGMENT = 16


def _segment_count(n_chunks, programs, sms):
    """How many segments to cut the serial chain of n_chunks into, given `programs` chains (batch x heads x tiles)
    and `sms` SMs (one program each: the kernel's shared memory fills an SM). In chain steps: one segment costs
    n_chunks per wave of programs; S > 1 costs two launches, each S times the programs running n_chunks / S steps
    plus a prologue and epilogue, and the scan over segment ends. Segments are at least MIN_SEGMENT chunks long (the
    scan over their ends is XLA's, log S passes over every state). The cheapest divisor of n_chunks, the smallest on
    ties."""
    def steps(s):
        waves = -(-programs * s // sms)
        if s == 1:
            return waves * n_chunks
        return 2 * waves * (n_chunks // s + _PROGRAM_OVERHEAD_STEPS) + _SCAN_OVERHEAD_STEPS

    divisors = [s for s in range(1, n_chunks + 1) if n_chunks % s == 0 and (s == 1 or n_chunks // s >= MIN_SEGMENT)]
    return min(divisors, key=lambda s: (steps(s), s))


def _chain_order(z, reverse):
    """Per-chunk (or per-segment) values along axis 2 in the order the state passes them: reversed for the
    backward's cotangent pass. Its own inverse."""
    return jnp.flip(z, axis=2) if reverse else z


def _state_pass_xla(r_re, r_im, a_re, a_im, b, t_re, t_im, s0re, s0im, *, reverse=False, rows_out=True,
                    save=False):
    """_state_pass's contract in XLA (the "_scan" variants): every chunk's increment A^T b as a batched product, the
    states by an associative scan over chunks (depth log n), out by a batched product with the states."""
    bsz, tp, h, _ = a_re.shape
    n = tp // CHUNK
    chunks = lambda z: z.reshape(bsz, n, CHUNK, h, z.shape[-1])  # noqa: E731
    bc = chunks(b)
    inc = jax.lax.complex(_einsum("bnchk,bnchv->bhnkv", chunks(a_re), bc),
                          _einsum("bnchk,bnchv->bhnkv", chunks(a_im), bc))
    starts, final = _carry_states_associative(_chain_order(jax.lax.complex(t_re, t_im), reverse),
                                              _chain_order(inc, reverse), jax.lax.complex(s0re, s0im))
    starts = _chain_order(starts, reverse)
    s_re, s_im = jnp.real(starts), jnp.imag(starts)
    out = None
    if rows_out:
        out = (_einsum("bnchk,bhnkv->bnchv", chunks(r_re), s_re)
               - _einsum("bnchk,bhnkv->bnchv", chunks(r_im), s_im)).reshape(bsz, tp, h, b.shape[-1])
    return (out, jnp.real(final), jnp.imag(final)) + ((s_re, s_im) if save else ())
