"""Max-headed GateLoop (d_qk = d_v = 1) as Pallas kernels: one complex state per channel, sequential over time.

The op is bandwidth-bound (a few flops per element), so the kernels read each input once per pass and keep the state
in registers. Each program owns `block_channels` channels of one batch row and one time segment of
`segment_length` steps. Segments make short batches (b = 4 at t = 8192) fill the GPU; they are stitched exactly:
within segment s the state is h_out = P_s h_in + local_s (P_s the product of the segment's transitions, local_s
the segment's state from a zero start), so a cheap first pass computes (P_s, local_s) and the main pass starts
each segment from its true state by folding the earlier segments' pairs (a loop of at most S steps per program).

Backward (custom_vjp): the reverse-time recurrence with conj(a),
    g_n = q_n dy_n + conj(a_{n+1}) g_{n+1},          g_T starts at the final state's cotangent,
    dq_n = Re(h_n) dy_n,  dk_n = Re(g_n) v_n,  dv_n = Re(g_n) k_n,
    w_n = a_n h_{n-1}:    dlog_r_n = Re(conj(g_n) w_n),  dtheta_n = Re(conj(g_n) i w_n),
    dh0 = conj(a_0) g_0,
segmented the same way. The forward saves only the state before each block of `unroll` steps (1 / unroll of a
pass); the backward recomputes the block's states forward in registers, then walks the block in reverse. (Recovering
h_{n-1} from h_n backwards would divide by a, unstable for |a| ~ 0.) w_n is formed from h_{n-1} directly, not as
h_n - k_n v_n, so nothing cancels when |a| is tiny.

Every loop iteration issues all loads of its `unroll` steps before any store: a store to a ref the compiler cannot
prove distinct from the inputs would otherwise hold the next step's loads back, one memory latency per step.

Packed sequences (segment_ids): an optional keep array (b, t), 0 at a segment start and 1 elsewhere, read as one
scalar per row and step, multiplies a_n: a = 0 exactly there, so the state restarts and the gradients of log|a| and
phase there, formed from w_n = a_n h_{n-1} = 0, are exactly 0. The segments' (P, local) stitching needs nothing more.

Arithmetic is float32 whatever the input dtype (bf16 inputs are upcast on load): the state is carried over
thousands of steps and a bf16 state would lose ~3 digits per step. Gradients are stored in their input's dtype
(rounded once, at the store), so bf16 inputs also halve the gradients' bytes and need no cast after the kernel.

Shapes: the mode contract of ops/ (q, k, log_r, theta (b, t, h, 1); v (b, t, h, 1); h0 (b, h, 1, 1) complex).
Inside, channels are the last (contiguous) axis: arrays are (b, t, h), a program reads rows of `block_channels`
contiguous floats, so every load is coalesced.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gateloop_jax.ops.common import cmul, polar_pair

try:  # The Triton backend's parameters; the module exists on every jax with Pallas, CPU builds included.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


class Config(NamedTuple):
    """Static kernel parameters (hashable: one compiled kernel per config and shape).

    Defaults: the fastest of the variants timed on an H200 at 32768 tokens x 512 channels (experiments/perf_notes.md).
    """

    block_channels: int = 128  # channels per program (one per thread): rows of 512 contiguous bytes
    num_warps: int = 4
    unroll: int = 8  # time steps per loop iteration: their loads are independent of the state and issue together
    segment_length: int = 0  # time steps per program; 0 = choose from the shape (see _pick_segment_length)
    num_stages: int = 3
    min_programs: int = 512  # when choosing segment_length, aim for at least this many programs


def supported(q_shape, v_shape, platform: str) -> bool:
    """Max-headed shapes only; GPU (Triton) or CPU (interpret mode, for tests)."""
    return len(q_shape) == 4 and q_shape[-1] == 1 and v_shape[-1] == 1 and platform in ("gpu", "cuda", "cpu")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _pick_segment_length(b: int, t: int, h_blocks: int, cfg: Config) -> int:
    """Longest power-of-two segment (>= unroll) that still gives cfg.min_programs programs.

    Longer segments mean fewer carries to fold and no first pass at all when one segment covers t.
    """
    seg = _next_pow2(max(t, cfg.unroll))
    while seg > cfg.unroll and b * h_blocks * ((t + seg - 1) // seg) < cfg.min_programs:
        seg //= 2
    return max(seg, cfg.unroll)


def _f32(x):
    return x.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------------------------
# Kernels. Refs are whole arrays (b, t, h) / (b, S, h) / (b, h); each program computes its own offsets.
# --------------------------------------------------------------------------------------------------------------------


def _load_rows(refs, bi, rows, cols):
    """All loads of an unrolled block first: issued before any store, they are in flight together (a store to a ref
    the compiler cannot prove distinct would otherwise keep the next step's loads behind it)."""
    return [[_f32(r[bi, n, cols]) for n in rows] for r in refs]


def _load_keeps(keep_ref, bi, rows):
    """keep (b, t) at the block's rows, scalars (0 at a segment start), loaded with the block's other rows; None
    without segment_ids."""
    return None if keep_ref is None else [keep_ref[bi, n] for n in rows]


def _gate(lr, th, keeps, u):
    """a_n = e^{lr + i th} as (re, im); at a segment start (keep 0) exactly 0, so the state restarts and the gradients
    of lr, th there, which are formed from a_n h_{n-1}, are exactly 0."""
    ar, ai = polar_pair(lr, th)
    if keeps is None:
        return ar, ai
    return ar * keeps[u], ai * keeps[u]


def _split_keep(refs, n_in, reset):
    """The kernel's first n_in input refs, keep_ref (the next input with segment_ids, else None), and the rest."""
    if reset:
        return refs[:n_in], refs[n_in], refs[n_in + 1:]
    return refs[:n_in], None, refs[n_in:]


def _fwd_local_kernel(*refs, seg, cb, unroll, reset):
    """Per segment: its state from a zero start and the product of its transitions."""
    (k_ref, v_ref, lr_ref, th_ref), keep_ref, (loc_re, loc_im, p_re, p_im) = _split_keep(refs, 4, reset)
    bi, ci, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols = pl.ds(pl.multiple_of(ci * cb, cb), cb)
    t0 = si * seg

    def body(j, carry):
        hr, hi, pr, pi = carry
        rows = [t0 + j * unroll + u for u in range(unroll)]
        ks, vs, lrs, ths = _load_rows((k_ref, v_ref, lr_ref, th_ref), bi, rows, cols)
        keeps = _load_keeps(keep_ref, bi, rows)
        for u in range(unroll):
            ar, ai = _gate(lrs[u], ths[u], keeps, u)
            hr, hi = cmul(ar, ai, hr, hi)
            hr = hr + ks[u] * vs[u]
            pr, pi = cmul(ar, ai, pr, pi)
        return hr, hi, pr, pi

    zeros = jnp.zeros((cb,), jnp.float32)
    hr, hi, pr, pi = jax.lax.fori_loop(0, seg // unroll, body, (zeros, zeros, zeros + 1.0, zeros))
    loc_re[bi, si, cols] = hr
    loc_im[bi, si, cols] = hi
    p_re[bi, si, cols] = pr
    p_im[bi, si, cols] = pi


def _fwd_kernel(*refs, seg, cb, unroll, segmented, save_states, reset):
    (q_ref, k_ref, v_ref, lr_ref, th_ref, h0_re, h0_im), keep_ref, refs = _split_keep(refs, 7, reset)
    if segmented:
        loc_re, loc_im, p_re, p_im = refs[:4]
        refs = refs[4:]
    y_ref, end_re, end_im = refs[:3]
    if save_states:
        # The state before each block of `unroll` steps (1 / unroll of a pass): the backward recomputes the block's
        # states from it in registers instead of reading all states back.
        hb_re, hb_im = refs[3:5]
    bi, ci, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols = pl.ds(pl.multiple_of(ci * cb, cb), cb)
    t0 = si * seg

    hr, hi = h0_re[bi, cols], h0_im[bi, cols]
    if segmented:
        # The true start of segment si: fold the (P, local) pairs of segments 0..si-1 into h0.
        def fold(s, carry):
            hr, hi = carry
            hr, hi = cmul(p_re[bi, s, cols], p_im[bi, s, cols], hr, hi)
            return hr + loc_re[bi, s, cols], hi + loc_im[bi, s, cols]

        hr, hi = jax.lax.fori_loop(0, si, fold, (hr, hi))

    def body(j, carry):
        hr, hi = carry
        rows = [t0 + j * unroll + u for u in range(unroll)]
        qs, ks, vs, lrs, ths = _load_rows((q_ref, k_ref, v_ref, lr_ref, th_ref), bi, rows, cols)
        keeps = _load_keeps(keep_ref, bi, rows)
        if save_states:
            blk = si * (seg // unroll) + j
            hb_re[bi, blk, cols] = hr
            hb_im[bi, blk, cols] = hi
        for u in range(unroll):
            ar, ai = _gate(lrs[u], ths[u], keeps, u)
            hr, hi = cmul(ar, ai, hr, hi)
            hr = hr + ks[u] * vs[u]
            y_ref[bi, rows[u], cols] = (qs[u] * hr).astype(y_ref.dtype)
        return hr, hi

    hr, hi = jax.lax.fori_loop(0, seg // unroll, body, (hr, hi))
    end_re[bi, si, cols] = hr
    end_im[bi, si, cols] = hi


def _bwd_local_kernel(*refs, seg, cb, unroll, reset):
    """Per segment, reverse time from a zero incoming cotangent: c <- conj(a_n) (q_n dy_n + c)."""
    (q_ref, dy_ref, lr_ref, th_ref), keep_ref, (gl_re, gl_im) = _split_keep(refs, 4, reset)
    bi, ci, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols = pl.ds(pl.multiple_of(ci * cb, cb), cb)
    t_last = si * seg + seg - 1

    def body(j, carry):
        cr, ci_ = carry
        rows = [t_last - (j * unroll + u) for u in range(unroll)]
        qs, dys, lrs, ths = _load_rows((q_ref, dy_ref, lr_ref, th_ref), bi, rows, cols)
        keeps = _load_keeps(keep_ref, bi, rows)
        for u in range(unroll):
            ar, ai = _gate(lrs[u], ths[u], keeps, u)
            gr = qs[u] * dys[u] + cr
            cr, ci_ = cmul(ar, -ai, gr, ci_)
        return cr, ci_

    zeros = jnp.zeros((cb,), jnp.float32)
    cr, ci_ = jax.lax.fori_loop(0, seg // unroll, body, (zeros, zeros))
    gl_re[bi, si, cols] = cr
    gl_im[bi, si, cols] = ci_


def _bwd_kernel(*refs, seg, cb, unroll, segmented, num_segments, reset):
    (q_ref, k_ref, v_ref, lr_ref, th_ref, dy_ref, hb_re, hb_im, gf_re, gf_im), keep_ref, refs = _split_keep(refs, 10,
                                                                                                            reset)
    if segmented:
        p_re, p_im, gl_re, gl_im = refs[:4]
        refs = refs[4:]
    dq_ref, dk_ref, dv_ref, dlr_ref, dth_ref, c_re, c_im = refs
    bi, ci, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cols = pl.ds(pl.multiple_of(ci * cb, cb), cb)
    blocks = seg // unroll

    # Incoming cotangent at the segment's last step: the final state's cotangent carried back through the later
    # segments, c <- conj(P_s) c + local_s for s = S-1 .. si+1.
    cr, cim = gf_re[bi, cols], gf_im[bi, cols]
    if segmented:
        def fold(j, carry):
            cr, cim = carry
            s = num_segments - 1 - j
            cr, cim = cmul(p_re[bi, s, cols], -p_im[bi, s, cols], cr, cim)
            return cr + gl_re[bi, s, cols], cim + gl_im[bi, s, cols]

        cr, cim = jax.lax.fori_loop(0, num_segments - 1 - si, fold, (cr, cim))

    def body(j, carry):
        cr, cim = carry
        blk = si * blocks + (blocks - 1 - j)  # blocks of the segment, last first
        rows = [blk * unroll + u for u in range(unroll)]
        qs, ks, vs, lrs, ths, dys = _load_rows((q_ref, k_ref, v_ref, lr_ref, th_ref, dy_ref), bi, rows, cols)
        keeps = _load_keeps(keep_ref, bi, rows)
        # Recompute the block's states h_{n-1} (before each step) in registers from the saved state before the block.
        hr, hi = hb_re[bi, blk, cols], hb_im[bi, blk, cols]
        before, trans = [], []
        for u in range(unroll):
            ar, ai = _gate(lrs[u], ths[u], keeps, u)
            before.append((hr, hi))
            trans.append((ar, ai))
            hr, hi = cmul(ar, ai, hr, hi)
            hr = hr + ks[u] * vs[u]
        for u in reversed(range(unroll)):
            n = rows[u]
            ar, ai = trans[u]
            pr, pim = before[u]
            gr, gi = qs[u] * dys[u] + cr, cim
            # Gradients are stored in their primal's dtype (bf16 inputs: half the bytes, no XLA cast pass after).
            dq_ref[bi, n, cols] = (hr * dys[u]).astype(dq_ref.dtype)  # hr holds h_n here
            dk_ref[bi, n, cols] = (gr * vs[u]).astype(dk_ref.dtype)
            dv_ref[bi, n, cols] = (gr * ks[u]).astype(dv_ref.dtype)
            wr, wi = cmul(ar, ai, pr, pim)  # a_n h_{n-1}, formed directly: no cancellation when |a| ~ 0
            dlr_ref[bi, n, cols] = (gr * wr + gi * wi).astype(dlr_ref.dtype)
            dth_ref[bi, n, cols] = (gi * wr - gr * wi).astype(dth_ref.dtype)
            cr, cim = cmul(ar, -ai, gr, gi)
            hr, hi = pr, pim
        return cr, cim

    cr, cim = jax.lax.fori_loop(0, blocks, body, (cr, cim))
    c_re[bi, si, cols] = cr
    c_im[bi, si, cols] = cim


# --------------------------------------------------------------------------------------------------------------------
# pallas_call wrappers on padded (b, t, h) arrays.
# --------------------------------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    b: int
    t: int  # padded length, a multiple of seg
    h: int  # padded channels, a multiple of cb
    seg: int
    cb: int
    unroll: int
    num_warps: int
    num_stages: int
    interpret: bool
    y_dtype: object = jnp.float32

    @property
    def num_segments(self):
        return self.t // self.seg

    @property
    def grid(self):
        return (self.b, self.h // self.cb, self.num_segments)


def _call(plan: _Plan, kernel, out_shapes, *args, name):
    params = None
    if not plan.interpret and plgpu is not None:
        params = plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages)
    return pl.pallas_call(
        kernel,
        out_shape=out_shapes,
        grid=plan.grid,
        interpret=plan.interpret,
        compiler_params=params,
        name=name,
    )(*args)


def _f32_shape(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _forward(plan: _Plan, q, k, v, lr, th, h0re, h0im, keep, save_states):
    b, t, h, seg, s = plan.b, plan.t, plan.h, plan.seg, plan.num_segments
    kw = dict(seg=seg, cb=plan.cb, unroll=plan.unroll, reset=keep is not None)
    keep = () if keep is None else (keep,)
    small = _f32_shape(b, s, h)
    segmented = s > 1
    extra = ()
    if segmented:
        extra = _call(plan, functools.partial(_fwd_local_kernel, **kw), (small,) * 4, k, v, lr, th, *keep,
                      name="gateloop_ew_fwd_local")
        p_re, p_im = extra[2], extra[3]
    states = (_f32_shape(b, t // plan.unroll, h),) * 2 if save_states else ()
    outs = (jax.ShapeDtypeStruct((b, t, h), plan.y_dtype), small, small) + states
    res = _call(plan, functools.partial(_fwd_kernel, segmented=segmented, save_states=save_states, **kw), outs,
                q, k, v, lr, th, h0re, h0im, *keep, *extra, name="gateloop_ew_fwd")
    y, end_re, end_im = res[:3]
    states = res[3:] if save_states else None
    transitions = (p_re, p_im) if segmented else None
    return y, end_re[:, -1], end_im[:, -1], states, transitions


def _backward(plan: _Plan, q, k, v, lr, th, h0re, h0im, keep, states, transitions, dy, gf_re, gf_im):
    b, t, h, seg, s = plan.b, plan.t, plan.h, plan.seg, plan.num_segments
    kw = dict(seg=seg, cb=plan.cb, unroll=plan.unroll, reset=keep is not None)
    keep = () if keep is None else (keep,)
    small = _f32_shape(b, s, h)
    segmented = s > 1
    extra = ()
    if segmented:
        gl = _call(plan, functools.partial(_bwd_local_kernel, **kw), (small, small), q, dy, lr, th, *keep,
                   name="gateloop_ew_bwd_local")
        extra = (*transitions, *gl)
    grads = tuple(jax.ShapeDtypeStruct((b, t, h), x.dtype) for x in (q, k, v, lr, th))
    dq, dk, dv, dlr, dth, c_re, c_im = _call(
        plan, functools.partial(_bwd_kernel, segmented=segmented, num_segments=s, **kw), grads + (small,) * 2,
        q, k, v, lr, th, dy, *states, gf_re, gf_im, *keep, *extra, name="gateloop_ew_bwd")
    return dq, dk, dv, dlr, dth, c_re[:, 0], c_im[:, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(plan, q, k, v, lr, th, h0re, h0im, keep):
    y, fre, fim, _, _ = _forward(plan, q, k, v, lr, th, h0re, h0im, keep, save_states=False)
    return y, fre, fim


def _core_fwd(plan, q, k, v, lr, th, h0re, h0im, keep):
    y, fre, fim, states, transitions = _forward(plan, q, k, v, lr, th, h0re, h0im, keep, save_states=True)
    return (y, fre, fim), (q, k, v, lr, th, h0re, h0im, keep, states, transitions)


def _core_bwd(plan, res, cts):
    q, k, v, lr, th, h0re, h0im, keep, states, transitions = res
    dy, gf_re, gf_im = cts
    # dy goes in as it comes (bf16 with a bf16 y): the kernels upcast it on load.
    grads = _backward(plan, q, k, v, lr, th, h0re, h0im, keep, states, transitions, dy, _f32(gf_re), _f32(gf_im))
    primals = (q, k, v, lr, th, h0re, h0im)
    # keep comes from the integer segment_ids: it has no gradient.
    return tuple(g.astype(p.dtype) for g, p in zip(grads, primals)) + (None if keep is None else jnp.zeros_like(keep),)


_core.defvjp(_core_fwd, _core_bwd)


def gateloop_pallas_elementwise(q, k, v, log_r, theta, h0, *, interpret: bool | None = None,
                                config: Config | None = None, out_dtype=jnp.float32, reset=None):
    """Mode contract: q, k, v, log_r, theta (b, t, h, 1) real; h0 (b, h, 1, 1) complex or None.

    Returns (y (b, t, h, 1) in out_dtype (float32 by default; ops.gateloop asks for its output dtype, so bf16 inputs
    cost no cast pass), final state (b, h, 1, 1) complex64). Differentiable (custom_vjp) in every argument, h0
    included. Any t and h: they are padded internally with identity steps (a = 1, k = v = q = 0) and
    idle channels, which change neither the outputs nor the final state. reset: (b, t) bool or None, True where a
    segment starts (the state restarts there: a = 0).
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    cfg = config or Config()
    b, t, h, _ = q.shape
    cb = min(cfg.block_channels, _next_pow2(h))
    hp = -(-h // cb) * cb
    seg = cfg.segment_length or _pick_segment_length(b, t, hp // cb, cfg)
    unroll = min(cfg.unroll, seg)
    if seg % unroll:
        raise ValueError(f"segment_length {seg} must be a multiple of unroll {unroll}")
    tp = -(-t // seg) * seg
    plan = _Plan(b, tp, hp, seg, cb, unroll, cfg.num_warps, cfg.num_stages, bool(interpret), jnp.dtype(out_dtype))

    def prep(x, value=0.0):
        x = x[..., 0]
        if tp != t or hp != h:
            x = jnp.pad(x, ((0, 0), (0, tp - t), (0, hp - h)), constant_values=value)
        return x

    args = [prep(x) for x in (q, k, v, log_r, theta)]
    if h0 is None:
        h0re = h0im = jnp.zeros((b, hp), jnp.float32)
    else:
        h0c = h0[..., 0, 0]
        h0re, h0im = jnp.real(h0c).astype(jnp.float32), jnp.imag(h0c).astype(jnp.float32)
        if hp != h:
            h0re, h0im = (jnp.pad(x, ((0, 0), (0, hp - h))) for x in (h0re, h0im))
    # Segment starts go into the kernels as keep = 0 (else 1), one scalar per (row, step) that zeroes a_n: (b, t), a
    # 1 / h of a gate array's bytes, where a select on log|a| in XLA would be a pass over all of it (and its gradient).
    keep = None if reset is None else jnp.pad(1.0 - reset.astype(jnp.float32), ((0, 0), (0, tp - t)),
                                              constant_values=1.0)
    y, fre, fim = _core(plan, *args, h0re, h0im, keep)
    final = jax.lax.complex(fre[:, :h], fim[:, :h])
    return y[:, :t, :h, None], final[:, :, None, None]


__all__ = ["Config", "gateloop_pallas_elementwise", "supported"]
