"""Nearest-codebook search: float64 reference, chunked torch path, fused Triton kernel."""

import contextlib
import functools
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl

    from triton.compiler.errors import CompilationError
    from triton.runtime import errors as _runtime_errors

    HAVE_TRITON = True
    # What a failed compile raises (the names differ between Triton versions): the launcher then
    # falls back to the torch path. Errors while a compiled kernel runs are not caught.
    _COMPILE_ERRORS = (CompilationError,) + tuple(
        getattr(_runtime_errors, name) for name in ("OutOfResources", "PTXASError", "AutotunerError")
        if hasattr(_runtime_errors, name))
except ImportError:
    HAVE_TRITON = False

# Triton decides between compiling and interpreting when it decorates the kernel (at import).
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Bound on the torch path's (chunk, K) fp32 score matrix: a small fraction of a full N x K
# matrix, yet big enough that per-op threading overhead stays negligible.
_CHUNK_BYTES = 16 * 2**20


def _check_inputs(z, codebook):
    if not (torch.is_tensor(z) and torch.is_tensor(codebook)):
        raise ValueError(f"z and codebook must be tensors, got {type(z).__name__} and {type(codebook).__name__}")
    if z.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"z must be (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    (N, D), K = z.shape, codebook.shape[0]
    if codebook.shape[1] != D:
        raise ValueError(f"z has D={D} but codebook has D={codebook.shape[1]}")
    if K == 0 or D == 0:
        raise ValueError(f"need K >= 1 codes of D >= 1 dims, got codebook {tuple(codebook.shape)}")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook is on {codebook.device}")
    if not (z.is_floating_point() and codebook.is_floating_point()):
        raise ValueError(f"z and codebook must be floating point, got {z.dtype} and {codebook.dtype}")
    return N, K, D


# Float64 reference: (codes int64 (N,), dist float64 (N,)); min(1) gives ties to the first index.
def nearest_code_reference(z, codebook):
    # Direct differences, not ||z||^2 - 2 z.c + ||c||^2, so nothing cancels.
    d = torch.cdist(z.double(), codebook.double(), compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (N, K)
    # Non-finite codes are infinitely far, as on every path (nearest_code's docstring); min would pick a NaN.
    dist, codes = d.masked_fill_(~codebook.double().pow(2).sum(1).isfinite(), float("inf")).min(1)
    return codes, dist


# Chunked torch path: the (chunk, K) scores and (chunk, D) rows are the only big temporaries, whatever N is.
def nearest_code_torch(z, codebook, chunk_size=None):
    N, K, D = _check_inputs(z, codebook)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    # float64 on a GPU: its float32 matmuls may run in TF32, and this path is the full-precision one
    dtype = torch.float64 if z.is_cuda else torch.float32
    c = codebook.to(dtype)  # (K, D)
    c_sq = c.pow(2).sum(1)  # (K,)
    # A non-finite code (a NaN or an infinity makes ||c||^2 so) is scored as a zero vector at distance
    # inf: it never wins while a finite one exists, where min(1) would pick its NaN score.
    finite = c_sq.isfinite()
    c_search, c_sq = c.where(finite[:, None], 0), c_sq.where(finite, float("inf"))
    chunk = chunk_size or max(1, _CHUNK_BYTES // (c.element_size() * (K + 2 * D)))  # scores, the rows, their codes
    codes = torch.empty(N, dtype=torch.int64, device=z.device)
    dist = torch.empty(N, dtype=torch.float32, device=z.device)
    for i in range(0, N, chunk):
        zc = z[i : i + chunk].to(dtype)  # (chunk, D)
        # ||z||^2 is the same for every code of a row, so the argmin does without it.
        # min(1) picks the first of equal minima like argmin, and runs ~2x faster on CPU.
        best = torch.addmm(c_sq, zc, c_search.T, alpha=-2).min(1).indices  # (chunk,)
        codes[i : i + chunk] = best
        # Recomputed from differences: ||z||^2 + score would lose digits to cancellation.
        dist[i : i + chunk] = (zc - c[best]).pow_(2).sum(1)
    return codes, dist


PRECISIONS = ("tf32", "tf32x3", "ieee")
# How the kernel scores a tile; all give the same codes (see nearest_code's docstring). Timed side by
# side by `python -m kernels.bench` on a GPU; "base" stays the default until a GPU run says otherwise.
VARIANTS = ("base", "prepared", "packed")

if HAVE_TRITON:
    # The fastest tiles of a sweep on an H100 (kernels/bench.py) for either precision; autotune picks.
    # They are latency-bound: ~230 registers a thread leave room for 2 programs per SM.
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4),
                             (256, 64, 8, 3)]
    ]
    # Below this many rows a search is launch-bound: one fixed tile (the best of the sweep at 65536 rows)
    # instead of autotuning, which compiles and times every config the first time it sees a K and D.
    _TUNE_MIN_N = 16384
    _FIXED_BLOCKS = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}
    # The interpreter runs programs one after another in numpy, so few big blocks are fastest.
    _INTERPRET_BLOCKS = {"BLOCK_N": 128, "BLOCK_K": 256}
    RESIDENT_D = 128  # up to this D (padded to a power of two) a program keeps its z tile in registers
    CHUNK_D = 32  # above it, z and codebook tiles stream in D chunks of this width
    # tl.dot needs an inner dimension of at least 8 for fp32 operands (16 for 16-bit ones): narrower
    # codes are padded with the zeros that the masked loads give, which change no dot product.
    MIN_D = 16
    # The prepared codebook's K is padded to a multiple of every BLOCK_K (powers of two up to this), so
    # its tile loads need no mask; padded codes get ||c||^2 = inf and never win.
    K_ALIGN = 256
    _MIN_BLOCK_K = 32  # the smallest BLOCK_K among the configs: it sets the most tiles a packed key must count

    @triton.jit
    def _tf32_round(x):
        """x rounded to tf32 (10 mantissa bits, ties away from zero), so x - result is exact in fp32."""
        return ((x.to(tl.int32, bitcast=True) + 0x1000) & -0x2000).to(tl.float32, bitcast=True)

    @triton.jit
    def _dot(a, b, acc, PRECISION: tl.constexpr, EMULATE_TF32: tl.constexpr):
        """acc + a @ b. EMULATE_TF32 (the interpreter, whose dots are exact fp32) truncates the operands
        of a tf32 dot to tf32 first, the worst a tensor core does, so the tf32 proof is tested too."""
        if PRECISION == "tf32" and EMULATE_TF32:
            a = (a.to(tl.int32, bitcast=True) & -0x2000).to(tl.float32, bitcast=True)
            b = (b.to(tl.int32, bitcast=True) & -0x2000).to(tl.float32, bitcast=True)
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _search(z_ptr, c_ptr, rows, row_ok, K, D, stride_zn, stride_zd, stride_ck, stride_cd,
                PRECISION: tl.constexpr, CERTIFY: tl.constexpr, EMULATE_TF32: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr):
        """Variant "base": scan every code for these rows: (best score, its code, second-best score, max ||c||^2)."""
        # int64 offsets throughout: ks * stride_ck or rows * stride_zn pass 2**31 on big strided inputs.
        ds = tl.arange(0, BLOCK_D).to(tl.int64)
        if RESIDENT:  # loaded once, kept in registers for every codebook tile
            zt = tl.load(z_ptr + rows[:, None] * stride_zn + ds[None, :] * stride_zd,
                         mask=row_ok[:, None] & (ds[None, :] < D), other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        # A running minimum per (row, column of the tile), so the loop has no cross-thread reductions:
        # slot j of a row holds the best of codes j, j + BLOCK_K, j + 2 BLOCK_K, ... and where it was.
        best_v = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        best_i = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
        second_v = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        c_max = 0.0
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # (BLOCK_K,)
            k_ok = ks < K
            if RESIDENT:
                ct = tl.load(c_ptr + ks[None, :] * stride_ck + ds[:, None] * stride_cd,
                             mask=(ds[:, None] < D) & k_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_K)
                dot = _dot(zt, ct, tl.zeros([BLOCK_N, BLOCK_K], tl.float32), PRECISION, EMULATE_TF32)
                # Computed here, the same way for every code, so duplicate codes score identically.
                c_sq = tl.sum(ct * ct, axis=0)
            else:
                dot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
                c_sq = tl.zeros([BLOCK_K], tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + ds
                    zc = tl.load(z_ptr + rows[:, None] * stride_zn + dd[None, :] * stride_zd,
                                 mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
                    ct = tl.load(c_ptr + ks[None, :] * stride_ck + dd[:, None] * stride_cd,
                                 mask=(dd[:, None] < D) & k_ok[None, :], other=0.0).to(tl.float32)
                    dot = _dot(zc, ct, dot, PRECISION, EMULATE_TF32)
                    c_sq += tl.sum(ct * ct, axis=0)
            # ||z||^2 is the same for every code of a row, so the argmin does without it;
            # padded codes score inf so they never win.
            score = tl.where(k_ok[None, :], c_sq[None, :] - 2.0 * dot, float("inf"))  # (BLOCK_N, BLOCK_K)
            better = score < best_v  # strict: an equal score in a later tile keeps the lower index
            if CERTIFY:  # the runner-up of each slot too, to prove the winner despite rounding
                second_v = tl.where(better, best_v, tl.minimum(second_v, score))
                # non-finite codes score NaN or inf and never win: the bound need not cover them
                c_max = tl.maximum(c_max, tl.max(tl.where(c_sq < float("inf"), c_sq, 0.0), axis=0))
            best_v = tl.where(better, score, best_v)
            best_i = tl.where(better, k0, best_i)
        best = tl.min(best_v, axis=1)  # (BLOCK_N,)
        code = best_i + tl.arange(0, BLOCK_K)[None, :]  # (BLOCK_N, BLOCK_K) the code each slot holds
        best_k = tl.min(tl.where(best_v == best[:, None], code, K - 1), axis=1)  # lowest index among equal minima
        second = best
        if CERTIFY:  # the winning slot's runner-up, or any other slot's best
            second = tl.min(tl.where(code == best_k[:, None], second_v, best_v), axis=1)
        return best, best_k.to(tl.int64), second, c_max

    @triton.jit
    def _dot_prepared(z_hi, z_lo, p_ptr, offs, plane, acc, PRECISION: tl.constexpr, EMULATE_TF32: tl.constexpr):
        """acc + z @ (-2 C).T from the prepared codebook; tf32x3 as three tf32 dots on both splits (the
        lo @ lo term, under 2**-22 of the product, is left out, as Triton's own tf32x3 does)."""
        c_hi = tl.load(p_ptr + offs)  # (BLOCK_D, BLOCK_K), zeros past D: no mask needed
        if PRECISION == "tf32x3":
            c_lo = tl.load(p_ptr + plane + offs)
            acc = _dot(z_lo, c_hi, acc, "tf32", EMULATE_TF32)  # the small terms first, then the big one
            acc = _dot(z_hi, c_lo, acc, "tf32", EMULATE_TF32)
            return _dot(z_hi, c_hi, acc, "tf32", EMULATE_TF32)
        return _dot(z_hi, c_hi, acc, PRECISION, EMULATE_TF32)

    @triton.jit
    def _search_prepared(z_ptr, p_ptr, csq_ptr, rows, row_ok, K, D, Kp, Dp, stride_zn, stride_zd,
                         PRECISION: tl.constexpr, CERTIFY: tl.constexpr, PACKED: tl.constexpr,
                         EMULATE_TF32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr):
        """Variants "prepared" and "packed": as _search, on the codebook that _prepare_kernel laid out
        once per call (-2 C, its tf32 split, ||c||^2), so a tile costs a dot and one add per score."""
        ds = tl.arange(0, BLOCK_D)
        plane = Dp * Kp  # offset of the lo split; int32 offsets in the prepared codebook (checked < 2**31)
        z_sq = tl.zeros([BLOCK_N], tl.float32)
        if RESIDENT:
            zt = tl.load(z_ptr + rows[:, None] * stride_zn + ds[None, :].to(tl.int64) * stride_zd,
                         mask=row_ok[:, None] & (ds[None, :] < D), other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            z_hi, z_lo = zt, zt
            if PRECISION == "tf32x3":  # split once per program, not once per codebook tile
                z_hi = _tf32_round(zt)
                z_lo = zt - z_hi
            z_sq = tl.sum(zt * zt, axis=1)
        elif PACKED:
            for d0 in range(0, D, BLOCK_D):
                dd = (d0 + ds).to(tl.int64)
                zc = tl.load(z_ptr + rows[:, None] * stride_zn + dd[None, :] * stride_zd,
                             mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
                z_sq += tl.sum(zc * zc, axis=1)
        if PACKED:
            # One int32 key per slot: the distance's bits (its order, for distances >= 0) with the tile
            # number in the low bits, so the running argmin is one min and the index comes out of it.
            # Truncating the low bits makes distances within 2**bits ulps equal, and then the lower
            # index wins: a near-tie, which the proof below allows for.
            low = 0  # 2**bits - 1 >= the last tile number
            while low < tl.cdiv(K, BLOCK_K) - 1:
                low = low * 2 + 1
            best = tl.full([BLOCK_N, BLOCK_K], 0x7FFFFFFF, tl.int32)
            second = tl.full([BLOCK_N, BLOCK_K], 0x7FFFFFFF, tl.int32)
        else:
            best_v = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
            best_i = tl.zeros([BLOCK_N, BLOCK_K], tl.int32)
            second_v = tl.full([BLOCK_N, BLOCK_K], float("inf"), tl.float32)
        c_max = 0.0
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            c_sq = tl.load(csq_ptr + ks)  # inf past K
            if PACKED:  # the accumulator starts at ||z||^2 + ||c||^2: it ends as the squared distance
                acc = z_sq[:, None] + c_sq[None, :]
            else:
                acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            if RESIDENT:
                acc = _dot_prepared(z_hi, z_lo, p_ptr, ds[:, None] * Kp + ks[None, :], plane, acc, PRECISION,
                                    EMULATE_TF32)
            else:
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + ds
                    zc = tl.load(z_ptr + rows[:, None] * stride_zn + dd[None, :].to(tl.int64) * stride_zd,
                                 mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
                    zc_hi, zc_lo = zc, zc
                    if PRECISION == "tf32x3":
                        zc_hi = _tf32_round(zc)
                        zc_lo = zc - zc_hi
                    acc = _dot_prepared(zc_hi, zc_lo, p_ptr, dd[:, None] * Kp + ks[None, :], plane, acc,
                                        PRECISION, EMULATE_TF32)
            if PACKED:
                # Computed distances below zero (rounding, within a bound of 0) count as 0, so keys
                # order as distances do and equal ones go to the lower index.
                key = (tl.maximum(acc.to(tl.int32, bitcast=True), 0) & ~low) | (k0 // BLOCK_K)
                if CERTIFY:  # keys are unique within a slot, so the larger of the two is the runner-up
                    second = tl.minimum(second, tl.maximum(best, key))
                best = tl.minimum(best, key)
            else:
                score = acc + c_sq[None, :]  # (BLOCK_N, BLOCK_K) ||c||^2 - 2 z.c
                better = score < best_v  # strict: an equal score in a later tile keeps the lower index
                if CERTIFY:
                    second_v = tl.where(better, best_v, tl.minimum(second_v, score))
                best_v = tl.where(better, score, best_v)
                best_i = tl.where(better, k0, best_i)
            if CERTIFY:  # padded and non-finite codes (c_sq inf) never win: the bound need not cover them
                c_max = tl.maximum(c_max, tl.max(tl.where(c_sq < float("inf"), c_sq, 0.0), axis=0))
        slot = tl.arange(0, BLOCK_K)[None, :]
        if PACKED:
            best_key = tl.min(best, axis=1)  # (BLOCK_N,)
            code = (best & low) * BLOCK_K + slot  # (BLOCK_N, BLOCK_K) the code each slot holds
            best_k = tl.min(tl.where(best == best_key[:, None], code, K - 1), axis=1)
            value = (best_key & ~low).to(tl.float32, bitcast=True)
            runner_up = value
            if CERTIFY:
                second_key = tl.min(tl.where(code == best_k[:, None], second, best), axis=1)
                # The winner's computed distance may sit up to 2**bits ulps (2**(bits - 23) of it)
                # above its key: take that off the gap, twice over.
                runner_up = (second_key & ~low).to(tl.float32, bitcast=True) - value * ((low + 1) * 2.0**-22)
        else:
            value = tl.min(best_v, axis=1)
            code = best_i + slot
            best_k = tl.min(tl.where(best_v == value[:, None], code, K - 1), axis=1)
            runner_up = value
            if CERTIFY:
                runner_up = tl.min(tl.where(code == best_k[:, None], second_v, best_v), axis=1)
        return value, best_k.to(tl.int64), runner_up, c_max

    @triton.jit
    def _finish(z_ptr, c_ptr, codes_ptr, dist_ptr, rows, row_ok, best_k, D, stride_zn, stride_zd, stride_ck,
                stride_cd, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Store the codes and the exact fp32 distances, recomputed from differences; returns ||z||^2."""
        dist = tl.zeros([BLOCK_N], tl.float32)
        z_sq = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = row_ok[:, None] & (ds[None, :] < D)
            zt = tl.load(z_ptr + rows[:, None] * stride_zn + ds[None, :] * stride_zd,
                         mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            ct = tl.load(c_ptr + best_k[:, None] * stride_ck + ds[None, :] * stride_cd,
                         mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            diff = zt - ct
            dist += tl.sum(diff * diff, axis=1)
            z_sq += tl.sum(zt * zt, axis=1)
        tl.store(codes_ptr + rows, best_k, mask=row_ok)
        tl.store(dist_ptr + rows, dist, mask=row_ok)
        return z_sq

    @triton.jit
    def _prepare_kernel(c_ptr, p_ptr, csq_ptr, K, D, Kp, Dp, stride_ck, stride_cd, SPLIT: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        """Lay the codebook out for _search_prepared: -2 C (SPLIT 1) or -2 times its tf32 split hi, lo
        (SPLIT 2) as (SPLIT, Dp, Kp) fp32, zeros past D and K; ||c||^2 as (Kp,), inf past K. A code with a
        NaN or an infinity is laid out as one past K, so it scores inf, never NaN, and never wins while a
        finite code exists (a NaN score's sign bit would make a packed key 0, the best)."""
        ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        offs_c = ks[None, :].to(tl.int64) * stride_ck
        c_sq = tl.zeros([BLOCK_K], tl.float32)
        for d0 in range(0, Dp, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            c = tl.load(c_ptr + offs_c + dd[:, None].to(tl.int64) * stride_cd,
                        mask=(ks[None, :] < K) & (dd[:, None] < D), other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_K)
            c_sq += tl.sum(c * c, axis=0)
        k_ok = (ks < K) & (c_sq < float("inf"))  # NaN compares false
        for d0 in range(0, Dp, BLOCK_D):  # a second read, to leave the non-finite codes out
            dd = d0 + tl.arange(0, BLOCK_D)
            c = tl.load(c_ptr + offs_c + dd[:, None].to(tl.int64) * stride_cd,
                        mask=k_ok[None, :] & (dd[:, None] < D), other=0.0).to(tl.float32)
            offs = dd[:, None] * Kp + ks[None, :]
            if SPLIT == 2:  # scaling by -2 is exact, so -2 hi and -2 lo are the split of -2 c
                hi = _tf32_round(c)
                tl.store(p_ptr + offs, -2.0 * hi)
                tl.store(p_ptr + Dp * Kp + offs, -2.0 * (c - hi))
            else:
                tl.store(p_ptr + offs, -2.0 * c)
        tl.store(csq_ptr + ks, tl.where(k_ok, c_sq, float("inf")))

    @triton.jit
    def _nearest_code_kernel(
        z_ptr, c_ptr, p_ptr, csq_ptr, codes_ptr, dist_ptr, queue_ptr, count_ptr, N, K, D, Kp, Dp,
        stride_zn, stride_zd, stride_ck, stride_cd, EPS,
        PRECISION: tl.constexpr, CERTIFY: tl.constexpr, VARIANT: tl.constexpr, EMULATE_TF32: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        if VARIANT == "base":
            best, best_k, second, c_max = _search(z_ptr, c_ptr, rows, row_ok, K, D, stride_zn, stride_zd, stride_ck,
                                                  stride_cd, PRECISION, CERTIFY, EMULATE_TF32, BLOCK_N, BLOCK_K,
                                                  BLOCK_D, RESIDENT)
        else:
            best, best_k, second, c_max = _search_prepared(z_ptr, p_ptr, csq_ptr, rows, row_ok, K, D, Kp, Dp,
                                                           stride_zn, stride_zd, PRECISION, CERTIFY,
                                                           VARIANT == "packed", EMULATE_TF32, BLOCK_N, BLOCK_K,
                                                           BLOCK_D, RESIDENT)
        z_sq = _finish(z_ptr, c_ptr, codes_ptr, dist_ptr, rows, row_ok, best_k, D, stride_zn, stride_zd,
                       stride_ck, stride_cd, BLOCK_N, BLOCK_D)
        if CERTIFY:
            # Every score is off by at most EPS * ||z|| * max||c|| + EPS * max||c||^2 (operands rounded
            # to tf32, fp32 sums); a runner-up more than twice that behind proves the winner exact.
            # Rows without that proof (near-ties, NaN) are queued for the fp32 recheck kernel.
            bound = EPS * (tl.sqrt(z_sq * c_max) + c_max)
            if VARIANT == "packed":  # its accumulator also carries ||z||^2: (D + 1) 2**-24 ||z||^2 more rounding
                bound += EPS / 16 * z_sq
            doubt = row_ok & ~(second - best > 2.0 * bound)
            n = tl.sum(doubt.to(tl.int32), axis=0)
            base = tl.atomic_add(count_ptr, n)  # one atomic per program; then a prefix sum places the rows
            slot = base + tl.cumsum(doubt.to(tl.int32), axis=0) - 1
            tl.store(queue_ptr + slot, rows, mask=doubt)

    @triton.jit
    def _recheck_kernel(
        z_ptr, c_ptr, codes_ptr, dist_ptr, queue_ptr, count_ptr, K, D,
        stride_zn, stride_zd, stride_ck, stride_cd,
        PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        RESIDENT: tl.constexpr,
    ):
        # A fixed grid walks the queue, so no host round trip is needed to size it.
        count = tl.load(count_ptr)
        for start in range(tl.program_id(0) * BLOCK_N, count, tl.num_programs(0) * BLOCK_N):
            i = start + tl.arange(0, BLOCK_N)
            ok = i < count
            rows = tl.load(queue_ptr + i, mask=ok, other=0)
            _, best_k, _, _ = _search(z_ptr, c_ptr, rows, ok, K, D, stride_zn, stride_zd, stride_ck, stride_cd,
                                      PRECISION, False, False, BLOCK_N, BLOCK_K, BLOCK_D, RESIDENT)
            _finish(z_ptr, c_ptr, codes_ptr, dist_ptr, rows, ok, best_k, D, stride_zn, stride_zd, stride_ck,
                    stride_cd, BLOCK_N, BLOCK_D)

    # K and D set the work per program; N only sets the grid, so it stays out of the key.
    _nearest_code_tuned = triton.autotune(configs=_CONFIGS, key=["K", "D", "PRECISION", "CERTIFY", "VARIANT"],
                                          reset_to_zero=["count_ptr"])(_nearest_code_kernel)

# Rounding bound of the tf32 pass. tf32 keeps 10 of fp32's 23 mantissa bits, so each product
# z_d c_d is off by under 2**-9 relative (operands truncated or rounded), and fp32 sums add
# D * 2**-23 (<= 2**-11 for D <= 4096): by Cauchy-Schwarz |2 z.c computed - exact| stays under
# (2**-8 + 2**-10) ||z|| ||c||, and ||c||^2 under 2**-12 ||c||^2; 2**-7 covers both.
_TF32_EPS = 2**-7


def _nearest_code_triton(z, codebook, precision, variant="base"):
    """The Triton search, or the torch path (warned once) where the kernel does not compile."""
    N, K, D = _check_inputs(z, codebook)
    key = _compile_key(z, codebook, precision, variant)
    if key in _COMPILE_FAILED:
        return nearest_code_torch(z, codebook)
    try:
        return _launch(z, codebook, precision, variant)[:2]
    except _COMPILE_ERRORS as e:
        lines = str(e).strip().splitlines()
        _COMPILE_FAILED[key] = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        warnings.warn(f"nearest_code: the Triton kernel ({precision}, {variant}, D={D}, {z.dtype}) did not compile "
                      f"({_COMPILE_FAILED[key]}); such calls use the torch path from now on", RuntimeWarning,
                      stacklevel=3)
        return nearest_code_torch(z, codebook)


# (device type, dtypes, precision, variant, D blocks) -> why the kernel failed to compile for them
_COMPILE_FAILED = {}


def _compile_key(z, codebook, precision, variant):
    """What decides whether a kernel compiles: its constexprs and its operand types."""
    return z.device.type, z.dtype, codebook.dtype, precision, variant, tuple(_d_blocks(codebook.shape[1]).values())


def _check_choices(precision, variant):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")


def _launch(z, codebook, precision, variant="base", eps=_TF32_EPS, blocks=None):
    """The Triton search: (codes, dist, number of rows the tf32 pass could not prove, on the device).
    blocks: fixed tiles (BLOCK_N, BLOCK_K, optionally num_warps, num_stages) instead of the usual ones."""
    N, K, D = _check_inputs(z, codebook)
    _check_choices(precision, variant)
    if variant == "packed" and triton.cdiv(K, _MIN_BLOCK_K) > 256:
        raise ValueError(f"the packed variant keeps 8 bits for a code's tile, so K <= {256 * _MIN_BLOCK_K}; got K={K}")
    codes = torch.empty(N, dtype=torch.int64, device=z.device)
    dist = torch.empty(N, dtype=torch.float32, device=z.device)
    count = torch.zeros(1, dtype=torch.int32, device=z.device)
    if N == 0:
        return codes, dist, count
    certify = precision == "tf32"
    queue = torch.empty(N if certify else 1, dtype=torch.int64, device=z.device)
    d_blocks = _d_blocks(D)
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():  # launch where the tensors live
        if variant == "base":
            prepared, c_sq, Kp, Dp = codebook, codebook, 0, 0  # unused
        else:
            prepared, c_sq, Kp, Dp = _prepare(codebook, precision, d_blocks)
        # Strides go to the kernel, so non-contiguous inputs need no copy.
        args = (z, codebook, prepared, c_sq, codes, dist, queue, count, N, K, D, Kp, Dp, *z.stride(),
                *codebook.stride(), eps)
        meta = dict(PRECISION=precision, CERTIFY=certify, VARIANT=variant, EMULATE_TF32=_INTERPRET, **d_blocks)
        if blocks is None and not _INTERPRET and N >= _TUNE_MIN_N:
            _nearest_code_tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]),)](*args, **meta)
        else:
            blocks = blocks or (_INTERPRET_BLOCKS if _INTERPRET else _FIXED_BLOCKS)
            _nearest_code_kernel[(triton.cdiv(N, blocks["BLOCK_N"]),)](*args, **meta, **blocks)
        if certify:
            _recheck(z, codebook, codes, dist, queue, count)
    return codes, dist, count


def _d_blocks(D):
    block_d = max(MIN_D, triton.next_power_of_2(D))
    return dict(BLOCK_D=block_d, RESIDENT=True) if block_d <= RESIDENT_D else dict(BLOCK_D=CHUNK_D, RESIDENT=False)


def _prepare(codebook, precision, d_blocks):
    """The codebook laid out once per call for the prepared variants: (planes, ||c||^2, Kp, Dp)."""
    K, D = codebook.shape
    Dp = d_blocks["BLOCK_D"] * triton.cdiv(D, d_blocks["BLOCK_D"])
    Kp = K_ALIGN * triton.cdiv(K, K_ALIGN)
    split = 2 if precision == "tf32x3" else 1
    if split * Dp * Kp >= 2**31:
        raise ValueError(f"codebook {tuple(codebook.shape)} too big for the prepared variants' int32 offsets")
    planes = torch.empty(split, Dp, Kp, dtype=torch.float32, device=codebook.device)
    c_sq = torch.empty(Kp, dtype=torch.float32, device=codebook.device)
    block_k = K_ALIGN if _INTERPRET else 64
    _prepare_kernel[(Kp // block_k,)](codebook, planes, c_sq, K, D, Kp, Dp, *codebook.stride(), SPLIT=split,
                                      BLOCK_K=block_k, BLOCK_D=MIN_D)
    return planes, c_sq, Kp, Dp


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _recheck(z, codebook, codes, dist, queue, count):
    """Search the count[0] rows listed in queue again, at near-fp32 precision; nothing to do when empty."""
    (K, D), strides = codebook.shape, (*z.stride(), *codebook.stride())
    if _INTERPRET:  # the interpreter's tf32x3 dot is exact fp32
        grid, blocks = (2,), dict(PRECISION="tf32x3", **_INTERPRET_BLOCKS)
    else:  # one program per SM walks the queue: a fixed grid, so no host round trip to size it
        grid = (_sm_count(z.device),)
        blocks = dict(PRECISION="tf32x3", BLOCK_N=128, BLOCK_K=64, num_warps=8)
    _recheck_kernel[grid](z, codebook, codes, dist, queue, count, K, D, *strides, **blocks, **_d_blocks(D))


def nearest_code(z, codebook, *, backend=None, precision="tf32x3", variant="base"):
    """Nearest codebook entry for each row of z, in squared Euclidean distance.

    Args:
        z: (N, D) float tensor (fp32, fp16 or bf16; any strides). N may be 0.
        codebook: (K, D) float tensor on the same device, K >= 1, D >= 1.
        backend: None, "auto", "torch" or "triton". None reads the env var VQ_KERNEL
            (default "auto") at call time. "auto" takes the Triton kernel when triton is
            importable and z is on a GPU, else the chunked torch path. "triton" also runs on
            CPU tensors when TRITON_INTERPRET=1 was set before import (slow: for tests);
            without triton, or with a CPU tensor outside the interpreter, it raises RuntimeError.
            Where the kernel fails to compile (an old GPU, a Triton that rejects it), both take
            the torch path instead, with one RuntimeWarning naming the reason.
        precision: the Triton kernel's arithmetic on a GPU. "tf32x3" (default): three tf32
            tensor-core passes, near-fp32 accuracy. "tf32": one tf32 pass that also proves, row by
            row, that its winner beats the runner-up by more than tf32 rounding could explain;
            rows it cannot prove (near-ties) are searched again in "tf32x3" (faster when encoder
            outputs sit near their codes, as in training; see kernels/NOTES.md). "ieee": fp32
            FMA, slowest. The interpreter computes "tf32" with operands truncated to tf32, the
            others in fp32; the torch path computes in fp32 (float64 on a GPU).
        variant: how the kernel scores a tile, for timing them against each other (kernels/bench.py).
            "base" (default): computes ||c||^2 and -2 z.c per tile. "prepared": a small kernel first
            lays out -2 C, ||c||^2 and (for "tf32x3") the codebook's tf32 split once per call, so a
            tile costs a dot and one add. "packed": as "prepared", with the code's tile number in the
            low bits of the distance, so the running argmin is one integer min; K <= 8192.

    Returns:
        codes: (N,) int64, the index of the nearest code. Ties go to the lowest index. A code with a
            NaN or an infinity (or a ||c||^2 past fp32's range) scores as infinitely far on every path,
            so a diverging code never takes the rows while a finite one exists; with none finite, 0.
        dist: (N,) float32, the squared distance to that code, recomputed in fp32 from
            (z - codebook[codes]), so it carries no ||z||^2 cancellation error.

    Exact, here, means: codes equal a float64 search's, except at near-ties, where the chosen code's
    float64 distance is within rounding of the minimum (fp32 rounding, about 1e-6 of ||z||^2 + ||c||^2 at
    D = 64, so codes sharing an offset far larger than their spread are not told apart; trained ones do
    not; "packed" adds 2**(bits - 23) relative, bits = ceil(log2(K / 32)): 2**-19 at K = 512),
    and equal distances go to the lowest index. Every precision and variant is exact in this sense:
    "tf32" because what its proof cannot settle is searched again.
    """
    choice = backend or os.environ.get("VQ_KERNEL", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"VQ_KERNEL / backend must be one of auto, torch, triton; got {choice!r}")
    _check_inputs(z, codebook)  # before the device: a bad input says what is wrong with it on any machine
    _check_choices(precision, variant)  # on every path, as on a GPU
    on_gpu = HAVE_TRITON and z.is_cuda
    if choice == "triton" and not (on_gpu or (HAVE_TRITON and _INTERPRET)):
        raise RuntimeError(
            "the Triton path needs triton installed and a CUDA tensor (or TRITON_INTERPRET=1 set before import); "
            f"triton installed: {HAVE_TRITON}"
        )
    if choice == "torch" or (choice == "auto" and not on_gpu):
        return nearest_code_torch(z, codebook)
    return _nearest_code_triton(z, codebook, precision, variant)
