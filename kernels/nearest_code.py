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
    dist, codes = d.min(1)
    return codes, dist


# Chunked torch path: the (chunk, K) score matrix is the only big temporary, whatever N is.
def nearest_code_torch(z, codebook, chunk_size=None):
    N, K, D = _check_inputs(z, codebook)
    # float64 on a GPU: its float32 matmuls may run in TF32, and this path is the full-precision one
    dtype = torch.float64 if z.is_cuda else torch.float32
    c = codebook.to(dtype)  # (K, D)
    c_sq = c.pow(2).sum(1)  # (K,)
    chunk = chunk_size or max(1, _CHUNK_BYTES // (c.element_size() * K))
    codes = torch.empty(N, dtype=torch.int64, device=z.device)
    dist = torch.empty(N, dtype=torch.float32, device=z.device)
    for i in range(0, N, chunk):
        zc = z[i : i + chunk].to(dtype)  # (chunk, D)
        # ||z||^2 is the same for every code of a row, so the argmin does without it.
        # min(1) picks the first of equal minima like argmin, and runs ~2x faster on CPU.
        best = torch.addmm(c_sq, zc, c.T, alpha=-2).min(1).indices  # (chunk,)
        codes[i : i + chunk] = best
        # Recomputed from differences: ||z||^2 + score would lose digits to cancellation.
        dist[i : i + chunk] = (zc - c[best]).pow_(2).sum(1)
    return codes, dist


if HAVE_TRITON:
    # The fastest tiles of a sweep on an H100 (kernels/bench.py) for either precision; autotune picks.
    # They are latency-bound: ~230 registers a thread leave room for 2 programs per SM.
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4),
                             (256, 64, 8, 3)]
    ]
    # The interpreter runs programs one after another in numpy, so few big blocks are fastest.
    _INTERPRET_BLOCKS = {"BLOCK_N": 128, "BLOCK_K": 256}
    RESIDENT_D = 128  # up to this D (padded to a power of two) a program keeps its z tile in registers
    CHUNK_D = 32  # above it, z and codebook tiles stream in D chunks of this width
    # tl.dot needs an inner dimension of at least 8 for fp32 operands (16 for 16-bit ones): narrower
    # codes are padded with the zeros that the masked loads give, which change no dot product.
    MIN_D = 16

    @triton.jit
    def _search(z_ptr, c_ptr, rows, row_ok, K, D, stride_zn, stride_zd, stride_ck, stride_cd,
                PRECISION: tl.constexpr, CERTIFY: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr):
        """Scan every code for these rows: (best score, its code, second-best score, max ||c||^2)."""
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
                dot = tl.dot(zt, ct, input_precision=PRECISION)  # (BLOCK_N, BLOCK_K)
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
                    dot = tl.dot(zc, ct, dot, input_precision=PRECISION)
                    c_sq += tl.sum(ct * ct, axis=0)
            # ||z||^2 is the same for every code of a row, so the argmin does without it;
            # padded codes score inf so they never win.
            score = tl.where(k_ok[None, :], c_sq[None, :] - 2.0 * dot, float("inf"))  # (BLOCK_N, BLOCK_K)
            better = score < best_v  # strict: an equal score in a later tile keeps the lower index
            if CERTIFY:  # the runner-up of each slot too, to prove the winner despite rounding
                second_v = tl.where(better, best_v, tl.minimum(second_v, score))
                c_max = tl.maximum(c_max, tl.max(c_sq, axis=0))
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
    def _nearest_code_kernel(
        z_ptr, c_ptr, codes_ptr, dist_ptr, queue_ptr, count_ptr, N, K, D,
        stride_zn, stride_zd, stride_ck, stride_cd, EPS,
        PRECISION: tl.constexpr, CERTIFY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        best, best_k, second, c_max = _search(z_ptr, c_ptr, rows, row_ok, K, D, stride_zn, stride_zd, stride_ck,
                                              stride_cd, PRECISION, CERTIFY, BLOCK_N, BLOCK_K, BLOCK_D, RESIDENT)
        z_sq = _finish(z_ptr, c_ptr, codes_ptr, dist_ptr, rows, row_ok, best_k, D, stride_zn, stride_zd,
                       stride_ck, stride_cd, BLOCK_N, BLOCK_D)
        if CERTIFY:
            # Every score is off by at most EPS * ||z|| * max||c|| + EPS * max||c||^2 (operands rounded
            # to tf32, fp32 sums); a runner-up more than twice that behind proves the winner exact.
            # Rows without that proof (near-ties, NaN) are queued for the fp32 recheck kernel.
            bound = EPS * (tl.sqrt(z_sq * c_max) + c_max)
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
                                      PRECISION, False, BLOCK_N, BLOCK_K, BLOCK_D, RESIDENT)
            _finish(z_ptr, c_ptr, codes_ptr, dist_ptr, rows, ok, best_k, D, stride_zn, stride_zd, stride_ck,
                    stride_cd, BLOCK_N, BLOCK_D)

    # K and D set the work per program; N only sets the grid, so it stays out of the key.
    _nearest_code_tuned = triton.autotune(configs=_CONFIGS, key=["K", "D", "PRECISION", "CERTIFY"],
                                          reset_to_zero=["count_ptr"])(_nearest_code_kernel)

# Rounding bound of the tf32 pass. tf32 keeps 10 of fp32's 23 mantissa bits, so each product
# z_d c_d is off by under 2**-9 relative (operands truncated or rounded), and fp32 sums add
# D * 2**-23 (<= 2**-11 for D <= 4096): by Cauchy-Schwarz |2 z.c computed - exact| stays under
# (2**-8 + 2**-10) ||z|| ||c||, and ||c||^2 under 2**-12 ||c||^2; 2**-7 covers both.
_TF32_EPS = 2**-7


def _nearest_code_triton(z, codebook, precision):
    """The Triton search, or the torch path (warned once) where the kernel does not compile."""
    N, K, D = _check_inputs(z, codebook)
    # What decides whether a kernel compiles: its constexprs and its operand types.
    key = (z.device.type, z.dtype, codebook.dtype, precision, tuple(_d_blocks(D).values()))
    if key in _COMPILE_FAILED:
        return nearest_code_torch(z, codebook)
    try:
        return _launch(z, codebook, precision)[:2]
    except _COMPILE_ERRORS as e:
        lines = str(e).strip().splitlines()
        _COMPILE_FAILED[key] = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        warnings.warn(f"nearest_code: the Triton kernel ({precision}, D={D}, {z.dtype}) did not compile "
                      f"({_COMPILE_FAILED[key]}); such calls use the torch path from now on", RuntimeWarning,
                      stacklevel=3)
        return nearest_code_torch(z, codebook)


# (device type, dtypes, precision, D blocks) -> why the kernel failed to compile for them
_COMPILE_FAILED = {}


def _launch(z, codebook, precision, eps=_TF32_EPS):
    """The Triton search: (codes, dist, number of rows the tf32 pass could not prove, on the device)."""
    N, K, D = _check_inputs(z, codebook)
    if precision not in ("tf32", "tf32x3", "ieee"):
        raise ValueError(f"precision must be 'tf32', 'tf32x3' or 'ieee', got {precision!r}")
    codes = torch.empty(N, dtype=torch.int64, device=z.device)
    dist = torch.empty(N, dtype=torch.float32, device=z.device)
    count = torch.zeros(1, dtype=torch.int32, device=z.device)
    if N == 0:
        return codes, dist, count
    certify = precision == "tf32"
    queue = torch.empty(N if certify else 1, dtype=torch.int64, device=z.device)
    # Strides go to the kernel, so non-contiguous inputs need no copy.
    args = (z, codebook, codes, dist, queue, count)
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():  # launch where the tensors live
        if _INTERPRET:  # the interpreter computes in fp32 whatever the precision; certify still runs
            grid = (triton.cdiv(N, _INTERPRET_BLOCKS["BLOCK_N"]),)
            _nearest_code_kernel[grid](*args, N, K, D, *z.stride(), *codebook.stride(), eps, PRECISION="ieee",
                                       CERTIFY=certify, **_INTERPRET_BLOCKS, **_d_blocks(D))
        else:
            _nearest_code_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
                *args, N, K, D, *z.stride(), *codebook.stride(), eps, PRECISION=precision, CERTIFY=certify,
                **_d_blocks(D))
        if certify:
            _recheck(*args)
    return codes, dist, count


def _d_blocks(D):
    block_d = max(MIN_D, triton.next_power_of_2(D))
    return dict(BLOCK_D=block_d, RESIDENT=True) if block_d <= RESIDENT_D else dict(BLOCK_D=CHUNK_D, RESIDENT=False)


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _recheck(z, codebook, codes, dist, queue, count):
    """Search the count[0] rows listed in queue again, at near-fp32 precision; nothing to do when empty."""
    (K, D), strides = codebook.shape, (*z.stride(), *codebook.stride())
    if _INTERPRET:
        grid, blocks = (2,), dict(PRECISION="ieee", **_INTERPRET_BLOCKS)
    else:  # one program per SM walks the queue: a fixed grid, so no host round trip to size it
        grid = (_sm_count(z.device),)
        blocks = dict(PRECISION="tf32x3", BLOCK_N=128, BLOCK_K=64, num_warps=8)
    _recheck_kernel[grid](z, codebook, codes, dist, queue, count, K, D, *strides, **blocks, **_d_blocks(D))


def nearest_code(z, codebook, *, backend=None, precision="tf32x3"):
    """Nearest codebook entry for each row of z, in squared Euclidean distance.

    Args:
        z: (N, D) float tensor (fp32, fp16 or bf16; any strides). N may be 0.
        codebook: (K, D) float tensor on the same device, K >= 1, D >= 1.
        backend: None, "auto", "torch" or "triton". None reads the env var VQ_KERNEL
            (default "auto") at call time. "auto" takes the Triton kernel when triton is
            importable and z is on a GPU, else the chunked torch path. "triton" also runs on
            CPU tensors when TRITON_INTERPRET=1 was set before import (slow, exact: for tests);
            without triton, or with a CPU tensor outside the interpreter, it raises RuntimeError.
            Where the kernel fails to compile (an old GPU, a Triton that rejects it), both take
            the torch path instead, with one RuntimeWarning naming the reason.
        precision: the Triton kernel's arithmetic on a GPU. "tf32x3" (default): three tf32
            tensor-core passes, near-fp32 accuracy. "tf32": one tf32 pass that also proves, row by
            row, that its winner beats the runner-up by more than tf32 rounding could explain;
            rows it cannot prove (near-ties) are searched again in "tf32x3" (faster when encoder
            outputs sit near their codes, as in training; see kernels/NOTES.md). "ieee": fp32
            FMA, slowest. The interpreter and the torch path compute in fp32.

    Returns:
        codes: (N,) int64, the index of the nearest code. Ties go to the lowest index.
        dist: (N,) float32, the squared distance to that code, recomputed in fp32 from
            (z - codebook[codes]), so it carries no ||z||^2 cancellation error.

    All arithmetic is fp32 whatever the input dtype; codes agree with a float64 search except
    at near-ties, where the chosen code is within fp32 rounding of the true minimum.
    """
    choice = backend or os.environ.get("VQ_KERNEL", "auto")
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"VQ_KERNEL / backend must be one of auto, torch, triton; got {choice!r}")
    on_gpu = HAVE_TRITON and torch.is_tensor(z) and z.is_cuda
    if choice == "triton" and not (on_gpu or (HAVE_TRITON and _INTERPRET)):
        raise RuntimeError(
            "the Triton path needs triton installed and a CUDA tensor (or TRITON_INTERPRET=1 set before import); "
            f"triton installed: {HAVE_TRITON}"
        )
    if choice == "torch" or (choice == "auto" and not on_gpu):
        return nearest_code_torch(z, codebook)
    return _nearest_code_triton(z, codebook, precision)
