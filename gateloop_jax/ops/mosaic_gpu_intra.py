"""The intra-chunk kernels of mode="mosaic_gpu" (ops/pallas_mosaic_gpu.py has the method): one program per (batch x
head x chunk, d_qk tile), the forward's y and the backward's coefficients from the chunk's own rows, and the variants
that choose how they run."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gateloop_jax.ops.mosaic_gpu_common import (CHUNK, SUB, TILE, _f32_staging, _mm, _mms, _polar, _store_split,
                                               _swizzled_bf16, _t, _wrap, pl, plgpu)

# The diagonals read 64-row windows of three float32 "pad" buffers (keys or queries, log|a|, arg a) at every row offset
# delta. Mosaic GPU's default (Warpgroup) lowering infers a 128-byte swizzle for such a buffer (tiles of one row of
# 32 float32) and computes the swizzle of a window relative to the window's own start, while TMA and the stores
# swizzle by absolute shared-memory address: the two agree only where the window starts a multiple of 1024 bytes (4
# rows) into the buffer, so 3 of 4 diagonals read permuted 16-byte column groups (what the H100 showed:
# experiments/kernel_dev/mosaic_swizzle_emulation.py reproduces it on CPU). The variants, by name:
#   "padded": Lane lowering semantics (the kernel states every shared-memory layout; nothing is inferred); the pad
#       buffers unswizzled with rows of TILE + 8 float32 (288 bytes: the 8 rows of 32 bytes one warp reads per load
#       spread over all 32 banks, so the shifted loads stay conflict-free), filled from registers (a TMA box cannot
#       land in rows with a gap);
#   "dense": Lane semantics, unswizzled rows of TILE float32, TMA-filled; the shifted loads are bank-conflicted;
#   "swizzled": the Warpgroup lowering with inferred layouts: the faulty form, kept to confirm the diagnosis on the GPU.
# "_carry" after the layout: the pair decay e^{R + iP} carried as a complex number, z <- z a_j with a = |a| e^{i theta}
# formed in XLA (two buffers of Re a, Im a in place of log|a|, arg a), so the loops call no exp / cos / sin: the
# special-function units run at 1/8 of the FMA rate, and the log-space form spends 2-3 of their calls per element and
# offset. Its rounding grows by ~1 ulp per step (<= 64 ulp, ~4e-6), and products of tiny gates underflow to 0, their
# value to float32 precision. "_exact" at the end turns off approx_math (PTX ex2 / sin / cos.approx), to rule the
# transcendentals in or out on the GPU.
# "_subblock" (after the decay form): the diagonals only within sub-blocks of SUB = 16 rows (15 offsets instead of
# 63); every pair (n, m) whose rows lie d = 1..3 sub-blocks apart by tensor-core products of the factored decay
# Z_nm = P_n Q_{d,m}, P_n = e^{sum of the gates from n's sub-block start to n}, Q_{d,m} = e^{sum from m + 1 to the
# end of the sub-block before n's} (mosaic_gpu_gates): both exponents are sums of log|a| <= 0 over their own rows, so
# neither factor overflows (an underflow to 0 stands for a product below float32 range), and no exponent is a
# difference of prefix sums (which cancels catastrophically at |a| ~ 1e-6). Per d, Re(q P . (k Q_d)^T) is two real
# products ([q Re P] [k Re Q_d]^T - [q Im P] [k Im Q_d]^T), kept where the rows are d sub-blocks apart.
# How the intra-chunk kernels move their (64, 64) tiles (the profile on the H100: each program waits on ~25 fetches in
# turn, one warpgroup per SM): by default each through a float32 staging tile, the fetch or store waited on at once;
# "_stream" issues every fetch two windows ahead from a list the kernel declares (_Ctx.stream) and leaves its stores in
# flight; "_direct" loads and stores between registers and global memory with no staging at all, so that with
# sub-blocks (16 zero pad rows, pad rows of TILE + 4) each kernel's shared memory fits twice in an SM.
# "_rolled" (after "_stream"): the backward kernel's products across sub-blocks (d = 1..3) in a loop over d rather
# than written out three times, their factor tiles fetched at the top of each pass into two tiles of their own. Those
# products take 2.7 of the backward kernel's 4.2 ms on the H100 (bench_backward_kernel.py: the kernel without them)
# and 60% of its code; rolled, the kernel has a third less code and took 3.58 ms against 4.19 (same call). The
# forward kernel keeps its six products written out: rolled, it took 0.76 ms against 0.65. "_paired" (after
# "_rolled"): the two products of each pass that the code issued one after the other, each waited on, issued under
# one wait: in the query rows W_d (k Re Q_d) and W_d (k Im Q_d) (k Im Q_d split into the third bf16 pair, free then),
# in the transposed scores (k Re Q_d)(q Re P)^T - (k Im Q_d)(q Im P)^T as one sum (a fourth pair, 16 KB more shared
# memory).
PAD_LAYOUTS = ("padded", "dense", "swizzled")
VARIANTS = tuple(f"{pad}{carry}{exact}" for pad in PAD_LAYOUTS for carry in ("", "_carry") for exact in ("", "_exact"))
VARIANTS += ("padded_subblock", "padded_carry_subblock", "padded_subblock_exact", "padded_scan", "padded_subblock_scan",
             "padded_stream", "padded_subblock_stream", "padded_subblock_direct", "padded_subblock_stream_rolled",
             "padded_subblock_stream_rolled_paired")
_PAD_GAP = 8  # float32 columns after each pad row ("padded")


def _split_variant(variant):
    """-> (pad layout, carry, approx_math, sub-blocks, io, rolled, paired). io: how the intra-chunk kernels move their
    tiles, "tma" (each fetch and store through a staging tile, waited on at once), "stream" ("_stream": fetches
    issued two windows ahead, stores left in flight) or "direct" ("_direct": plain loads and stores between registers
    and global memory, no staging: less shared memory, so two programs per SM with sub-blocks). rolled: the
    backward's products across sub-blocks in a loop over the distance d ("_rolled"); paired: two of them under one
    wait ("_paired")."""
    if variant not in VARIANTS:
        raise ValueError(f"gateloop_mosaic_gpu: variant={variant!r} is not one of {VARIANTS}")
    io = "stream" if "_stream" in variant else "direct" if "_direct" in variant else "tma"
    return (variant.split("_")[0], "_carry" in variant, "_exact" not in variant, "_subblock" in variant, io,
            "_rolled" in variant, "_paired" in variant)


class _Ctx:
    """Per-program helpers of the two kernels: this program's chunk and tiles, WGMMA-layout tiles, TMA fetches, the
    pad buffers (filled and read as the variant's layout says)."""

    def __init__(self, bars, h, n_chunks, pad, carry, io, zero_rows, loop_staging=(), loop_bar=0):
        self.wg = plgpu.Layout.WGMMA
        self.bars = bars
        self.loop_staging, self.loop_bar = loop_staging, loop_bar  # "_rolled": the factor tiles of the loop over d
        self.pad = pad
        self.carry = carry
        self.io = io
        self.z = zero_rows  # the pad buffers' zero rows beside the chunk's 64: one more than the walk's last offset
        self.fetches = self.out_staging = None
        pid = jax.lax.axis_index("bhc")
        self.bi, self.hi, self.j = pid // (h * n_chunks), (pid // n_chunks) % h, pid % n_chunks
        self.t0 = self.j * CHUNK
        self.kt = jax.lax.axis_index("dk")
        self.d0 = self.kt * TILE
        self.rows = plgpu.broadcasted_iota(jnp.int32, (CHUNK, TILE), 0, layout=self.wg)
        self.cols = plgpu.broadcasted_iota(jnp.int32, (CHUNK, TILE), 1, layout=self.wg)
        self.zeros = plgpu.layout_cast(jnp.zeros((CHUNK, TILE), jnp.float32), self.wg)
        self.ones = plgpu.layout_cast(jnp.ones((CHUNK, TILE), jnp.float32), self.wg)

    def load(self, ref):
        return plgpu.load(ref, layout=self.wg)

    def fetch(self, src, dst, slot=0):
        # The warpgroup barrier in commit_smem: every thread is done reading dst, and its plain SMEM stores (the
        # zero rows) are visible to the other threads and to the TMA unit.
        plgpu.commit_smem()
        plgpu.copy_gmem_to_smem(src, dst, self.bars.at[slot])
        plgpu.barrier_wait(self.bars.at[slot])

    def stream(self, fetches, staging, out_staging):
        """From here on, `get` takes the windows `fetches` lists ((ref, col0) pairs, in the order the kernel asks for
        them) through the two buffers of `staging`, each fetch issued two windows ahead, so it lands while the kernel
        computes; and `put` leaves its store in flight (out_staging). Barriers 0 and 1 are the stream's."""
        self.fetches, self.staging, self.out_staging, self.next = list(fetches), staging, out_staging, 0
        self._issue(0)
        self._issue(1)

    def _issue(self, i):
        if i < len(self.fetches):
            ref, col0 = self.fetches[i]
            plgpu.commit_smem()  # every thread is done reading the slot (loaded by the window two before)
            plgpu.copy_gmem_to_smem(self.window(ref, col0), self.staging[i % 2], self.bars.at[i % 2])

    def get(self, ref, col0, staging, slot=0):
        """This program's (64 rows, 64 columns) window of a (b, t, h, d) array, through SMEM (or, "direct", straight
        from global memory), into registers."""
        if self.io == "direct":
            return plgpu.load(self.window(ref, col0), layout=self.wg, optimized=False)
        if self.fetches is None:
            self.fetch(self.window(ref, col0), staging, slot)
            return self.load(staging)
        i = self.next
        want_ref, want_col = self.fetches[i]
        same_col = col0 is want_col or (isinstance(col0, int) and isinstance(want_col, int) and col0 == want_col)
        if ref is not want_ref or not same_col:
            raise AssertionError(f"fetch {i} is not the one the stream lists: the kernel and its fetch list disagree")
        plgpu.barrier_wait(self.bars.at[i % 2])
        value = self.load(self.staging[i % 2])
        self.next += 1
        self._issue(i + 2)
        return value

    def over_d(self, term, init):
        """term(d, carry) for the sub-block distances d = 1, 2, 3: written out, or ("_rolled") in a loop."""
        if self.loop_staging:
            return jax.lax.fori_loop(1, 4, term, init)
        for d in (1, 2, 3):  # static
            init = term(d, init)
        return init

    def prefetch_factors(self, q_d, d, parts=(0, 1)):
        """"_rolled": start the fetches of Q_d's parts (0: Re, 1: Im; q_d the six Q refs) into the loop's own tiles,
        d traced; written out, the stream brings them (nothing to do here)."""
        if not self.loop_staging:
            return
        plgpu.commit_smem()  # every thread is done reading the loop's tiles (the previous pass)
        for part in parts:
            for dd in (1, 2, 3):  # static: one branch per ref
                @pl.when(d == dd)
                def _():
                    plgpu.copy_gmem_to_smem(self.window(q_d[2 * dd - 2 + part], self.d0), self.loop_staging[part],
                                            self.bars.at[self.loop_bar + part])

    def factor(self, q_d, d, part, staging):
        """Q_d's part (0: Re, 1: Im) in registers: from the loop's tile ("_rolled", prefetch_factors), else by get."""
        if not self.loop_staging:
            return self.get(q_d[2 * d - 2 + part], self.d0, staging)
        plgpu.barrier_wait(self.bars.at[self.loop_bar + part])
        return self.load(self.loop_staging[part])

    def finish(self):
        """The end of a streamed kernel: every window taken, every store landed."""
        if self.fetches is not None:
            if self.next != len(self.fetches):
                raise AssertionError(f"{len(self.fetches) - self.next} listed fetches were never taken")
            plgpu.wait_smem_to_gmem(0)

    def window(self, ref, col0):
        return ref.at[self.bi, pl.ds(self.t0, CHUNK), self.hi, pl.ds(col0, TILE)]

    def put(self, x, staging, ref, tile, col0):
        """A (64, 64) float32 register tile to this program's window of ref (of ref[tile]: a per-tile partial). In a
        stream, through out_staging, the store left in flight until that buffer is next written; "direct", from the
        registers straight to global memory."""
        dst = self.window(ref if tile is None else ref.at[tile], col0)
        if self.io == "direct":
            dst[...] = x
            return
        streamed = self.out_staging is not None
        if streamed:
            staging = self.out_staging
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous store has read the buffer
        plgpu.commit_smem()  # every thread is done reading the staging buffer
        staging[...] = x
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(staging, dst)
        if not streamed:
            plgpu.wait_smem_to_gmem(0)

    def window_of(self, buf, row0):
        """The (64, 64) window of a pad buffer from row row0 (static or dynamic)."""
        return buf.at[pl.ds(row0, CHUNK), pl.ds(0, TILE)] if self.pad == "padded" else buf.at[pl.ds(row0, CHUNK)]

    def shifted(self, buf, row0):
        """A pad buffer's window from row row0 (any, dynamic) in registers. Unswizzled rows of TILE float32 ("dense")
        put the 8 rows a warp reads on the same banks, rows of TILE + 4 ("direct") two rows on each: Mosaic GPU
        refuses such a load unless told it may be slow."""
        conflict_free = self.pad == "padded" and self.io != "direct"
        return plgpu.load(self.window_of(buf, row0), layout=self.wg, optimized=conflict_free)

    def fill(self, src, buf, row0, staging, slot):
        """This program's window of the (b, t, h, d) array src (from column d0) into rows [row0, row0 + 64) of a pad
        buffer: by TMA, or through registers where the buffer's rows have a gap ("padded")."""
        if self.pad == "padded":
            buf[pl.ds(row0, CHUNK), pl.ds(0, TILE)] = self.get(src, self.d0, staging, slot)
        else:
            self.fetch(self.window(src, self.d0), buf.at[pl.ds(row0, CHUNK)], slot)

    def fill_pads(self, sources, bufs, data_row0, zero_row0, staging):
        """Each pad buffer: zeros in the 64 rows from zero_row0, then this program's window of its source array in
        the 64 rows from data_row0 (the windows overlap when the zero rows are fewer than 64). Each element is
        stored by a different thread in the two windows, and read by others in the shifted windows, so a warpgroup
        barrier comes before each phase: no thread still reads a buffer (the previous walk) when the zeros land, the
        zeros land before the data, the data before any shifted read. (A fetch through shared memory happens to
        bring such a barrier along; a "direct" load does not.)"""
        plgpu.commit_smem()
        for buf in bufs:
            self.window_of(buf, zero_row0)[...] = self.zeros
        plgpu.commit_smem()
        for slot, (src, buf) in enumerate(zip(sources, bufs)):
            self.fill(src, buf, data_row0, staging, slot)
        plgpu.commit_smem()

    def decay_start(self):
        """The pair decay of offset 0 (e^0): (R, P) = (0, 0) in log space, z = 1 + 0i carried."""
        return (self.ones, self.zeros) if self.carry else (self.zeros, self.zeros)

    def decay_step(self, state, g1pad, g2pad, row0):
        """The pair decay extended by one gate per row, row n taking the gate at pad row row0 + n: (R, P) + (log|a|,
        arg a) (P wrapped), or z a with the pads holding (Re a, Im a) ("_carry")."""
        a, b = state
        g1, g2 = self.shifted(g1pad, row0), self.shifted(g2pad, row0)
        if self.carry:
            return a * g1 - b * g2, a * g2 + b * g1
        return a + g1, _wrap(b + g2)

    def decay(self, state, imag=True):
        """(Re, Im) of the pair decay e^{R + iP} (Im None unless imag)."""
        a, b = state
        if self.carry:
            return a, b
        e = jnp.exp(a)
        return e * jnp.cos(b), (e * jnp.sin(b) if imag else None)

    def diagonal(self, mat, delta, upper=False):
        """mat[n, n - delta] (upper: mat[n, n + delta]) as a (64,) column, 0 where that column does not exist. (No
        -delta: the Lane lowering has no negation of a scalar.)"""
        return jnp.sum(jnp.where(self.cols == (self.rows + delta if upper else self.rows - delta), mat, 0.0), axis=1)

    def bcast(self, col):
        return jax.lax.broadcast_in_dim(col, (CHUNK, TILE), [0])

    @property
    def gap(self):
        """sub-block(row) - sub-block(column) ("_subblock"): 0 on the diagonal walk's pairs, d for the products'."""
        return jax.lax.shift_right_arithmetic(self.rows, 4) - jax.lax.shift_right_arithmetic(self.cols, 4)


def _forward_kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, *refs, h, n_chunks, n_dv, pad, carry, sub, io, rolled,
                    paired):
    """One chunk's intra-chunk output sum_{m <= n} S[n, m] v_m (pallas_mosaic_gpu's docstring) from one d_qk tile,
    every d_v tile (the scores, the costly part, are formed once). lr_ref, th_ref: the gates as the decay form takes
    them (VARIANTS: log|a| and arg a, or Re a and Im a); with sub, refs starts with the 8 sub-block factors
    (mosaic_gpu_gates).
    The staging tiles after the bf16 ones, by io (_io_staging): "tma" two, "stream" three (the fetches run ahead,
    _Ctx.stream), "direct" none. rolled, paired: the backward kernel's (VARIANTS); the products here stay as they
    are."""
    del rolled, paired
    factors, refs = (refs[:8], refs[8:]) if sub else ((), refs)
    y_ref, kpad, lrpad, thpad, a_hi, a_lo, b_hi, b_lo, *staging, bars = refs
    g1, g2 = staging[:2] if staging else (None, None)
    c = CHUNK
    x = _Ctx(bars, h, n_chunks, pad, carry, io, _zero_rows(sub))
    z = x.z
    if io == "stream":
        fetches = [(k_ref, x.d0), (lr_ref, x.d0), (th_ref, x.d0), (q_ref, x.d0)]
        fetches += _cross_scores_fetches(factors, x.d0) if sub else []
        x.stream(fetches + [(v_ref, vt * TILE) for vt in range(n_dv)], (g1, g2), staging[2])
    # The z rows above the chunk stay zero: the shifted reads of the diagonals land there for rows n < delta.
    x.fill_pads((k_ref, lr_ref, th_ref), (kpad, lrpad, thpad), z, 0, g1)
    q = x.get(q_ref, x.d0, g1, 3)
    k = x.shifted(kpad, z)
    scores = jnp.where(x.rows == x.cols, x.bcast(jnp.sum(q * k, axis=1)), 0.0)

    def offset(delta, loop):  # row n pairs query n with key n - delta
        state, scores = loop
        state = x.decay_step(state, lrpad, thpad, z + 1 - delta)
        w = jnp.sum(q * x.shifted(kpad, z - delta) * x.decay(state, imag=False)[0], axis=1)
        return state, jnp.where(x.cols == x.rows - delta, x.bcast(w), scores)

    _, scores = jax.lax.fori_loop(1, SUB if sub else c, offset, (x.decay_start(), scores))
    if sub:  # the walk's pairs that cross a sub-block boundary are the products' (they read other sub-blocks' gates)
        k = x.shifted(kpad, z)  # read again: not live through the walk
        scores = jnp.where(x.gap == 0, scores, 0.0) + _cross_scores(x, q, k, factors, g1, (a_hi, a_lo), (b_hi, b_lo))
    _store_split((a_hi, a_lo), scores)
    for vt in range(n_dv):  # static
        _store_split((b_hi, b_lo), x.get(v_ref, vt * TILE, g2, 4))
        x.put(_mm((a_hi, a_lo), (b_hi, b_lo)), g1, y_ref, x.kt, vt * TILE)
    x.finish()


def _backward_kernel(q_ref, k_ref, v_ref, dy_ref, lr_ref, th_ref, *refs, h, n_chunks, n_dv, pad, carry, sub, io,
                     rolled, paired):
    """One chunk's intra-chunk terms of the backward from one d_qk tile (W = dy v^T over all of d_v, Z_nm =
    e^{(G_n - G_m) + i(Phi_n - Phi_m)}, m < n; the m = n terms are added in XLA), in three phases:
      query rows n: sum_m W[n, m] k_m Z_nm -> its real part (dq) and imaginary part;
      key rows m:   sum_n W[n, m] q_n Z_nm -> real (dk) and imaginary parts;
      dv = A^T dy, A the scores (their transpose walked along the key rows).
    Each phase holds only its own tiles in registers (W, or W^T formed again from dy and v, with the walk's sums and the
    decay; a (64, 64) float32 tile is 32 of a thread's 255 registers): with all three at once ptxas spilled 1.6 KB per
    thread to local memory on the H100, in phases about a third of that (experiments/perf_notes.md). The key-row
    diagonals read the queries shifted up (zero rows below the chunk) and the gates from m + 1 on. With sub, refs starts
    with the 8 sub-block factors (mosaic_gpu_gates): the diagonals stay within sub-blocks, the other pairs are products
    (_cross_query_rows, _cross_key_rows, _cross_key_scores). The staging tiles after the bf16 ones, by io (_io_staging):
    "tma" one, "stream" three (the fetches run ahead, _Ctx.stream), "direct" none; then, rolled, the two of the loop
    over d. paired: a fourth bf16 pair after the three."""
    factors, refs = (refs[:8], refs[8:]) if sub else ((), refs)
    dq_ref, xim_ref, dk_ref, yim_ref, dv_ref, xpad, lrpad, thpad, *refs = refs
    a_hi, a_lo, b_hi, b_lo, c_hi, c_lo, *staging, bars = refs
    fourth, staging = (tuple(staging[:2]), staging[2:]) if paired else (None, staging)
    staging, loop_staging = (staging[:-2], staging[-2:]) if rolled else (staging, ())
    g1 = staging[0] if staging else None
    n_walk = SUB if sub else CHUNK
    x = _Ctx(bars, h, n_chunks, pad, carry, io, _zero_rows(sub), loop_staging, loop_bar=3)
    z = x.z
    if io == "stream":
        w_fetches = [w for vt in range(n_dv) for w in ((dy_ref, vt * TILE), (v_ref, vt * TILE))]
        fetches = w_fetches + [(k_ref, x.d0), (lr_ref, x.d0), (th_ref, x.d0)]
        fetches += _cross_query_rows_fetches(factors, x.d0, rolled) if sub else []
        fetches += w_fetches + [(q_ref, x.d0), (lr_ref, x.d0), (th_ref, x.d0)]
        fetches += _cross_key_rows_fetches(factors, x.d0, rolled) if sub else []
        fetches += [(k_ref, x.d0)] + (_cross_key_scores_fetches(factors, x.d0, rolled) if sub else [])
        x.stream(fetches + [(dy_ref, vt * TILE) for vt in range(n_dv)], staging[:2], staging[2])
    dy_pair, v_pair, tmp = (a_hi, a_lo), (b_hi, b_lo), (c_hi, c_lo)

    def pair_products(transposed):
        """W[n, m] = dy_n . v_m summed over the d_v tiles, or its transpose."""
        w = x.zeros
        for vt in range(n_dv):  # static
            _store_split(dy_pair, x.get(dy_ref, vt * TILE, g1))
            _store_split(v_pair, x.get(v_ref, vt * TILE, g1))
            w = w + (_mm(v_pair, _t(dy_pair)) if transposed else _mm(dy_pair, _t(v_pair)))
        return w

    # Query rows: keys shifted down by delta, gates from row n - delta + 1 to n. With sub-blocks the products come
    # first and start the walk's sums, which then see W only within sub-blocks.
    w = pair_products(transposed=False)
    x.fill_pads((k_ref, lr_ref, th_ref), (xpad, lrpad, thpad), z, 0, g1)
    dq = xim = x.zeros
    if sub:
        dq, xim = _cross_query_rows(x, w, x.shifted(xpad, z), factors, g1, dy_pair, v_pair, tmp if paired else None)
        w = jnp.where(x.gap == 0, w, 0.0)

    def query_offset(delta, loop):
        state, dq, xim = loop
        state = x.decay_step(state, lrpad, thpad, z + 1 - delta)
        z_re, z_im = x.decay(state)
        f = x.bcast(x.diagonal(w, delta)) * x.shifted(xpad, z - delta)
        return state, dq + f * z_re, xim + f * z_im

    _, dq, xim = jax.lax.fori_loop(1, n_walk, query_offset, (x.decay_start(), dq, xim))
    x.put(dq, g1, dq_ref, None, x.d0)
    x.put(xim, g1, xim_ref, None, x.d0)

    # Key rows: queries shifted up by delta, gates from row m + 1 to m + delta; rows [64, 64 + z) zero (the window
    # from row z covers them, the fill then overwrites the rows before 64).
    w_t = pair_products(transposed=True)
    x.fill_pads((q_ref, lr_ref, th_ref), (xpad, lrpad, thpad), 0, z, g1)
    dk = yim = x.zeros
    if sub:  # q P stays in dy_pair and v_pair for the scores' products
        dk, yim = _cross_key_rows(x, w_t, x.shifted(xpad, 0), factors, g1, dy_pair, v_pair, tmp)
        w_t = jnp.where(x.gap == 0, w_t, 0.0)

    def key_offset(delta, loop):
        state, dk, yim = loop
        state = x.decay_step(state, lrpad, thpad, delta)
        z_re, z_im = x.decay(state)
        f = x.bcast(x.diagonal(w_t, delta, upper=True)) * x.shifted(xpad, delta)
        return state, dk + f * z_re, yim + f * z_im

    _, dk, yim = jax.lax.fori_loop(1, n_walk, key_offset, (x.decay_start(), dk, yim))
    x.put(dk, g1, dk_ref, None, x.d0)
    x.put(yim, g1, yim_ref, None, x.d0)

    # The scores transposed, A^T[m, n] = Re(k_m . q_n Z_nm), along the same key-row diagonals (the pads still hold
    # the queries and gates); with sub-blocks the products' part waits in v_pair for dv.
    k = x.get(k_ref, x.d0, g1)
    a_t = jnp.where(x.rows == x.cols, x.bcast(jnp.sum(x.shifted(xpad, 0) * k, axis=1)), 0.0)  # m = n
    if sub:
        _store_split(v_pair, _cross_key_scores(x, k, factors, g1, dy_pair, v_pair, tmp, fourth))

    def score_offset(delta, loop):
        state, a_t = loop
        state = x.decay_step(state, lrpad, thpad, delta)
        s = jnp.sum(x.shifted(xpad, delta) * x.decay(state, imag=False)[0] * k, axis=1)
        return state, jnp.where(x.cols == x.rows + delta, x.bcast(s), a_t)

    _, a_t = jax.lax.fori_loop(1, n_walk, score_offset, (x.decay_start(), a_t))
    # With sub-blocks the walk also wrote the pairs across a boundary (the products' share): dropped.
    _store_split(tmp, jnp.where(x.gap == 0, a_t, 0.0) if sub else a_t)
    for vt in range(n_dv):
        _store_split(dy_pair, x.get(dy_ref, vt * TILE, g1))
        dv, = _mms([(tmp, dy_pair)] + ([(v_pair, dy_pair)] if sub else []))
        x.put(dv, g1, dv_ref, x.kt, vt * TILE)
    x.finish()


def _cross_scores(x, q, k, factors, staging, qt, kt):
    """The scores of the pairs d = 1..3 sub-blocks apart: Re(q_n P_n . k_m Q_{d,m}) summed over this d_qk tile, as
    [q Re P] [k Re Q_d]^T - [q Im P] [k Im Q_d]^T, each product kept where the rows are d sub-blocks apart."""
    p_re, p_im, *q_d = factors
    out = x.zeros
    for part, p_ref in enumerate((p_re, p_im)):  # static
        _store_split(qt, q * x.get(p_ref, x.d0, staging) * (1.0 - 2.0 * part))

        def term(d, out, part=part):
            x.prefetch_factors(q_d, d, parts=(part,))
            _store_split(kt, k * x.factor(q_d, d, part, staging))
            return out + jnp.where(x.gap == d, _mm(qt, _t(kt)), 0.0)

        out = x.over_d(term, out)
    return out


def _cross_scores_fetches(factors, d0):
    """The windows _cross_scores reads, in its order (_Ctx.stream)."""
    p_re, p_im, *q_d = factors
    return [(z, d0) for part, p in enumerate((p_re, p_im)) for z in (p, *q_d[part::2])]


def _cross_query_rows_fetches(factors, d0, rolled):
    """The windows _cross_query_rows reads through the stream, in its order."""
    return [(z, d0) for z in (() if rolled else factors[2:]) + tuple(factors[:2])]


def _cross_key_rows_fetches(factors, d0, rolled):
    """The windows _cross_key_rows reads through the stream, in its order."""
    return [(z, d0) for z in (factors[:2] if rolled else factors)]


def _cross_key_scores_fetches(factors, d0, rolled):
    """The windows _cross_key_scores reads through the stream, in its order."""
    return [] if rolled else [(z, d0) for z in factors[2:]]


def _cross_query_rows(x, w, k, factors, staging, wp, kp, kp_im=None):
    """(Re, Im) of sum_m W[n, m] k_m Z_nm over the pairs d = 1..3 sub-blocks apart: P_n sum_d W_d (k Q_d), W_d the
    pairs d apart (two real products per d, then one complex scaling by P). kp_im: a pair for k Im Q_d, so the two
    products go under one wait ("_paired")."""
    p_re, p_im, *q_d = factors

    def term(d, u):
        x.prefetch_factors(q_d, d)
        _store_split(wp, jnp.where(x.gap == d, w, 0.0))
        _store_split(kp, k * x.factor(q_d, d, 0, staging))
        if kp_im is not None:
            _store_split(kp_im, k * x.factor(q_d, d, 1, staging))
            u_re, u_im = _mms([(wp, kp)], [(wp, kp_im)])
            return u[0] + u_re, u[1] + u_im
        u_re = u[0] + _mm(wp, kp)
        _store_split(kp, k * x.factor(q_d, d, 1, staging))
        return u_re, u[1] + _mm(wp, kp)

    u_re, u_im = x.over_d(term, (x.zeros, x.zeros))
    p_re, p_im = x.get(p_re, x.d0, staging), x.get(p_im, x.d0, staging)
    return p_re * u_re - p_im * u_im, p_im * u_re + p_re * u_im


def _cross_key_rows(x, w_t, q, factors, staging, qp_re, qp_im, tmp):
    """Over the pairs d = 1..3 sub-blocks apart, for key rows m: (Re, Im) of sum_n W[n, m] q_n Z_nm = Q_{d,m} (W_d^T
    (q P))_m. Leaves q Re P and q Im P split in qp_re and qp_im (for _cross_key_scores)."""
    p_re, p_im, *q_d = factors
    _store_split(qp_re, q * x.get(p_re, x.d0, staging))
    _store_split(qp_im, q * x.get(p_im, x.d0, staging))

    def term(d, acc):
        dk, yim = acc
        x.prefetch_factors(q_d, d)
        _store_split(tmp, jnp.where(x.gap + d == 0, w_t, 0.0))  # rows m, columns n: n's sub-block d after m's
        v_re, v_im = _mms([(tmp, qp_re)], [(tmp, qp_im)])
        q_re, q_im = x.factor(q_d, d, 0, staging), x.factor(q_d, d, 1, staging)
        return dk + q_re * v_re - q_im * v_im, yim + q_im * v_re + q_re * v_im

    return x.over_d(term, (x.zeros, x.zeros))


def _cross_key_scores(x, k, factors, staging, qp_re, qp_im, tmp, tmp_im=None):
    """The transposed scores A^T[m, n] = Re(k_m Q_{d,m} . q_n P_n) of the pairs d = 1..3 sub-blocks apart (for dv),
    from q P as _cross_key_rows left it in qp_re, qp_im. tmp_im: a pair for -k Im Q_d, so the two products are one
    sum under one wait ("_paired")."""
    _, _, *q_d = factors

    def term(d, a_t):
        x.prefetch_factors(q_d, d)
        _store_split(tmp, k * x.factor(q_d, d, 0, staging))
        if tmp_im is not None:
            _store_split(tmp_im, -k * x.factor(q_d, d, 1, staging))
            s, = _mms([(tmp, _t(qp_re)), (tmp_im, _t(qp_im))])
            return a_t + jnp.where(x.gap + d == 0, s, 0.0)
        s = _mm(tmp, _t(qp_re))
        _store_split(tmp, k * x.factor(q_d, d, 1, staging))
        return a_t + jnp.where(x.gap + d == 0, s - _mm(tmp, _t(qp_im)), 0.0)

    return x.over_d(term, x.zeros)


def _kernel_gates(lr, th, sub_factors, variant):
    """The gates as the kernels' decay form takes them (VARIANTS: "_carry" wants Re a, Im a; th wrapped), then, for
    "_subblock", sub_factors (mosaic_gpu_gates.GateFactors.sub)."""
    _, carry, _, sub, _, _, _ = _split_variant(variant)
    return (*(_polar(lr, th) if carry else (lr, th)), *(sub_factors if sub else ()))


def _zero_rows(sub):
    """The pad buffers' zero rows: one more than the walk's last row offset (63, or 15 within sub-blocks)."""
    return SUB if sub else CHUNK


def _pad_smem(pad, sub, io):
    """A pad buffer: the zero rows beside the chunk's 64, read at every row offset (PAD_LAYOUTS). "direct" takes 4
    columns of gap, not 8 (two rows of a warp's load share banks): the backward kernel's shared memory then fits
    twice in an H100 SM's 228 KB (114.7 KB each, with sub-blocks)."""
    gap = (_PAD_GAP // 2 if io == "direct" else _PAD_GAP) if pad == "padded" else 0
    return plgpu.SMEM((CHUNK + _zero_rows(sub), TILE + gap), jnp.float32)


def _io_staging(io, tma):
    """The float32 staging tiles a kernel of this io takes (_Ctx.get, put): `tma` for the plain fetches, three for a
    stream (its two slots, the stores'), none when direct."""
    return {"tma": tma, "stream": 3, "direct": 0}[io]


def _call(body, out_type, scratch, q, v, opts, *args):
    interpret, variant = opts
    pad, carry, approx_math, sub, io, rolled, paired = _split_variant(variant)
    b, tp, h, dkp = q.shape
    grid = (b * h * (tp // CHUNK), dkp // TILE)
    body = functools.partial(body, h=h, n_chunks=tp // CHUNK, n_dv=v.shape[-1] // TILE, pad=pad, carry=carry,
                             sub=sub, io=io, rolled=rolled, paired=paired)
    # approx_math: exp2 / sin / cos by the special-function units (relative error ~1e-7 at the [-pi, pi] phases and
    # exponents <= 0 used here); the interpreter computes them exactly.
    semantics = plgpu.LoweringSemantics.Warpgroup if pad == "swizzled" else plgpu.LoweringSemantics.Lane
    params = plgpu.CompilerParams(approx_math=approx_math, lowering_semantics=semantics)
    name = f"gateloop_{body.func.__name__.strip('_')}"  # named in profiles: gateloop_forward_kernel, ...
    return plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=("bhc", "dk"), scratch_types=scratch,
                        compiler_params=params, interpret=plgpu.InterpretGPUParams() if interpret else False,
                        kernel_name=name)(*args)


def _forward_intra(q, k, v, lr, th, sub_factors, *, opts):
    """The forward kernel: the intra-chunk part of y (b, t, h, v), every (chunk, tile) an independent program."""
    b, tp, h, dkp = q.shape
    pad, _, _, sub, io, _, _ = _split_variant(opts[1])
    scratch = (
        *(_pad_smem(pad, sub, io) for _ in range(3)), *(_swizzled_bf16(CHUNK, TILE) for _ in range(4)),
        *(_f32_staging() for _ in range(_io_staging(io, tma=2))), plgpu.Barrier(num_barriers=5),
    )
    out_type = jax.ShapeDtypeStruct((dkp // TILE, b, tp, h, v.shape[-1]), jnp.float32)
    gates = _kernel_gates(lr, th, sub_factors, opts[1])
    return jnp.sum(_call(_forward_kernel, out_type, scratch, q, v, opts, q, k, v, *gates), axis=0)


def _backward_intra(q, k, v, lr, th, dy, sub_factors, *, opts):
    """The backward kernel: the intra-chunk coefficients dq, Im Dq, dk, Im Dk (b, t, h, k) and dv (b, t, h, v)."""
    b, tp, h, dkp = q.shape
    pad, _, _, sub, io, rolled, paired = _split_variant(opts[1])
    scratch = (
        *(_pad_smem(pad, sub, io) for _ in range(3)), *(_swizzled_bf16(CHUNK, TILE) for _ in range(6 + 2 * paired)),
        *(_f32_staging() for _ in range(_io_staging(io, tma=1) + 2 * rolled)),
        plgpu.Barrier(num_barriers=3 + 2 * rolled),
    )
    per_k = jax.ShapeDtypeStruct((b, tp, h, dkp), jnp.float32)
    out_type = (per_k,) * 4 + (jax.ShapeDtypeStruct((dkp // TILE, b, tp, h, v.shape[-1]), jnp.float32),)
    gates = _kernel_gates(lr, th, sub_factors, opts[1])
    dq_in, xim_in, dk_in, yim_in, dv = _call(_backward_kernel, out_type, scratch, q, v, opts, q, k, v, dy, *gates)
    return dq_in, xim_in, dk_in, yim_in, jnp.sum(dv, axis=0)
