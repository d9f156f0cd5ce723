"""Multi-head GateLoop as a Pallas Mosaic GPU kernel (Hopper: wgmma, TMA), mode="mosaic_gpu".

Per head, H_n = diag(a_n) H_{n-1} + k_n^T v_n and y_n = Re(q_n H_n), a = e^{log_r + i theta} per key channel.
Time is cut into chunks of C = 64 rows (one wgmma M tile). The intra-chunk kernels take one program per (batch x
head x chunk, d_qk tile of 64 channels), all independent, each walking the d_v tiles of 64; what passes between
chunks is the state, carried by the state pass. With G, Phi the cumulative log|a| and phase from the chunk start:

- Intra-chunk scores S[n, m] = sum_d q_nd k_md e^{G_nd - G_md} cos(Phi_nd - Phi_md), m <= n, by diagonals: for each
  offset delta = n - m the decay of every row is extended by one step, R <- R + log_r[n - delta + 1] (a running sum
  over the pair's own segment, never a difference of prefix sums, so no cancellation and no overflow: every exponent
  is <= 0 and any gate in [0, 1] is exact, |a| = 0 included), the phase likewise (wrapped each step), and the keys
  are read shifted by delta rows from shared memory (64 zero rows above the chunk make rows n < delta vanish).
  That is C - 1 elementwise passes over a (C, 64) tile on the CUDA cores; y_intra = S V on the tensor cores, with
  bfloat16 operands split in two (x = hi + lo; hi*hi + hi*lo + lo*hi, float32 accumulation): ~16 significant bits
  per operand, float32-level results (~1e-5). The d_qk tiles of a head each add their share (summed in XLA).
- Between chunks, the state pass (`_state_pass`): per chunk y's inter-chunk part Re(q e^{G + i Phi} H_start) (the
  rotation identity, [Re; -Im] products), then H <- T H + K_end^T V, K_end = k e^{(G_C - G_m) + i (Phi_C - Phi_m)}
  (every factor e^{<= 0}). Either a serial kernel, one program per (batch x head, d_qk tile, d_v tile) walking the
  chunks with the state (Re, Im of a 64 x 64 tile, float32) in registers and its operands (bf16 pairs formed in XLA)
  fetched two chunks ahead, or ("_scan" variants, the default) XLA's associative scan over chunks.

Backward (custom VJP): the backward kernel, per chunk and tile pair, takes the query-row diagonals (dq and Im Dq) and
the key-row diagonals (queries read shifted up: dk, Im Dk, and the transposed scores for dv = A^T dy). The state
pass rebuilds the chunk-start states and, run in reverse with conjugated factors, carries the state's cotangent E
(E_start = conj(T) E_end + (q conj(P))^T dy) and gives dv's inter-chunk part Re(k conj(F) E_end) on the way; the
other inter-chunk terms are batched products in XLA. The VJP saves only the operands as the caller passed them and
rebuilds the padded copies and the chunk-start states (t / 64 x d_qk x d_v complex per head) in the backward
(`_core_bwd`). dlog|a| and darg a follow from those coefficients (y depends on the gates only through q e^{G + i Phi},
k e^{-G - i Phi} and the chunk's end factors), each term summed over the positions whose decay it crosses, so none is
a difference of large numbers: float32-level accuracy for |a| ~ 1e-6 too.

The intra-chunk kernels are untuned: one warpgroup per program, no TMA double buffering, every product three bf16
wgmmas, the diagonals on the CUDA cores (C - 1 elementwise passes per chunk and direction). The "_subblock" variants
(VARIANTS) walk the diagonals only within 16-row sub-blocks (15 passes) and take the pairs between sub-blocks on the
tensor cores, from decay factors formed in XLA (_subblock_factors).

Shapes: the mode contract of ops/ (legend b t h k v): q, k, log_r, theta (b, t, h, k), v (b, t, h, v), h0
(b, h, k, v) complex. d_qk and d_v are padded to multiples of 64 and t to a multiple of 64 with identity steps
(a = 1, q = k = v = 0), which change nothing.

Needs jax >= 0.11 (the Pallas Mosaic GPU API used here and its GPU interpret mode, which runs the kernel on CPU for
tests); elsewhere `unavailable_reason()` says why and mode="auto" does not pick it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gateloop_jax.ops.chunked import _carry_states_associative
from gateloop_jax.ops.common import reverse_exclusive_cumsum
from gateloop_jax.ops.kernel_util import pad_operands

try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _IMPORT_ERROR = None if hasattr(plgpu, "InterpretGPUParams") else "jax.experimental.pallas.mosaic_gpu lacks "
    if _IMPORT_ERROR:
        _IMPORT_ERROR += "InterpretGPUParams"
except ImportError as e:  # pragma: no cover - depends on the installed jax
    pl = plgpu = None
    _IMPORT_ERROR = f"jax.experimental.pallas.mosaic_gpu does not import ({e})"

CHUNK = 64  # rows per chunk: the wgmma M tile
TILE = 64  # d_qk and d_v tile: 128-byte swizzled bf16 rows
MIN_JAX = (0, 11)
# On an H100 (experiments/results/mosaic_gpu_h100/, jax 0.11.2) the default variant matches the float64 oracle at
# d_qk, d_v = 32, 64, 96, 128, 256, (32, 96) and (256, 64) in all four gate regimes (worst relative error 5.8e-5 over y,
# the final state and every gradient). Its fwd+bwd at 32768 tokens x 8 heads (bf16) is 14.3 ms at d = 64, against
# 5.7 for the Triton kernel and 13.7 for "chunked"; 31.7 ms at d = 128, against 28.8 for "chunked", in 5.8 GiB
# against 9.3. So mode="auto" keeps the Triton kernel for heads up to 64 and picks this one on Hopper only for wider
# heads, where the alternative is "chunked": gateloop:125m_multihead (heads of 96) trains at L = 2048, batch 16 in
# 27.1 GiB with it (H100), where "chunked" needs 86 GiB (dispatch.resolve_mode).
_TWO_PI = 2.0 * math.pi

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
# end of the sub-block before n's} (_subblock_factors): both exponents are sums of log|a| <= 0 over their own rows, so
# neither factor overflows (an underflow to 0 stands for a product below float32 range), and no exponent is a
# difference of prefix sums (which cancels catastrophically at |a| ~ 1e-6). Per d, Re(q P . (k Q_d)^T) is two real
# products ([q Re P] [k Re Q_d]^T - [q Im P] [k Im Q_d]^T), kept where the rows are d sub-blocks apart.
# How the intra-chunk kernels move their (64, 64) tiles (the profile on the H100: each program waits on ~25 fetches in
# turn, one warpgroup per SM): by default each through a float32 staging tile, the fetch or store waited on at once;
# "_stream" issues every fetch two windows ahead from a list the kernel declares (_Ctx.stream) and leaves its stores in
# flight; "_direct" loads and stores between registers and global memory with no staging at all, so that with
# sub-blocks (16 zero pad rows, pad rows of TILE + 4) each kernel's shared memory fits twice in an SM.
PAD_LAYOUTS = ("padded", "dense", "swizzled")
VARIANTS = tuple(f"{pad}{carry}{exact}" for pad in PAD_LAYOUTS for carry in ("", "_carry") for exact in ("", "_exact"))
VARIANTS += ("padded_subblock", "padded_carry_subblock", "padded_subblock_exact", "padded_scan", "padded_subblock_scan",
             "padded_stream", "padded_subblock_stream", "padded_subblock_direct")
# The default keeps the state pass in XLA ("_scan", the form measured on the H100 above) until the serial kernel of
# the other variants has run on a GPU.
VARIANT = "padded_scan"
_PAD_GAP = 8  # float32 columns after each pad row ("padded")
SUB = 16  # rows per sub-block ("_subblock")


def unavailable_reason() -> str | None:
    """None when this jax can build the kernel (jax >= 0.11 with Pallas Mosaic GPU), else why not."""
    version = tuple(int(x) for x in jax.__version__.split(".")[:2])
    if version < MIN_JAX:
        return f"mode='mosaic_gpu' needs jax >= 0.11 (Pallas Mosaic GPU, its interpret mode), found {jax.__version__}"
    return _IMPORT_ERROR


def serves_default_device() -> bool:
    """True on a Hopper GPU (compute capability 9.x: wgmma) with a jax that has Pallas Mosaic GPU."""
    if unavailable_reason() is not None or jax.default_backend() != "gpu":
        return False
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    return capability.split(".")[0] == "9"


def supported(q_shape, v_shape, platform: str) -> bool:
    """Multi-head shapes on a GPU (Hopper) or on CPU (interpret mode), when this jax has Mosaic GPU."""
    return len(q_shape) == 4 and platform in ("gpu", "cuda", "cpu") and unavailable_reason() is None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _wrap(x):
    """Phase mapped to [-pi, pi] (e^{i x} unchanged): sums of wrapped phases stay small, so cos/sin stay accurate."""
    return x - _TWO_PI * jnp.round(x * (1.0 / _TWO_PI))


# --------------------------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------------------------


def _split(x):
    """float32 -> (hi, lo) bfloat16 with hi + lo = x to ~16 significant bits (registers in the kernels, arrays in
    XLA for the state pass's operands)."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


class _Ctx:
    """Per-program helpers of the two kernels: this program's chunk and tiles, WGMMA-layout tiles, TMA fetches, the
    pad buffers (filled and read as the variant's layout says)."""

    def __init__(self, bars, h, n_chunks, pad, carry, io, zero_rows):
        self.wg = plgpu.Layout.WGMMA
        self.bars = bars
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
        value = self.load(self.staging[i % 2])
        self.next += 1
        self._issue(i + 2)
        return value

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
        if self.io == "direct":
            ref = ref if tile is None else ref.at[tile]
            ref.at[self.bi, pl.ds(self.t0, CHUNK), self.hi, pl.ds(col0, TILE)][...] = x
            return
        streamed = self.out_staging is not None
        if streamed:
            staging = self.out_staging
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous store has read the buffer
        plgpu.commit_smem()  # every thread is done reading the staging buffer
        staging[...] = x
        plgpu.commit_smem()
        ref = ref if tile is None else ref.at[tile]
        plgpu.copy_smem_to_gmem(staging, ref.at[self.bi, pl.ds(self.t0, CHUNK), self.hi, pl.ds(col0, TILE)])
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


def _store_split(pair, x):
    x_hi, x_lo = _split(x)
    pair[0][...] = x_hi
    pair[1][...] = x_lo


def _mms(*sums):
    """Sums of products a @ b of bf16-split operands in SMEM (refs, possibly transposed): each entry of `sums` a list
    of (a_pair, b_pair), summed in one float32 accumulator as hi hi + hi lo + lo hi. All of them are issued under one
    commit and waited on once, so their wgmmas overlap; the operands may be rewritten right after."""
    plgpu.commit_smem()

    def body(*accs):
        for acc, terms in zip(accs, sums):
            for a_pair, b_pair in terms:
                plgpu.wgmma(acc, a_pair[0], b_pair[0])
                plgpu.wgmma(acc, a_pair[0], b_pair[1])
                plgpu.wgmma(acc, a_pair[1], b_pair[0])
        plgpu.wgmma_wait(0)
        return tuple(acc[...] for acc in accs)

    return pl.run_scoped(body, *(plgpu.ACC((CHUNK, TILE), jnp.float32) for _ in sums))


def _mm(a_pair, b_pair):
    """a @ b for bf16-split operands in SMEM (_mms of one product)."""
    return _mms([(a_pair, b_pair)])[0]


def _t(pair):
    return pair[0].T, pair[1].T


def _forward_kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, *refs, h, n_chunks, n_dv, pad, carry, sub, io):
    """One chunk's intra-chunk output sum_{m <= n} S[n, m] v_m (module docstring) from one d_qk tile, every d_v tile
    (the scores, the costly part, are formed once). lr_ref, th_ref: the gates as the decay form takes them (VARIANTS:
    log|a| and arg a, or Re a and Im a); with sub, refs starts with the 8 factors of _subblock_factors. The staging
    tiles after the bf16 ones, by io (_io_staging): "tma" two, "stream" three (the fetches run ahead, _Ctx.stream),
    "direct" none."""
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


def _backward_kernel(q_ref, k_ref, v_ref, dy_ref, lr_ref, th_ref, *refs, h, n_chunks, n_dv, pad, carry, sub, io):
    """One chunk's intra-chunk terms of the backward from one d_qk tile (W = dy v^T over all of d_v, Z_nm =
    e^{(G_n - G_m) + i(Phi_n - Phi_m)}, m < n; the m = n terms are added in XLA):
      query rows n: sum_m W[n, m] k_m Z_nm -> its real part (dq) and imaginary part;
      key rows m:   sum_n W[n, m] q_n Z_nm -> real (dk) and imaginary parts; and dv = A^T dy with A the scores.
    The key-row diagonals read the queries shifted up (64 zero rows below the chunk) and the gates from m + 1 on.
    With sub, refs starts with the 8 factors of _subblock_factors: the diagonals stay within sub-blocks, the other
    pairs are products (_cross_query_rows, _cross_key_rows). The staging tiles after the bf16 ones, by io
    (_io_staging): "tma" one, "stream" three (the fetches run ahead, _Ctx.stream), "direct" none."""
    factors, refs = (refs[:8], refs[8:]) if sub else ((), refs)
    dq_ref, xim_ref, dk_ref, yim_ref, dv_ref, xpad, lrpad, thpad, *refs = refs
    a_hi, a_lo, b_hi, b_lo, c_hi, c_lo, *staging, bars = refs
    g1 = staging[0] if staging else None
    c = CHUNK
    n_walk = SUB if sub else c
    x = _Ctx(bars, h, n_chunks, pad, carry, io, _zero_rows(sub))
    z = x.z
    if io == "stream":
        fetches = [w for vt in range(n_dv) for w in ((dy_ref, vt * TILE), (v_ref, vt * TILE))]
        fetches += [(k_ref, x.d0), (lr_ref, x.d0), (th_ref, x.d0)]
        fetches += _cross_query_rows_fetches(factors, x.d0) if sub else []
        fetches += [(q_ref, x.d0), (lr_ref, x.d0), (th_ref, x.d0), (k_ref, x.d0)]
        fetches += _cross_key_rows_fetches(factors, x.d0) if sub else []
        x.stream(fetches + [(dy_ref, vt * TILE) for vt in range(n_dv)], staging[:2], staging[2])
    dy_pair, v_pair, tmp = (a_hi, a_lo), (b_hi, b_lo), (c_hi, c_lo)
    w = w_t = x.zeros
    for vt in range(n_dv):  # static: W and W^T summed over the d_v tiles
        _store_split(dy_pair, x.get(dy_ref, vt * TILE, g1))
        _store_split(v_pair, x.get(v_ref, vt * TILE, g1))
        w_part, w_t_part = _mms([(dy_pair, _t(v_pair))], [(v_pair, _t(dy_pair))])  # W[n, m] = dy_n . v_m
        w, w_t = w + w_part, w_t + w_t_part

    # Query rows: keys shifted down by delta, gates from row n - delta + 1 to n.
    x.fill_pads((k_ref, lr_ref, th_ref), (xpad, lrpad, thpad), z, 0, g1)
    # With sub-blocks the products come first and start the walk's sums, which then see W only within sub-blocks:
    # no more tiles live through the walk than without.
    dq = xim = x.zeros
    if sub:
        dq, xim = _cross_query_rows(x, w, x.shifted(xpad, z), factors, g1, dy_pair, v_pair)
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
    x.fill_pads((q_ref, lr_ref, th_ref), (xpad, lrpad, thpad), 0, z, g1)
    k = x.get(k_ref, x.d0, g1)
    q = x.shifted(xpad, 0)  # read here, not held through the query rows
    a_t = jnp.where(x.rows == x.cols, x.bcast(jnp.sum(q * k, axis=1)), 0.0)  # the scores transposed, m = n
    dk = yim = x.zeros
    if sub:  # the products' transposed scores wait in v_pair for dv
        dk, yim, a_t_x = _cross_key_rows(x, w_t, q, k, factors, g1, dy_pair, v_pair, tmp)
        _store_split(v_pair, a_t_x)
        w_t = jnp.where(x.gap == 0, w_t, 0.0)

    def key_offset(delta, loop):
        state, dk, yim, a_t = loop
        state = x.decay_step(state, lrpad, thpad, delta)
        z_re, z_im = x.decay(state)
        q_shifted = x.shifted(xpad, delta)
        qc, qs = q_shifted * z_re, q_shifted * z_im
        wcol = x.bcast(x.diagonal(w_t, delta, upper=True))
        a_t = jnp.where(x.cols == x.rows + delta, x.bcast(jnp.sum(qc * k, axis=1)), a_t)
        return state, dk + wcol * qc, yim + wcol * qs, a_t

    _, dk, yim, a_t = jax.lax.fori_loop(1, n_walk, key_offset, (x.decay_start(), dk, yim, a_t))
    x.put(dk, g1, dk_ref, None, x.d0)
    x.put(yim, g1, yim_ref, None, x.d0)
    # With sub-blocks the walk also wrote the pairs across a boundary (from other sub-blocks' gates): dropped.
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
        for d in (1, 2, 3):
            _store_split(kt, k * x.get(q_d[2 * (d - 1) + part], x.d0, staging))
            out = out + jnp.where(x.gap == d, _mm(qt, _t(kt)), 0.0)
    return out


def _cross_scores_fetches(factors, d0):
    """The windows _cross_scores reads, in its order (_Ctx.stream)."""
    p_re, p_im, *q_d = factors
    return [(z, d0) for part, p in enumerate((p_re, p_im)) for z in (p, *q_d[part::2])]


def _cross_query_rows_fetches(factors, d0):
    """The windows _cross_query_rows reads, in its order."""
    return [(z, d0) for z in (*factors[2:], *factors[:2])]


def _cross_key_rows_fetches(factors, d0):
    """The windows _cross_key_rows reads, in its order."""
    return [(z, d0) for z in factors]


def _cross_query_rows(x, w, k, factors, staging, wp, kp):
    """(Re, Im) of sum_m W[n, m] k_m Z_nm over the pairs d = 1..3 sub-blocks apart: P_n sum_d W_d (k Q_d), W_d the
    pairs d apart (two real products per d, then one complex scaling by P)."""
    p_re, p_im, *q_d = factors
    u_re = u_im = x.zeros
    for d in (1, 2, 3):  # static
        _store_split(wp, jnp.where(x.gap == d, w, 0.0))
        _store_split(kp, k * x.get(q_d[2 * d - 2], x.d0, staging))
        u_re = u_re + _mm(wp, kp)
        _store_split(kp, k * x.get(q_d[2 * d - 1], x.d0, staging))
        u_im = u_im + _mm(wp, kp)
    p_re, p_im = x.get(p_re, x.d0, staging), x.get(p_im, x.d0, staging)
    return p_re * u_re - p_im * u_im, p_im * u_re + p_re * u_im


def _cross_key_rows(x, w_t, q, k, factors, staging, qp_re, qp_im, tmp):
    """Over the pairs d = 1..3 sub-blocks apart, for key rows m: (Re, Im) of sum_n W[n, m] q_n Z_nm = Q_{d,m} (W_d^T
    (q P))_m, and the transposed scores A^T[m, n] = Re(k_m Q_{d,m} . q_n P_n) (for dv)."""
    p_re, p_im, *q_d = factors
    _store_split(qp_re, q * x.get(p_re, x.d0, staging))
    _store_split(qp_im, q * x.get(p_im, x.d0, staging))
    dk = yim = a_t = x.zeros
    for d in (1, 2, 3):  # static
        apart = x.gap == -d  # rows m, columns n: n's sub-block d after m's
        _store_split(tmp, jnp.where(apart, w_t, 0.0))
        v_re, v_im = _mms([(tmp, qp_re)], [(tmp, qp_im)])
        q_re, q_im = x.get(q_d[2 * d - 2], x.d0, staging), x.get(q_d[2 * d - 1], x.d0, staging)
        dk, yim = dk + q_re * v_re - q_im * v_im, yim + q_im * v_re + q_re * v_im
        _store_split(tmp, k * q_re)
        s = _mm(tmp, _t(qp_re))
        _store_split(tmp, k * q_im)
        a_t = a_t + jnp.where(apart, s - _mm(tmp, _t(qp_im)), 0.0)
    return dk, yim, a_t


def _state_pass_kernel(*refs, h, n_chunks, reverse, rows_out, save):
    """The state between chunks, serial over the chunks of one (batch x head, d_qk tile, d_v tile), the state S in
    registers (float32, Re and Im of a 64 x 64 tile). Per chunk j (in reverse order with reverse):
      rows_out: out[j] = Re(R S) = [Re R] S_re + [-Im R] S_im, S the state entering the chunk (this d_qk tile's
        share, summed in XLA);
      save: S itself to saved (Re, Im);
      then S <- T_j S + A^T b (T per d_qk row).
    Every operand of a product comes as a bf16 pair (hi, lo: _split in _state_pass) and lands in shared memory by TMA,
    two chunks in flight: the chain's cost is its latency, so nothing on it waits for memory or computes a factor.
    Outputs go from registers straight to global memory."""
    n_in = 4 * rows_out + 6
    ins, refs = refs[:n_in], refs[n_in:]
    t_re_ref, t_im_ref, s0re_ref, s0im_ref = refs[:4]
    n_out = rows_out + 2 + 2 * save
    outs, refs = refs[4:4 + n_out], refs[4 + n_out:]
    out_ref = outs[0] if rows_out else None
    fre_ref, fim_ref, *saved = outs[rows_out:]
    bufs, t_smem, state, bars = refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:n_in + 6], refs[n_in + 6]
    c = CHUNK
    wg = plgpu.Layout.WGMMA
    pid = jax.lax.axis_index("bh")
    bi, hi = pid // h, pid % h
    kt, vt = jax.lax.axis_index("dk"), jax.lax.axis_index("dv")
    k_cols, v_cols = pl.ds(kt * TILE, TILE), pl.ds(vt * TILE, TILE)
    cols = (k_cols,) * (n_in - 2) + (v_cols,) * 2  # the b pair is last

    def chunk_of(i):
        return n_chunks - 1 - i if reverse else i

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
        store_state(s_re, s_im)
        return s_re, s_im

    fetch(0, 0)
    s = tuple(plgpu.load(ref.at[bi, hi, k_cols, v_cols], layout=wg, optimized=False) for ref in (s0re_ref, s0im_ref))
    store_state(*s)
    s_re, s_im = jax.lax.fori_loop(0, n_chunks, step, s)
    fre_ref.at[bi, hi, k_cols, v_cols][...] = s_re
    fim_ref.at[bi, hi, k_cols, v_cols][...] = s_im


def _state_pass(r_re, r_im, a_re, a_im, b, t_re, t_im, s0re, s0im, *, opts, reverse=False, rows_out=True,
                save=False):
    """The state pass between chunks, over every (batch x head, d_qk tile, d_v tile): per chunk j (reversed with
    reverse), out[j] = Re(R S) with S the state entering the chunk (rows_out), S saved (save), then S <- T_j S + A^T b.
    R = r_re + i r_im and A = a_re + i a_im (b, t, h, k), b (b, t, h, v), T (b, h, n, k) as (Re, Im), S_0 (b, h, k, v)
    as (Re, Im), all float32 and padded. -> (out (b, t, h, v) or None, the final state (Re, Im), and with save the
    state entering each chunk (b, h, n, k, v) as (Re, Im)). opts: (interpret, variant); the "_scan" variants take
    _state_pass_xla, the others _state_pass_kernel.
    Forward: (R, A, b, T) = (q P, k F, v, T) gives y's inter-chunk part and the chunk-start states. Backward: the
    state's cotangent E, in reverse with (k conj(F), q conj(P), dy, conj(T)): out is dv's inter-chunk part Re(k
    conj(F) E_end), saved each chunk's E_end, the final value dh0."""
    interpret, variant = opts
    if variant.endswith("_scan"):
        return _state_pass_xla(r_re, r_im, a_re, a_im, b, t_re, t_im, s0re, s0im, reverse=reverse,
                               rows_out=rows_out, save=save)
    bsz, tp, h, dkp = a_re.shape
    dvp = b.shape[-1]
    n = tp // CHUNK
    f32 = jnp.float32
    operands = (*_split(r_re), *_split(-r_im)) if rows_out else ()
    operands += (*_split(a_re), *_split(a_im), *_split(b))
    out_type = [jax.ShapeDtypeStruct((dkp // TILE, bsz, tp, h, dvp), f32)] if rows_out else []
    out_type += [jax.ShapeDtypeStruct((bsz, h, dkp, dvp), f32)] * 2
    if save:
        out_type += [jax.ShapeDtypeStruct((bsz, h, n, dkp, dvp), f32)] * 2
    scratch = (
        *(_swizzled_bf16(2, CHUNK, TILE) for _ in operands), plgpu.SMEM((2, TILE), f32), plgpu.SMEM((2, TILE), f32),
        *(_swizzled_bf16(CHUNK, TILE) for _ in range(4)),
        plgpu.Barrier(num_arrivals=len(operands) + 2, num_barriers=2),  # a chunk's operands and T, per slot
    )
    body = functools.partial(_state_pass_kernel, h=h, n_chunks=n, reverse=reverse, rows_out=rows_out, save=save)
    params = plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane)
    res = plgpu.kernel(body, out_type=tuple(out_type), grid=(bsz * h, dkp // TILE, dvp // TILE),
                       grid_names=("bh", "dk", "dv"), scratch_types=scratch, compiler_params=params,
                       interpret=plgpu.InterpretGPUParams() if interpret else False)(
        *operands, t_re, t_im, s0re, s0im)
    out = jnp.sum(res[0], axis=0) if rows_out else None
    return out, *res[rows_out:]


def _state_pass_xla(r_re, r_im, a_re, a_im, b, t_re, t_im, s0re, s0im, *, reverse=False, rows_out=True,
                    save=False):
    """_state_pass's contract in XLA (the "_scan" variants): every chunk's increment A^T b as a batched product, the
    states by an associative scan over chunks (depth log n), out by a batched product with the states."""
    bsz, tp, h, _ = a_re.shape
    n = tp // CHUNK
    chunks = lambda z: z.reshape(bsz, n, CHUNK, h, z.shape[-1])  # noqa: E731
    flip = (lambda z: jnp.flip(z, axis=2)) if reverse else (lambda z: z)  # noqa: E731
    bc = chunks(b)
    inc = jax.lax.complex(_einsum("bnchk,bnchv->bhnkv", chunks(a_re), bc),
                          _einsum("bnchk,bnchv->bhnkv", chunks(a_im), bc))
    starts, final = _carry_states_associative(flip(jax.lax.complex(t_re, t_im)), flip(inc),
                                              jax.lax.complex(s0re, s0im))
    s_re, s_im = jnp.real(flip(starts)), jnp.imag(flip(starts))
    out = None
    if rows_out:
        out = (_einsum("bnchk,bhnkv->bnchv", chunks(r_re), s_re)
               - _einsum("bnchk,bhnkv->bnchv", chunks(r_im), s_im)).reshape(bsz, tp, h, b.shape[-1])
    return (out, jnp.real(final), jnp.imag(final)) + ((s_re, s_im) if save else ())


def _subblock_factors(lr, th):
    """The factored decays of "_subblock" as (Re, Im) pairs, each (b, t, h, k): P (row n: e^{sum of the gates from
    n's sub-block start to n}), then Q_d for d = 1, 2, 3 (row m: e^{sum from m + 1 to the end of the (d-1)-th
    sub-block after m's}). Every exponent is summed directly over its own rows (same-sign log|a|: no cancellation); a
    Q_d that reaches past the chunk end is never used. th wrapped."""
    b, tp, h, dkp = lr.shape
    lr_s = lr.reshape(b, tp // SUB, SUB, h, dkp)
    th_s = th.reshape(b, tp // SUB, SUB, h, dkp)
    tot_r, tot_p = jnp.sum(lr_s, axis=2, keepdims=True), _wrap(jnp.sum(th_s, axis=2, keepdims=True))

    def later(z, i):  # the totals of the i-th next sub-block (zero past the end)
        return jnp.concatenate([z[:, i:], jnp.zeros_like(z[:, :i])], axis=1)

    q_r = [reverse_exclusive_cumsum(lr_s, axis=2)]
    q_p = [_wrap(reverse_exclusive_cumsum(th_s, axis=2))]
    for i in (1, 2):
        q_r.append(q_r[-1] + later(tot_r, i))
        q_p.append(_wrap(q_p[-1] + later(tot_p, i)))
    exps = [(jnp.cumsum(lr_s, axis=2), _wrap(jnp.cumsum(th_s, axis=2)))] + list(zip(q_r, q_p))
    return tuple(z.reshape(b, tp, h, dkp) for e in exps for z in _polar(*e))


def _gate_sums(lr, th):
    """Chunk-relative sums of the gates, (b, n, C, h, k), each summed directly over its own segment: inclusive prefix
    (G, Phi) from the chunk start, exclusive suffix to the chunk end; and the chunk totals (b, h, n, k). th wrapped."""
    b, tp, h, dkp = lr.shape
    n = tp // CHUNK
    lr_c = lr.reshape(b, n, CHUNK, h, dkp)
    th_c = th.reshape(b, n, CHUNK, h, dkp)
    pre_r, pre_p = jnp.cumsum(lr_c, axis=2), _wrap(jnp.cumsum(th_c, axis=2))
    suf_r = reverse_exclusive_cumsum(lr_c, axis=2)
    suf_p = _wrap(reverse_exclusive_cumsum(th_c, axis=2))
    tot_r = jnp.transpose(jnp.sum(lr_c, axis=2), (0, 2, 1, 3))
    tot_p = jnp.transpose(_wrap(jnp.sum(th_c, axis=2)), (0, 2, 1, 3))
    return pre_r, pre_p, suf_r, suf_p, tot_r, tot_p


def _polar(log_magnitude, phase):
    magnitude = jnp.exp(log_magnitude)
    return magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)


def _swizzled_bf16(*shape):
    return plgpu.SMEM(shape, jnp.bfloat16, transforms=(plgpu.TilingTransform((8, TILE)), plgpu.SwizzleTransform(128)))


def _f32_staging():
    """A (64, 64) float32 TMA staging tile, 128-byte swizzled: conflict-free loads and stores in the WGMMA layout
    (it is only ever addressed whole, so the swizzle stays aligned)."""
    return plgpu.SMEM((CHUNK, TILE), jnp.float32,
                      transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))


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
    """The float32 staging tiles a kernel of this io takes (_Ctx.get, put): `tma` for the plain fetches, two more
    for a stream (its second slot, the stores'), none when direct."""
    return {"tma": tma, "stream": 3, "direct": 0}[io]


def _split_variant(variant):
    """-> (pad layout, carry, approx_math, sub-blocks, io). io: how the intra-chunk kernels move their tiles, "tma"
    (each fetch and store through a staging tile, waited on at once), "stream" ("_stream": fetches issued two
    windows ahead, stores left in flight) or "direct" ("_direct": plain loads and stores between registers and
    global memory, no staging: less shared memory, so two programs per SM with sub-blocks)."""
    if variant not in VARIANTS:
        raise ValueError(f"gateloop_mosaic_gpu: variant={variant!r} is not one of {VARIANTS}")
    io = "stream" if "_stream" in variant else "direct" if "_direct" in variant else "tma"
    return variant.split("_")[0], "_carry" in variant, "_exact" not in variant, "_subblock" in variant, io


def _kernel_gates(lr, th, variant):
    """The gates as the kernels' decay form takes them (VARIANTS: "_carry" wants Re a, Im a; th wrapped), then, for
    "_subblock", the factors of _subblock_factors."""
    _, carry, _, sub, _ = _split_variant(variant)
    return (*(_polar(lr, th) if carry else (lr, th)), *(_subblock_factors(lr, th) if sub else ()))


def _call(body, out_type, scratch, q, v, opts, *args):
    interpret, variant = opts
    pad, carry, approx_math, sub, io = _split_variant(variant)
    b, tp, h, dkp = q.shape
    grid = (b * h * (tp // CHUNK), dkp // TILE)
    body = functools.partial(body, h=h, n_chunks=tp // CHUNK, n_dv=v.shape[-1] // TILE, pad=pad, carry=carry,
                             sub=sub, io=io)
    # approx_math: exp2 / sin / cos by the special-function units (relative error ~1e-7 at the [-pi, pi] phases and
    # exponents <= 0 used here); the interpreter computes them exactly.
    semantics = plgpu.LoweringSemantics.Warpgroup if pad == "swizzled" else plgpu.LoweringSemantics.Lane
    params = plgpu.CompilerParams(approx_math=approx_math, lowering_semantics=semantics)
    return plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=("bhc", "dk"), scratch_types=scratch,
                        compiler_params=params, interpret=plgpu.InterpretGPUParams() if interpret else False)(*args)


def _einsum(spec, *xs):
    # float32 operands and accumulation (no tf32): the inter-chunk products are part of the 1e-4 accuracy budget.
    return jnp.einsum(spec, *xs, precision=jax.lax.Precision.HIGHEST)


def _forward_intra(q, k, v, lr, th, *, opts):
    """The forward kernel: the intra-chunk part of y (b, t, h, v), every (chunk, tile) an independent program."""
    b, tp, h, dkp = q.shape
    pad, _, _, sub, io = _split_variant(opts[1])
    scratch = (
        *(_pad_smem(pad, sub, io) for _ in range(3)), *(_swizzled_bf16(CHUNK, TILE) for _ in range(4)),
        *(_f32_staging() for _ in range(_io_staging(io, tma=2))), plgpu.Barrier(num_barriers=5),
    )
    out_type = jax.ShapeDtypeStruct((dkp // TILE, b, tp, h, v.shape[-1]), jnp.float32)
    gates = _kernel_gates(lr, th, opts[1])
    return jnp.sum(_call(_forward_kernel, out_type, scratch, q, v, opts, q, k, v, *gates), axis=0)


def _chunk_starts(k, v, sums, h0re, h0im, *, opts):
    """Every chunk's start state (b, h, n, k, v) as (Re, Im) and the final state (Re, Im), by _state_pass (the
    backward's rebuild). sums: _gate_sums of the gates."""
    _, _, suf_r, suf_p, tot_r, tot_p = sums
    f_re, f_im = _polar(_flat(suf_r), _flat(suf_p))
    _, fin_re, fin_im, s_re, s_im = _state_pass(None, None, k * f_re, k * f_im, v, *_polar(tot_r, tot_p), h0re, h0im,
                                                opts=opts, rows_out=False, save=True)
    return s_re, s_im, fin_re, fin_im


def _flat(z):
    """(b, n, C, h, d) chunked -> (b, t, h, d)."""
    b, n, c, h, d = z.shape
    return z.reshape(b, n * c, h, d)


def _forward(q, k, v, lr, th, h0re, h0im, *, opts):
    """Padded float32 inputs (t, d_qk, d_v multiples of 64), th wrapped -> y (b, t, h, v) and the final state (re,
    im): the intra-chunk kernel, then the state pass (the inter-chunk part of y and the states)."""
    y = _forward_intra(q, k, v, lr, th, opts=opts)
    pre_r, pre_p, suf_r, suf_p, tot_r, tot_p = _gate_sums(lr, th)
    p_re, p_im = _polar(_flat(pre_r), _flat(pre_p))
    f_re, f_im = _polar(_flat(suf_r), _flat(suf_p))
    y_inter, fin_re, fin_im = _state_pass(q * p_re, q * p_im, k * f_re, k * f_im, v, *_polar(tot_r, tot_p), h0re,
                                          h0im, opts=opts)
    return y + y_inter, fin_re, fin_im


def _backward_intra(q, k, v, lr, th, dy, *, opts):
    """The backward kernel: the intra-chunk coefficients dq, Im Dq, dk, Im Dk (b, t, h, k) and dv (b, t, h, v)."""
    b, tp, h, dkp = q.shape
    pad, _, _, sub, io = _split_variant(opts[1])
    scratch = (
        *(_pad_smem(pad, sub, io) for _ in range(3)), *(_swizzled_bf16(CHUNK, TILE) for _ in range(6)),
        *(_f32_staging() for _ in range(_io_staging(io, tma=1))), plgpu.Barrier(num_barriers=3),
    )
    per_k = jax.ShapeDtypeStruct((b, tp, h, dkp), jnp.float32)
    out_type = (per_k,) * 4 + (jax.ShapeDtypeStruct((dkp // TILE, b, tp, h, v.shape[-1]), jnp.float32),)
    gates = _kernel_gates(lr, th, opts[1])
    dq_in, xim_in, dk_in, yim_in, dv = _call(_backward_kernel, out_type, scratch, q, v, opts, q, k, v, dy, *gates)
    return dq_in, xim_in, dk_in, yim_in, jnp.sum(dv, axis=0)


def _backward(q, k, v, lr, th, sums, s_re, s_im, dy, gf_re, gf_im, *, opts):
    """-> (dq, dk, dv, dlog_r, dtheta, dh0 re, dh0 im), all float32. th is wrapped; sums: _gate_sums(lr, th); (s_re,
    s_im) the chunk-start states (_chunk_starts)."""
    b, tp, h, _ = q.shape
    n = tp // CHUNK
    dq_in, xim_in, dk_in, yim_in, dv = _backward_intra(q, k, v, lr, th, dy, opts=opts)

    # Between chunks: the cotangent E of each chunk's end state, E_end[n-1] = the final state's cotangent, E_start[j] =
    # conj(T_j) E_end[j] + sum_n conj(P_n) q_n^T dy_n (P = e^{G + i Phi} from the chunk start), by the state pass
    # run in reverse, which also gives dv's inter-chunk part Re(k conj(F) E_end) and dh0 = E_start[0].
    pre_r, pre_p, suf_r, suf_p, tot_r, tot_p = sums
    chunks = lambda z: z.reshape(b, n, CHUNK, h, z.shape[-1])  # noqa: E731
    flat = lambda z: z.reshape(b, tp, h, z.shape[-1])  # noqa: E731
    qc, kc, vc, dyc = chunks(q), chunks(k), chunks(v), chunks(dy)
    p_re, p_im = _polar(pre_r, pre_p)
    f_re_, f_im_ = _polar(suf_r, suf_p)
    t_re, t_im = _polar(tot_r, tot_p)
    kf_re, kf_im, qp_re, qp_im = (flat(x * y) for x, y in ((kc, f_re_), (kc, f_im_), (qc, p_re), (qc, p_im)))
    dv_inter, dh0_re, dh0_im, e_re, e_im = _state_pass(kf_re, -kf_im, qp_re, -qp_im, dy, t_re, -t_im, gf_re, gf_im,
                                                       opts=opts, reverse=True, save=True)

    # The inter-chunk coefficients: Dq += P (dy H^T), Dk_F = F (v conj(E)^T), dv += Re(k F E).
    d_re, d_im = _einsum("bnchv,bhnkv->bnchk", dyc, s_re), _einsum("bnchv,bhnkv->bnchk", dyc, s_im)
    dq_off = dq_in + flat(p_re * d_re - p_im * d_im)
    xim = xim_in + flat(p_im * d_re + p_re * d_im)
    u_re, u_im = _einsum("bnchv,bhnkv->bnchk", vc, e_re), -_einsum("bnchv,bhnkv->bnchk", vc, e_im)
    dk_f, yim_f = flat(f_re_ * u_re - f_im_ * u_im), flat(f_re_ * u_im + f_im_ * u_re)
    dv = dv + dv_inter

    # The m = n terms (weight 1, no phase) are added here and left out of dL/dG below, where they cancel exactly.
    w_diag = jnp.sum(dy * v, axis=-1, keepdims=True)
    dq, dk = dq_off + w_diag * k, dk_in + dk_f + w_diag * q

    # y and the end state depend on the gates only through q e^{G + i Phi}, k e^{-G - i Phi}, F = e^{(G_C - G_m) +
    # i(..)} and T (G, Phi summed from the chunk start), so with the coefficients Dq, Dk above, per chunk:
    #   dlog_r_j = sum_{n >= j} (q Re Dq - k Re Dk_intra)_n + sum_{m < j} (k Re Dk_F)_m + Re<E_end, T H_start>,
    #   dtheta_j = sum_{n >= j} (-q Im Dq + k Im Dk_intra)_n - sum_{m < j} (k Im Dk_F)_m + Re<E_end, i T H_start>.
    # The F terms enter only for keys before j (those whose path to the chunk end crosses step j): summed that way,
    # a key's own large term (F = 1 for the chunk's last row) is never added and then cancelled.
    suffix = lambda z: jnp.flip(jnp.cumsum(jnp.flip(chunks(z), 2), axis=2), 2)  # noqa: E731

    def prefix(z):  # exclusive, summed directly (a total minus the own term would cancel)
        z = chunks(z)
        return jnp.concatenate([jnp.zeros_like(z[:, :, :1]), jnp.cumsum(z[:, :, :-1], axis=2)], axis=2)

    th_re = t_re[..., None] * s_re - t_im[..., None] * s_im  # T H_start, (b, h, n, k, v)
    th_im = t_re[..., None] * s_im + t_im[..., None] * s_re
    start_g = jnp.transpose(jnp.sum(e_re * th_re + e_im * th_im, axis=-1), (0, 2, 1, 3))[:, :, None]
    start_p = jnp.transpose(jnp.sum(e_im * th_re - e_re * th_im, axis=-1), (0, 2, 1, 3))[:, :, None]
    dlr = suffix(q * dq_off - k * dk_in) + prefix(k * dk_f) + start_g
    dth = suffix(-q * xim + k * yim_in) - prefix(k * yim_f) + start_p
    return dq, dk, dv, flat(dlr), flat(dth), dh0_re, dh0_im


def _padded(q, k, v, log_r, theta, h0re, h0im):
    """The kernels' operands: float32, t to a multiple of CHUNK, d_qk and d_v to multiples of TILE, theta wrapped."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    tp, dkp, dvp = _round_up(t, CHUNK), _round_up(dk, TILE), _round_up(dv, TILE)
    (q, k, v, lr, th), _, _ = pad_operands(q, k, v, log_r, theta, None, tp, dkp, dvp, dtype=jnp.float32)
    widths = ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv))
    return q, k, v, lr, _wrap(th), jnp.pad(h0re, widths), jnp.pad(h0im, widths)


def _pad_to(x, shape):
    """x zero-padded at the end of every axis to `shape` (the kernels' padded shape)."""
    return jnp.pad(x, [(0, p - n) for p, n in zip(shape, x.shape)])


def _unpad_like(x, like):
    """x (padded, float32) cut to like's shape and cast to its dtype."""
    return x[tuple(slice(0, n) for n in like.shape)].astype(like.dtype)


# The custom VJP takes the operands as the caller has them (unpadded, q, k, v in their own dtype) and saves only those:
# the padded float32 copies and the chunk-start states (b, h, t / 64, k, v complex, as large as q and k together at
# d = 64 and more for wider heads) are rebuilt in the backward, which costs one more pass of the XLA carry and keeps
# a many-layer model's saved activations to what its layers hold anyway.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(opts, q, k, v, log_r, theta, h0re, h0im):
    return _core_fwd(opts, q, k, v, log_r, theta, h0re, h0im)[0]


def _core_fwd(opts, q, k, v, log_r, theta, h0re, h0im):
    y, f_re, f_im = _forward(*_padded(q, k, v, log_r, theta, h0re, h0im), opts=opts)
    outs = (y[:, :v.shape[1], :, :v.shape[-1]], _unpad_like(f_re, h0re), _unpad_like(f_im, h0im))
    return outs, (q, k, v, log_r, theta, h0re, h0im)


def _core_bwd(opts, res, cts):
    # One barrier over the saved operands and this op's cotangents: XLA can neither merge the rebuilt operands and
    # states with the forward's (common-subexpression elimination would keep those alive from the forward on) nor
    # rebuild them before the backward has reached this op (every layer's copies alive at once).
    res, cts = jax.lax.optimization_barrier((res, cts))
    q, k, v, lr, th, h0re, h0im = padded = _padded(*res)
    sums = _gate_sums(lr, th)
    s_re, s_im, _, _ = _chunk_starts(k, v, sums, h0re, h0im, opts=opts)
    dy, gf_re, gf_im = cts
    grads = _backward(*padded[:5], sums, s_re, s_im, _pad_to(dy, v.shape), _pad_to(gf_re, h0re.shape),
                      _pad_to(gf_im, h0re.shape), opts=opts)
    return tuple(_unpad_like(g, x) for g, x in zip(grads, res))


_core.defvjp(_core_fwd, _core_bwd)


def gateloop_mosaic_gpu(q, k, v, log_r, theta, h0, *, interpret: bool | None = None, variant: str | None = None):
    """Mode contract: q, k, log_r, theta (b, t, h, k), v (b, t, h, v) real; h0 (b, h, k, v) complex or None.

    Returns (y (b, t, h, v) float32, final state (b, h, k, v) complex64); differentiable in every argument. Inputs
    are used in float32 (bf16 ones are upcast). interpret: Mosaic GPU's GPU interpret mode (default on CPU).
    variant: one of VARIANTS (default VARIANT), for kernel development.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"gateloop: {reason}; use mode='pallas' or 'chunked' here.")
    variant = VARIANT if variant is None else variant
    _split_variant(variant)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    if h0 is None:
        h0re = h0im = jnp.zeros((b, h, dk, dv), jnp.float32)
    else:
        h0re, h0im = jnp.real(h0).astype(jnp.float32), jnp.imag(h0).astype(jnp.float32)
    y, f_re, f_im = _core((bool(interpret), variant), q, k, v, log_r, theta, h0re, h0im)
    return y, jax.lax.complex(f_re, f_im)


__all__ = ["gateloop_mosaic_gpu", "serves_default_device", "supported", "unavailable_reason"]
