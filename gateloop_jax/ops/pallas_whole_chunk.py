"""Whole-chunk kernels of the multi-head op (Triton): one program per chunk of C rows, C a power of two (32 or 64).

pallas_chunked.py's sub-block kernels give every program 16 rows and split the causal triangle of a chunk into 16-row
pairs, so that every factor has exponent <= 0 for any gate. That costs two ways: at C = 16 the (d_qk, d_v) complex
state is stored, reloaded and carried once per 16 rows (the state passing was ~40% of the time), and at larger C the
16-row pair products use the tensor cores poorly. Here a program owns a whole chunk:

- Tame chunk: every channel decays by at most Config.tame_nats over the chunk (G_end >= -tame_nats, G the chunk's
  inclusive prefix of log|a|; every gate |a| >= e^{-tame_nats / C} qualifies, and trained gates mostly remember).
  One reference point, the chunk start: the scores are A = Re((q e^{G + i Phi}) (k e^{-G - i Phi})^T), masked to
  m < n, two C x C x d_qk products. The factors stay within e^{tame_nats}, so the relative error stays within
  ~tame_nats x 1.2e-7 (the same bound as the sub-block kernels' tame diagonal).
- Any other chunk: the exact row walk over its C rows (kernel_util.walk_rows): the pairwise decay is a product of the
  factors in (m, n], exact for every gate in [0, 1], |a| = 0 included. Slower (C steps of C x d tiles), never wrong.
  The choice is one branch per program (lax.cond -> scf.if).
- The terms between a row and its chunk's ends have exponent <= 0 for any gate and need no branch: the state seen
  from row n, e^{G_n + i Phi_n} S, and the increment sum_m e^{(G_end - G_m) + i(..)} k_m^T v_m. The suffix
  G_end - G_m is the difference of two prefixes only in tame chunks (|G| <= tame_nats: no cancellation to speak of);
  elsewhere it is a direct sum (a 0/1 matrix product), as a difference it could cancel.

Prefix sums are Triton scans (lax.cumsum). The phase is wrapped per step, its prefix wrapped again, and the row walk
wraps its running phase every step, so every cos / sin argument stays within a few pi.

The kernels have the signatures of the sub-block ones (pallas_chunked.py's wrappers pick by Config.whole_chunk), with
grid (batch x heads, chunks) and the gradient partial sums (dL/dG, dL/dPhi) reversed inside each chunk, with one
total per chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gateloop_jax.ops import kernel_util as ku
from gateloop_jax.ops.common import cmul, polar_pair


class _Gates(NamedTuple):
    lr: jax.Array  # (C, d) log|a| per step
    pre_lr: jax.Array  # G_n, inclusive prefix inside the chunk (<= 0)
    pre_th: jax.Array  # Phi_n, inclusive prefix of the phase, wrapped
    end_lr: jax.Array  # (1, d): G at the chunk's last row (the chunk's total)
    end_th: jax.Array
    tame: object  # a traced bool, or a Python bool when Config fixes the form


def _prefix(x, tri):
    """Inclusive prefix sums down the rows: a Triton scan, or (tri given: profiling) a lower 0/1 matrix product."""
    if tri is None:
        return jnp.cumsum(x, axis=0)
    c = x.shape[0]
    return ku.dot((ku.iota((c, c), 1) <= ku.iota((c, c), 0)).astype(jnp.float32), x, tri)


def _gates(lr_ref, th_ref, bi, hi, row0, c, tame_nats, ablate, tri=None):
    lr = ku.rows(lr_ref, bi, hi, row0, c)
    th = ku.wrap(ku.rows(th_ref, bi, hi, row0, c))
    pre_lr = _prefix(lr, tri)
    pre_th = ku.wrap(_prefix(th, tri))
    last = ku.iota(lr.shape, 0) == c - 1
    end_lr = jnp.sum(jnp.where(last, pre_lr, 0.0), axis=0)[None, :]
    end_th = jnp.sum(jnp.where(last, pre_th, 0.0), axis=0)[None, :]
    if tame_nats <= 0:
        tame = False
    elif "rowloop" in ablate:  # profiling: the product form everywhere (wrong for wild gates)
        tame = True
    else:
        tame = jnp.min(end_lr) >= -tame_nats
    return _Gates(lr, pre_lr, pre_th, end_lr, end_th, tame)


def _branch(tame, fast, slow):
    if isinstance(tame, bool):
        return fast() if tame else slow()
    return jax.lax.cond(tame, fast, slow)


def _exact_suffix(lr, tri):
    """sum_{j > m} log|a_j| for each row m, as direct sums (strict upper 0/1 matrix times lr)."""
    return ku.dot(ku.strict(lr.shape[0], False).astype(jnp.float32), lr, tri)


def _inverse(pre_lr, tame_nats):
    """e^{-G}, used on the tame branch only (-G <= tame_nats there); the cap keeps an unused branch finite."""
    return jnp.exp(jnp.minimum(-pre_lr, tame_nats))


def _reverse_sum(x):
    """Inclusive reverse cumulative sum down the rows and the column totals (d,). total - prefix is a difference of
    gradient partial sums, not of exponents: its rounding stays at float32 resolution of the chunk's sum."""
    tot = jnp.sum(x, axis=0)
    return tot[None, :] - jnp.cumsum(x, axis=0) + x, tot


def outer_kernel(x_ref, y_ref, lr_ref, th_ref, out_re, out_im, *tot_refs, h, c, to_end, conj, precision, tri,
                 tame_nats, ablate=""):
    """One chunk: sum_m f_m x_m^T y_m (complex (dk, dv)) with f_m = e^{(G_end - G_m) + i(..)} (to_end: the chunk's
    increment, x = k, y = v) or conj(e^{G_m + i Phi_m}) (the cotangent of the chunk's start state from its outputs,
    x = q, y = dy). With tot_refs, also the chunk's total log|a| and wrapped phase (its transition)."""
    pid, j = pl.program_id(0), pl.program_id(1)
    bi, hi = pid // h, pid % h
    row0 = j * c
    g = _gates(lr_ref, th_ref, bi, hi, row0, c, tame_nats, ablate, tri if "prefix_mm" in ablate else None)
    x, y = ku.rows(x_ref, bi, hi, row0, c), ku.rows(y_ref, bi, hi, row0, c)
    if to_end:
        mag = _branch(g.tame, lambda: g.end_lr - g.pre_lr, lambda: _exact_suffix(g.lr, tri))
        fr, fi = polar_pair(mag, ku.wrap(g.end_th - g.pre_th))
    else:
        fr, fi = polar_pair(g.pre_lr, g.pre_th)
    if conj:
        fi = -fi
    out_re[bi, hi, j, :, :] = ku.dot_tn(x * fr, y, precision)
    out_im[bi, hi, j, :, :] = ku.dot_tn(x * fi, y, precision)
    if tot_refs:
        tot_lr_ref, tot_th_ref = tot_refs
        tot_lr_ref[bi, hi, j, :] = jnp.sum(g.end_lr, axis=0)  # (1, d) -> (d,)
        tot_th_ref[bi, hi, j, :] = jnp.sum(g.end_th, axis=0)


def query_side_kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, w_ref, s_re, s_im, *out_refs, h, c, precision, grad, tri,
                      tame_nats, ablate=""):
    """One chunk, from its queries' side.

    Forward (grad=False; w = v): y = A v + Re(q e^{G + i Phi} S), S the chunk-start state. Backward (grad=True;
    w = dy): Dq, the complex coefficient of q in sum(dy * y): the same sums with W = dy v^T in place of A and dy S^T
    in place of S; writes dq and the query halves of dL/dG, dL/dPhi (reverse-summed inside the chunk, plus totals).
    """
    pid, j = pl.program_id(0), pl.program_id(1)
    bi, hi = pid // h, pid % h
    row0 = j * c
    q, k, v = (ku.rows(r, bi, hi, row0, c) for r in (q_ref, k_ref, v_ref))
    w = ku.rows(w_ref, bi, hi, row0, c) if grad else v  # dy in the backward
    g = _gates(lr_ref, th_ref, bi, hi, row0, c, tame_nats, ablate, tri if "prefix_mm" in ablate else None)
    d = q.shape[1]
    cos, sin = jnp.cos(g.pre_th), jnp.sin(g.pre_th)
    kc, ks = k * cos, k * sin
    mag = jnp.exp(g.pre_lr)
    rho_re, rho_im = mag * cos, mag * sin
    lower = ku.strict(c, True)
    sr, si = s_re[bi, hi, j, :, :], s_im[bi, hi, j, :, :]

    if not grad:
        def row_scores(n, scores, wdec, qc_n, qs_n, cos_n, sin_n):
            row = jnp.sum(wdec * (qc_n * kc + qs_n * ks), axis=1)  # A[n, m] for m < n
            return ku.put_row(scores, n, row[None, :])

        def slow():
            return ku.walk_rows(q_ref, lr_ref, th_ref, bi, hi, row0, kc, ks, row_scores,
                                jnp.zeros((c, c), jnp.float32))

        def fast():  # A = Re((q rho) (k rho^-1)^T), m < n
            inv = _inverse(g.pre_lr, tame_nats)
            s = ku.dot_nt(q * rho_re, kc * inv, precision) + ku.dot_nt(q * rho_im, ks * inv, precision)
            return jnp.where(lower, s, 0.0)

        scores = jnp.zeros((c, c), jnp.float32) if "diag" in ablate else _branch(g.tame, fast, slow)
        eye = (ku.iota((c, c), 0) == ku.iota((c, c), 1)).astype(jnp.float32)
        scores = scores + eye * jnp.sum(q * k, axis=1)[:, None]  # m = n: q_n . k_n, no decay, no phase
        y = (ku.dot(scores, v, precision) + ku.dot(q * rho_re, sr, precision)
             - ku.dot(q * rho_im, si, precision))
        y_ref, = out_refs
        y_ref[bi, pl.ds(row0, c), hi, :] = y.astype(y_ref.dtype)
        return

    def row_grad(n, dq, wdec, qc_n, qs_n, cos_n, sin_n):
        dy_n = ku.row(w_ref, bi, hi, row0 + n)
        wcol = jnp.sum(v * dy_n, axis=1)[:, None]  # W[n, m] = dy_n . v_m, as a column over m
        r = jnp.sum(wcol * wdec * kc, axis=0)[None, :]
        im = -jnp.sum(wcol * wdec * ks, axis=0)[None, :]
        dre, dim = cmul(cos_n, sin_n, r, im)  # e^{i Phi_n} sum_m W w k_m e^{-i Phi_m}
        return ku.put_row(dq[0], n, dre), ku.put_row(dq[1], n, dim)

    zeros = jnp.zeros((c, d), jnp.float32)

    def slow():
        return ku.walk_rows(q_ref, lr_ref, th_ref, bi, hi, row0, kc, ks, row_grad, (zeros, zeros))

    def fast():  # Dq = rho (W_{m<n} (k rho^-1))
        inv = _inverse(g.pre_lr, tame_nats)
        wm = jnp.where(lower, ku.dot_nt(w, v, precision), 0.0)
        return cmul(rho_re, rho_im, ku.dot(wm, kc * inv, precision), -ku.dot(wm, ks * inv, precision))

    dq_re, dq_im = (zeros, zeros) if "diag" in ablate else _branch(g.tame, fast, slow)
    xr, xi = cmul(rho_re, rho_im, ku.dot_nt(w, sr, precision), ku.dot_nt(w, si, precision))  # rho (dy S^T)
    dq_re, dq_im = dq_re + xr, dq_im + xi
    dq_ref, dg_ref, dp_ref, dg_tot, dp_tot = out_refs
    w_diag = jnp.sum(w * v, axis=1)[:, None]  # W[n, n]
    dq_ref[bi, pl.ds(row0, c), hi, :] = dq_re + w_diag * k
    dg, dg_sum = _reverse_sum(q * dq_re)
    dp, dp_sum = _reverse_sum(-q * dq_im)
    dg_ref[bi, pl.ds(row0, c), hi, :] = dg
    dp_ref[bi, pl.ds(row0, c), hi, :] = dp
    dg_tot[bi, hi, j, :] = dg_sum
    dp_tot[bi, hi, j, :] = dp_sum


def key_side_kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, dy_ref, e_re, e_im, dk_ref, dv_ref, dg_ref, dp_ref, dg_tot,
                    dp_tot, *, h, c, precision, tri, tame_nats, ablate=""):
    """Backward, one chunk from its keys' side: Dk (complex coefficient of k) and dv from the chunk's queries n >= m
    and from the cotangent E of the chunk's end state; writes dk, dv and the key halves of dL/dG, dL/dPhi
    (reverse-summed inside the chunk, plus totals)."""
    pid, j = pl.program_id(0), pl.program_id(1)
    bi, hi = pid // h, pid % h
    row0 = j * c
    q, k, v, dy = (ku.rows(r, bi, hi, row0, c) for r in (q_ref, k_ref, v_ref, dy_ref))
    g = _gates(lr_ref, th_ref, bi, hi, row0, c, tame_nats, ablate, tri if "prefix_mm" in ablate else None)
    d = k.shape[1]
    cos, sin = jnp.cos(g.pre_th), jnp.sin(g.pre_th)
    kc, ks = k * cos, k * sin

    # For each query row n > m: Dk_m += W[n, m] w[m] q_n e^{i(Phi_n - Phi_m)} (e^{-i Phi_m} applied after the branch)
    # and dv_m += A[n, m] dy_n. Each branch also returns the suffix G_end - G_m (see the module docstring).
    def row_grad(n, carry, wdec, qc_n, qs_n, cos_n, sin_n):
        tre, tim, dv = carry
        dy_n = ku.row(dy_ref, bi, hi, row0 + n)
        wcol = jnp.sum(v * dy_n, axis=1)[:, None]
        tre = tre + wcol * wdec * qc_n
        tim = tim + wcol * wdec * qs_n
        a_col = jnp.sum(wdec * (qc_n * kc + qs_n * ks), axis=1)[:, None]  # A[n, m] as a column over m
        return tre, tim, dv + a_col * dy_n

    zeros = jnp.zeros((c, d), jnp.float32)
    dv_zeros = jnp.zeros(v.shape, jnp.float32)

    def slow():
        tre, tim, dv = ku.walk_rows(q_ref, lr_ref, th_ref, bi, hi, row0, kc, ks, row_grad, (zeros, zeros, dv_zeros))
        return tre, tim, dv, _exact_suffix(g.lr, tri)

    def fast():  # with Qt = q rho, rows m: e^{-G_m} W^T_{n>m} Qt (e^{-i Phi_m} applied below) and A^T_{n>m} dy
        mag = jnp.exp(g.pre_lr)
        qt_re, qt_im = q * (mag * cos), q * (mag * sin)
        inv = _inverse(g.pre_lr, tame_nats)
        upper = ku.strict(c, False)
        wt = jnp.where(upper, ku.dot_nt(v, dy, precision), 0.0)
        a_t = jnp.where(upper, ku.dot_nt(inv * kc, qt_re, precision) + ku.dot_nt(inv * ks, qt_im, precision), 0.0)
        return (inv * ku.dot(wt, qt_re, precision), inv * ku.dot(wt, qt_im, precision), ku.dot(a_t, dy, precision),
                g.end_lr - g.pre_lr)

    if "diag" in ablate:
        tre, tim, dv, suffix = zeros, zeros, dv_zeros, _branch(g.tame, lambda: g.end_lr - g.pre_lr,
                                                                lambda: _exact_suffix(g.lr, tri))
    else:
        tre, tim, dv, suffix = _branch(g.tame, fast, slow)
    dk_re, dk_im = cmul(cos, -sin, tre, tim)

    # The chunk's end state: k_m contributes sigma_m k_m v_m^T, sigma_m = e^{(G_end - G_m) + i(..)}; its cotangent E
    # gives Dk += sigma (v conj(E)^T) and dv += Re(k sigma conj(E)).
    sg_re, sg_im = polar_pair(suffix, ku.wrap(g.end_th - g.pre_th))
    er, ei = e_re[bi, hi, j, :, :], e_im[bi, hi, j, :, :]
    tr, ti = cmul(sg_re, sg_im, ku.dot_nt(v, er, precision), -ku.dot_nt(v, ei, precision))
    dk_re, dk_im = dk_re + tr, dk_im + ti
    dv = dv + ku.dot(k * sg_re, er, precision) + ku.dot(k * sg_im, ei, precision)

    w_diag = jnp.sum(dy * v, axis=1)[:, None]  # W[m, m]
    dk_ref[bi, pl.ds(row0, c), hi, :] = dk_re + w_diag * q
    dv_ref[bi, pl.ds(row0, c), hi, :] = dv + jnp.sum(q * k, axis=1)[:, None] * dy
    dg, dg_sum = _reverse_sum(k * dk_re)
    dp, dp_sum = _reverse_sum(-k * dk_im)  # the caller subtracts the key half: dL/dPhi = -q Im Dq + k Im Dk
    dg_ref[bi, pl.ds(row0, c), hi, :] = dg
    dp_ref[bi, pl.ds(row0, c), hi, :] = dp
    dg_tot[bi, hi, j, :] = dg_sum
    dp_tot[bi, hi, j, :] = dp_sum
