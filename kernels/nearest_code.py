"""Nearest-codebook search: float64 reference, chunked torch path, fused Triton kernel."""

import os

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
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
    c = codebook.float()  # (K, D)
    c_sq = c.pow(2).sum(1)  # (K,)
    chunk = chunk_size or max(1, _CHUNK_BYTES // (4 * K))
    codes = torch.empty(N, dtype=torch.int64, device=z.device)
    dist = torch.empty(N, dtype=torch.float32, device=z.device)
    for i in range(0, N, chunk):
        zc = z[i : i + chunk].float()  # (chunk, D)
        # ||z||^2 is the same for every code of a row, so the argmin does without it.
        # min(1) picks the first of equal minima like argmin, and runs ~2x faster on CPU.
        best = torch.addmm(c_sq, zc, c.T, alpha=-2).min(1).indices  # (chunk,)
        codes[i : i + chunk] = best
        # Recomputed from differences: ||z||^2 + score would lose digits to cancellation.
        dist[i : i + chunk] = (zc - c[best]).pow_(2).sum(1)
    return codes, dist


if HAVE_TRITON:
    # Tiles that ptxas compiles without register spills at tf32x3 on both sm_80 and sm_90 (its
    # split operands cost registers, so mostly BLOCK_D = 16 and 8 warps); autotune picks among them.
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bn, bk, bd, w, s in [
            (64, 64, 16, 4, 2), (64, 64, 16, 8, 3), (64, 64, 32, 8, 3), (64, 128, 16, 8, 2),
            (64, 128, 16, 8, 3), (128, 64, 16, 8, 2), (128, 64, 16, 8, 3), (128, 128, 16, 8, 2),
        ]
    ]
    # The interpreter runs programs one after another in numpy, so few big blocks are fastest;
    # BLOCK_D = 32 stays below the tests' D, so the D loop and its masked tail run too.
    _INTERPRET_BLOCKS = {"BLOCK_N": 128, "BLOCK_K": 256, "BLOCK_D": 32}

    @triton.jit
    def _nearest_code_kernel(
        z_ptr, c_ptr, codes_ptr, dist_ptr, N, K, D,
        stride_zn, stride_zd, stride_ck, stride_cd,
        PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # int64 rows: rows * stride_zn overflows int32 once N * D passes 2**31.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = rows < N
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_k = tl.zeros([BLOCK_N], tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            k_ok = ks < K
            dot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            c_sq = tl.zeros([BLOCK_K], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
                d_ok = ds < D
                zt = tl.load(z_ptr + rows[:, None] * stride_zn + ds[None, :] * stride_zd,
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
                ct = tl.load(c_ptr + ks[None, :] * stride_ck + ds[:, None] * stride_cd,
                             mask=d_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_D, BLOCK_K)
                dot = tl.dot(zt, ct, dot, input_precision=PRECISION)
                # Computed here, the same way for every code, so duplicate codes score identically.
                c_sq += tl.sum(ct * ct, axis=0)
            # ||z||^2 is the same for every code of a row, so the argmin does without it;
            # padded codes score inf so they never win.
            score = tl.where(k_ok[None, :], c_sq[None, :] - 2.0 * dot, float("inf"))  # (BLOCK_N, BLOCK_K)
            tile_best, tile_k = tl.min(score, axis=1, return_indices=True)  # lowest index among equal minima
            # Strict <: an equal minimum in a later tile keeps the earlier, lower index.
            better = tile_best < best
            best = tl.where(better, tile_best, best)
            best_k = tl.where(better, k0 + tile_k, best_k)
        # Exact fp32 distance to the chosen code from differences, immune to ||z||^2 cancellation.
        dist = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (ds[None, :] < D)
            zt = tl.load(z_ptr + rows[:, None] * stride_zn + ds[None, :] * stride_zd,
                         mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            ct = tl.load(c_ptr + best_k[:, None] * stride_ck + ds[None, :] * stride_cd,
                         mask=mask, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
            diff = zt - ct
            dist += tl.sum(diff * diff, axis=1)
        tl.store(codes_ptr + rows, best_k.to(tl.int64), mask=row_ok)
        tl.store(dist_ptr + rows, dist, mask=row_ok)

    # K and D set the work per program; N only sets the grid, so it stays out of the key.
    _nearest_code_tuned = triton.autotune(configs=_CONFIGS, key=["K", "D", "PRECISION"])(_nearest_code_kernel)


def _nearest_code_triton(z, codebook, precision):
    N, K, D = _check_inputs(z, codebook)
    if precision not in ("tf32x3", "ieee"):
        raise ValueError(f"precision must be 'tf32x3' or 'ieee', got {precision!r}")
    codes = torch.empty(N, dtype=torch.int64, device=z.device)
    dist = torch.empty(N, dtype=torch.float32, device=z.device)
    if N == 0:
        return codes, dist
    # Strides go to the kernel, so non-contiguous inputs need no copy.
    args = (z, codebook, codes, dist, N, K, D, *z.stride(), *codebook.stride())
    if _INTERPRET:
        grid = (triton.cdiv(N, _INTERPRET_BLOCKS["BLOCK_N"]),)
        _nearest_code_kernel[grid](*args, PRECISION="ieee", **_INTERPRET_BLOCKS)
    else:
        _nearest_code_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, PRECISION=precision)
    return codes, dist


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
        precision: the Triton kernel's tl.dot input precision on a GPU: "tf32x3" (tensor
            cores, near-fp32 accuracy) or "ieee" (exact fp32 FMA). The interpreter and the
            torch path always compute in fp32.

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
