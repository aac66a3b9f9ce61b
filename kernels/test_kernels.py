"""nearest_code's Triton kernel (interpreted on the CPU, or compiled on a GPU when there is one) and
torch path against the float64 reference."""

import importlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import HAVE_TRITON, nearest_code, nearest_code_reference, nearest_code_torch

# For monkeypatching; import_module because the package re-exports the function under this name.
nc = importlib.import_module("kernels.nearest_code")
# Triton picks the interpreter when it is imported, and pytest imports this file's package (so
# triton) before this module runs: setting TRITON_INTERPRET here would come too late.
# On a GPU (and not interpreting) the same tests run the compiled kernel, in real tf32.
DEVICE = "cuda" if torch.cuda.is_available() and not nc._INTERPRET else "cpu"


def _version(module):
    return tuple(int(p) for p in module.__version__.split("+")[0].split(".")[:2])


# Triton 3.6 and older hand the interpreted kernel its int arguments as 1-element arrays, which NumPy 2.4
# no longer turns into an index (TypeError: only 0-dimensional arrays ...); 3.7 and later work. A CUDA
# torch pins its Triton (torch 2.11: 3.6), so on such a machine the kernel is tested compiled, on the GPU.
INTERPRETER_OK = HAVE_TRITON and not (_version(nc.triton) < (3, 7) and _version(np) >= (2, 4))
OLD_INTERPRETER = ("this Triton's interpreter cannot run the kernel under NumPy >= 2.4: use triton >= 3.7 or "
                   "numpy < 2.4, or on a GPU run the tests without TRITON_INTERPRET")
needs_triton = pytest.mark.skipif(
    not (HAVE_TRITON and ((nc._INTERPRET and INTERPRETER_OK) or DEVICE == "cuda")),
    reason=OLD_INTERPRETER if HAVE_TRITON and nc._INTERPRET and not INTERPRETER_OK else
    "needs triton, imported with TRITON_INTERPRET=1 (or a GPU): run `TRITON_INTERPRET=1 python -m pytest kernels`",
)
# "triton-PRECISION-VARIANT": tf32 is the one tf32 pass with its proof and recheck queue, tf32x3
# the exact three-pass search; every variant of the kernel in both.
TRITON = [f"triton-{precision}-{variant}" for variant in nc.VARIANTS for precision in ("tf32", "tf32x3")]
BACKENDS = ["torch"] + [pytest.param(b, marks=needs_triton) for b in TRITON]


def search(z, codebook, backend, device=DEVICE):
    """The search on `device` (None: where the tensors are), results back on the CPU."""
    if device is not None:
        z, codebook = z.to(device), codebook.to(device)
    if backend == "torch":
        return [t.cpu() for t in nearest_code(z, codebook, backend="torch")]
    _, precision, variant = backend.split("-")
    return [t.cpu() for t in nearest_code(z, codebook, backend="triton", precision=precision, variant=variant)]


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_matches_reference(z, codebook, codes, dist):
    N = z.shape[0]
    assert codes.shape == (N,) and codes.dtype == torch.int64
    assert dist.shape == (N,) and dist.dtype == torch.float32
    _, ref_dist = nearest_code_reference(z, codebook)
    chosen = (z.double() - codebook.double()[codes]).pow(2).sum(1)  # (N,)
    # Near-ties may go either way in fp32, but never to a code measurably farther away.
    assert (chosen <= ref_dist * (1 + 1e-5) + 1e-6).all()
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param(f"triton-ieee-{v}", marks=needs_triton)
                                                for v in nc.VARIANTS])
@pytest.mark.parametrize("N,K,D", [(1000, 513, 40), (1000, 513, 1), (1000, 513, 3), (1000, 513, 5), (1, 1, 3),
                                   (4097, 1024, 64), (0, 16, 8), (300, 257, 200)])
def test_random_shapes(backend, N, K, D):  # D < 8 pads the dot; D = 200 is past the resident z tile: D streams in chunks
    z, codebook = _randn(N, D, seed=1), _randn(K, D, seed=2)
    _assert_matches_reference(z, codebook, *search(z, codebook, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    z, codebook = _randn(300, 40, seed=3, dtype=dtype), _randn(257, 40, seed=4, dtype=dtype)
    _assert_matches_reference(z, codebook, *search(z, codebook, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(backend):
    z = _randn(40, 300, seed=5).T  # (N, D) with strides (1, N)
    codebook = _randn(257, 80, seed=6)[:, ::2]  # (K, D) with strides (80, 2)
    assert not (z.is_contiguous() or codebook.is_contiguous())
    _assert_matches_reference(z, codebook, *search(z, codebook, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_well_separated_codes_are_exact(backend):
    codebook = 10 * _randn(513, 40, seed=7)
    truth = torch.randint(0, 513, (1000,), generator=torch.Generator().manual_seed(8))
    z = codebook[truth] + 1e-3 * _randn(1000, 40, seed=9)
    codes, dist = search(z, codebook, backend)
    assert torch.equal(codes, truth) and torch.equal(codes, nearest_code_reference(z, codebook)[0])
    _assert_matches_reference(z, codebook, codes, dist)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lowest_index(backend):
    # Small integers make every distance exact in any summation order, so ties are real ties;
    # duplicated rows i and i + 200 straddle the interpreter's 256-code tiles for i >= 56.
    g = torch.Generator().manual_seed(10)
    base = torch.randint(1, 4, (200, 8), generator=g).float()
    codebook = torch.cat([base, base])  # (K=400, D)
    z = torch.randint(1, 4, (700, 8), generator=g).float()
    codes, dist = search(z, codebook, backend)
    assert torch.equal(codes, nearest_code_reference(z, codebook)[0]) and (codes < 200).all()
    assert torch.equal(dist, (z - codebook[codes]).pow(2).sum(1))


# NaNs with the sign bit clear and set (a packed key once read the latter as distance 0)
NAN, NEG_NAN = torch.tensor([0x7FC00000, -0x400000], dtype=torch.int32).view(torch.float32).tolist()


def non_finite_codebook(N, K, D, seed=0):
    """(z, codebook): random codes, some with a NaN of either sign or an infinity in one entry or all of
    them (code 0 among them, which wins every tie), and z rows beside those codes' finite originals."""
    codebook = _randn(K, D, seed=seed)
    z = _randn(N, D, seed=seed + 1)
    bad = [(0, NEG_NAN, slice(None)), (1, NAN, D - 1), (2, NEG_NAN, 0), (K // 2, float("inf"), D // 2),
           (K // 2 + 1, -float("inf"), slice(None)), (K - 1, NEG_NAN, D // 2)]
    rows = torch.tensor([k for k, _, _ in bad])
    z[: 4 * len(bad)] = codebook[rows].repeat(4, 1) + 0.01 * _randn(4 * len(bad), D, seed=seed + 2)
    for k, value, d in bad:
        codebook[k, d] = value
    return z, codebook


@pytest.mark.parametrize("backend", ["reference", "torch-chunked"] + BACKENDS
                         + [pytest.param(f"triton-ieee-{v}", marks=needs_triton) for v in nc.VARIANTS])
@pytest.mark.parametrize("N,K,D", [(1000, 513, 40), (300, 257, 3), (200, 100, 200)])
# the interpreter's numpy says so where the base variant scores a NaN code (as it should)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning", "ignore:All-NaN slice:RuntimeWarning")
def test_non_finite_codes_never_win(backend, N, K, D):
    # One policy on every path: a code with a NaN or an infinity scores as if infinitely far away, so a
    # diverging code cannot take over the rows; with no finite code at all, code 0.
    def run(z, codebook):
        if backend == "reference":
            return nearest_code_reference(z, codebook)
        return nearest_code_torch(z, codebook, chunk_size=64) if backend == "torch-chunked" else \
            search(z, codebook, backend)

    z, codebook = non_finite_codebook(N, K, D, seed=N)
    finite = codebook.isfinite().all(1)
    codes, dist = run(z, codebook)
    assert finite[codes].all()
    if backend == "reference":
        dist = dist.float()
    _assert_matches_reference(z, codebook[finite], (finite.cumsum(0) - 1)[codes], dist)
    if backend.startswith("triton-tf32-"):  # nor do they send every row to the recheck (an inf or NaN bound did)
        assert nc._launch(z.to(DEVICE), codebook.to(DEVICE), "tf32", backend.split("-")[2])[2].item() < N
    codes, dist = run(z, codebook.where(~finite[:, None], float("nan")))
    assert torch.equal(codes, torch.zeros(N, dtype=torch.int64))
    if backend != "reference":  # the distance to code 0 itself, all NaN, not to a zeroed stand-in for it
        assert dist.isnan().all()


@needs_triton
@pytest.mark.parametrize("variant", nc.VARIANTS)
@pytest.mark.parametrize("D", [1, 40])
def test_many_codebook_tiles(variant, D):
    # 16-code tiles: K = 513 spans 33 of them, so the running argmin carries across many tiles and
    # a packed key needs 6 bits for the tile, as it would with K = 1024 on 32-code tiles.
    z, codebook = _randn(256, D, seed=20), _randn(513, D, seed=21)
    for precision in ("tf32", "tf32x3"):
        codes, dist, _ = nc._launch(z.to(DEVICE), codebook.to(DEVICE), precision, variant,
                                    blocks=dict(BLOCK_N=64, BLOCK_K=16))
        _assert_matches_reference(z, codebook, codes.cpu(), dist.cpu())


@needs_triton
@pytest.mark.parametrize("variant", nc.VARIANTS)
def test_tf32_proof_is_sound(variant, monkeypatch):
    # Every row the tf32 pass proves must already hold the float64 reference's code: the recheck is
    # taken away to look at the pass alone. Half the rows sit near a code (provable), half are
    # random (often near-ties). In the interpreter the pass's operands are truncated to tf32, so
    # without the bound it gets some rows wrong: the proof is what keeps them right.
    codebook = _randn(513, 40, seed=22)
    near = codebook[torch.arange(500) * 7 % 513] + 0.3 * _randn(500, 40, seed=23)
    z = torch.cat([near, _randn(3000, 40, seed=24)])
    want = nearest_code_reference(z, codebook)[0]
    queued = []
    monkeypatch.setattr(nc, "_recheck", lambda z, c, codes, dist, queue, count: queued.append(queue[:count.item()]))
    for eps in (nc._TF32_EPS, 0.0):
        queued.clear()
        codes = nc._launch(z.to(DEVICE), codebook.to(DEVICE), "tf32", variant, eps=eps)[0].cpu()
        proven = torch.ones(len(z), dtype=torch.bool)
        proven[queued[0].cpu()] = False
        wrong = int((codes != want)[proven].sum())
        if eps:  # rows near a code are proven, and the random ones are often not
            assert wrong == 0 and proven[:500].all() and 0 < proven.sum() < len(z) - 100
        elif DEVICE == "cpu":  # no bound: every row but exact ties is "proven", and some are wrong
            assert wrong > 0


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prepared_codebook(dtype):
    codebook = _randn(300, 80, seed=25, dtype=dtype)[:, ::2]  # (K, D) = (300, 40), strided
    c = codebook.float().to(DEVICE)
    for precision, split in [("tf32", 1), ("tf32x3", 2)]:
        planes, c_sq, Kp, Dp = nc._prepare(codebook.to(DEVICE), precision, nc._d_blocks(40))
        assert planes.shape == (split, Dp, Kp) == (split, 64, 512) and c_sq.shape == (Kp,)
        assert (planes[:, 40:] == 0).all() and (planes[:, :, 300:] == 0).all() and (c_sq[300:] == float("inf")).all()
        torch.testing.assert_close(c_sq[:300], c.pow(2).sum(1), rtol=1e-6, atol=0)
        hi = planes[0, :40, :300].T / -2  # (K, D)
        if split == 1:
            assert torch.equal(hi, c)
        else:  # hi has tf32's 10 mantissa bits, and hi + lo is c exactly (fp16 has 10 bits: lo is 0)
            lo = planes[1, :40, :300].T / -2
            assert (hi.view(torch.int32) & 0x1FFF == 0).all() and torch.equal(hi + lo, c)
            assert (lo.abs() <= c.abs() * 2**-11).all() and (lo != 0).any() == (dtype == torch.float32)


@needs_triton
def test_variant_checks():
    z, codebook = _randn(10, 3), _randn(9000, 3)
    with pytest.raises(ValueError, match="variant must be one of base, prepared, packed"):
        nearest_code(z.to(DEVICE), codebook.to(DEVICE), backend="triton", variant="fast")
    with pytest.raises(ValueError, match="K <= 8192"):
        nc._launch(z.to(DEVICE), codebook.to(DEVICE), "tf32x3", "packed")


@needs_triton
@pytest.mark.parametrize("variant", nc.VARIANTS)
def test_unproven_rows_are_queued_and_searched_again(variant):
    z, codebook = _randn(700, 40, seed=13), _randn(300, 40, seed=14)
    want = nearest_code_reference(z, codebook)

    def launch(z, c, eps):
        return [t.cpu() for t in nc._launch(z.to(DEVICE), c.to(DEVICE), "tf32", variant, eps=eps)]

    # An error bound too big to prove any row: every row goes through the recheck kernel.
    codes, dist, queued = launch(z, codebook, 1e3)
    assert queued.item() == 700 and torch.equal(codes, want[0])
    _assert_matches_reference(z, codebook, codes, dist)
    # Rows whose nearest code is duplicated are real ties: always queued.
    dup = torch.cat([codebook, codebook[:150]])  # codes 300.. repeat codes 0..149
    codes, dist, queued = launch(z, dup, nc._TF32_EPS)
    ties = (want[0] < 150).sum().item()
    assert queued.item() >= ties > 0
    _assert_matches_reference(z, dup, codes, dist)  # either copy of a duplicate: they differ by rounding
    if variant != "base":
        return
    # The recheck kernel alone fills exactly the queued rows, and only those.
    rows = torch.randperm(700, generator=torch.Generator().manual_seed(15))[:333]
    codes, dist = torch.full((700,), -1, device=DEVICE), torch.full((700,), float("nan"), device=DEVICE)
    nc._recheck(z.to(DEVICE), codebook.to(DEVICE), codes, dist, rows.to(DEVICE),
                torch.tensor([len(rows)], dtype=torch.int32, device=DEVICE))
    codes, dist = codes.cpu(), dist.cpu()
    assert torch.equal(codes[rows], want[0][rows]) and (codes == -1).sum() == 700 - 333
    torch.testing.assert_close(dist[rows].double(), want[1][rows], rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.skipif(not INTERPRETER_OK, reason=OLD_INTERPRETER)  # it interprets, even on a GPU
def test_offsets_past_int32_on_strided_inputs():
    # Column offsets d * stride and k * stride pass 2**31 elements here. Only a few pages of the
    # 4 GiB buffer are touched. In a subprocess: int32 offsets would crash it, not return.
    code = """
import torch, kernels
from kernels import nearest_code_reference
base = torch.empty(2**31 + 256, dtype=torch.float16)
g = torch.Generator().manual_seed(0)
codes = torch.randn(3, 8, generator=g).half()
for k in range(3):
    base[k * 2**30:k * 2**30 + 8] = codes[k]
codebook = base.as_strided((3, 8), (2**30, 1))  # code k at element k * 2**30
z = torch.randn(50, 8, generator=g)
zt = base.as_strided((40, 3), (1, 2**30), 64)  # column-major: column d at element d * 2**30 + 64
for d in range(3):
    base[d * 2**30 + 64:d * 2**30 + 104] = torch.randn(40, generator=g).half()
for variant in ("base", "prepared", "packed"):
    assert torch.equal(kernels.nearest_code(z, codebook, backend="triton", variant=variant)[0],
                       nearest_code_reference(z, codes.float())[0])
    assert torch.equal(kernels.nearest_code(zt, codebook[:, :3], backend="triton", variant=variant)[0],
                       nearest_code_reference(zt.float(), codes[:, :3].float())[0])
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]


def _ptxas_reason():
    """Why the kernel cannot be compiled for a GPU here, or None: Triton ships ptxas, so no GPU is needed."""
    if not HAVE_TRITON:
        return "needs triton"
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return None if os.path.exists(get_ptxas(90).path) else "this triton has no ptxas"
    except Exception as e:  # a build without the NVIDIA backend
        return f"this triton cannot compile for NVIDIA GPUs ({type(e).__name__})"


@pytest.mark.skipif(_ptxas_reason() is not None, reason=str(_ptxas_reason()))
def test_kernel_compiles_for_sm90_at_any_d():
    # tl.dot rejects an inner dimension below 8, which the interpreter does not check: D = 3 failed
    # here before the padding. In a subprocess without the interpreter, whose kernels cannot be compiled.
    code = """
import importlib
from kernels.bench import compile_offline, search_args
nc = importlib.import_module("kernels.nearest_code")
for D in (3, 64, 200):  # padded, resident, streamed
    for precision in ("tf32", "tf32x3"):
        for variant in nc.VARIANTS:
            compile_offline(nc._nearest_code_kernel, search_args(1000, 513, D, variant), dict(
                PRECISION=precision, CERTIFY=precision == "tf32", VARIANT=variant, EMULATE_TF32=False,
                BLOCK_N=64, BLOCK_K=64, **nc._d_blocks(D)))
    for split in (1, 2):
        compile_offline(nc._prepare_kernel, ["*fp32", "*fp32", "*fp32", 513, D, 768, 256, D, 1],
                        dict(SPLIT=split, BLOCK_K=64, BLOCK_D=nc.MIN_D))
    compile_offline(nc._recheck_kernel, ["*fp32", "*fp32", "*i64", "*fp32", "*i64", "*i32", 513, D, D, 1, D, 1],
                    dict(PRECISION="tf32x3", BLOCK_N=128, BLOCK_K=64, **nc._d_blocks(D)), num_warps=8)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@needs_triton
def test_compile_failure_falls_back_to_torch(monkeypatch):
    tried = []

    def no_compile(z, codebook, *args, **kwargs):
        tried.append(codebook.shape[1])
        raise nc.CompilationError(None, None, "Input shapes should have M >= 1, N >= 1 and K >= 8")

    monkeypatch.setattr(nc, "_launch", no_compile)
    monkeypatch.setattr(nc, "_COMPILE_FAILED", {})
    z, codebook = _randn(300, 3, seed=16), _randn(257, 3, seed=17)
    with pytest.warns(RuntimeWarning, match=r"did not compile \(CompilationError: .*K >= 8\).*torch path"):
        codes, dist = search(z, codebook, "triton-tf32-base")
    assert torch.equal(codes, nearest_code_torch(z.to(DEVICE), codebook.to(DEVICE))[0].cpu())
    _assert_matches_reference(z, codebook, codes, dist)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next call neither warns nor compiles again
        assert torch.equal(search(z, codebook, "triton-tf32-base")[0], codes)
    assert tried == [3]
    # Another D is another kernel, so it is tried; an error that is not a compile error propagates.
    monkeypatch.setattr(nc, "_launch", lambda *args, **kwargs: tried.append("run") or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        search(_randn(30, 40, seed=18), _randn(20, 40, seed=19), "triton-tf32-base")
    assert tried == [3, "run"]


def test_torch_path_chunks():
    z, codebook = _randn(1000, 40, seed=11), _randn(513, 40, seed=12)
    codes, dist = nearest_code_torch(z, codebook, chunk_size=64)  # 16 chunks, the last one short
    _assert_matches_reference(z, codebook, codes, dist)
    assert torch.equal(codes, nearest_code_torch(z, codebook)[0])
    for bad in (0, -1):  # no chunk at all: it returned its empty buffers, uninitialised codes
        with pytest.raises(ValueError, match="chunk_size must be at least 1"):
            nearest_code_torch(z, codebook, chunk_size=bad)
    for kw in ({"precision": "fp32"}, {"variant": "pakced"}):  # refused on the torch path too, as on a GPU
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be one of"):
            nearest_code(z, codebook, backend="torch", **kw)


@needs_triton
def test_switch_picks_path(monkeypatch):
    calls = []
    monkeypatch.setattr(nc, "nearest_code_torch", lambda z, c: calls.append("torch"))
    monkeypatch.setattr(nc, "_nearest_code_triton", lambda z, c, precision, variant: calls.append("triton"))
    # On the device the Triton path runs on; auto keeps CPU tensors on torch, even under the interpreter.
    z, codebook = _randn(5, 3).to(DEVICE), _randn(4, 3).to(DEVICE)
    auto = "triton" if DEVICE == "cuda" else "torch"
    for env, backend, expected in [("torch", None, "torch"), ("triton", None, "triton"), ("auto", None, auto),
                                   ("torch", "triton", "triton"), ("triton", "torch", "torch")]:
        monkeypatch.setenv("VQ_KERNEL", env)
        calls.clear()
        nc.nearest_code(z, codebook, backend=backend)
        assert calls == [expected], (env, backend)
    monkeypatch.delenv("VQ_KERNEL")
    calls.clear()
    nc.nearest_code(z, codebook)
    assert calls == [auto]
    monkeypatch.setenv("VQ_KERNEL", "cuda")
    with pytest.raises(ValueError, match="auto, torch, triton"):
        nc.nearest_code(z, codebook)
    # Outside the interpreter a CPU tensor has no Triton path: auto falls back, triton refuses.
    z, codebook = z.cpu(), codebook.cpu()
    monkeypatch.setattr(nc, "_INTERPRET", False)
    monkeypatch.setenv("VQ_KERNEL", "auto")
    calls.clear()
    nc.nearest_code(z, codebook)
    assert calls == ["torch"]
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        nc.nearest_code(z, codebook, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("z,codebook,message", [
    (_randn(10), _randn(4, 10), r"\(N, D\)"),
    (_randn(10, 3), _randn(4, 5), "D=3"),
    (_randn(10, 3), _randn(0, 3), "K >= 1"),
    (torch.ones(10, 3, dtype=torch.int64), _randn(4, 3), "floating point"),
    (_randn(10, 3), torch.empty(4, 3, device="meta"), "codebook is on meta"),
    (_randn(10, 3), torch.ones(4, 3, dtype=torch.int64), "floating point"),  # an integer codebook, float z
    (_randn(10, 0), _randn(4, 0), "D >= 1"),
])
def test_bad_inputs(backend, z, codebook, message, monkeypatch):
    # CPU tensors, also outside the interpreter, where the Triton path has no device for them (as on a
    # GPU machine): the input checks still come first
    for interpret in (nc._INTERPRET, False):
        monkeypatch.setattr(nc, "_INTERPRET", interpret)
        with pytest.raises(ValueError, match=message):
            search(z, codebook, backend, device=None)


def test_imports_without_triton():
    code = """
import sys; sys.modules["triton"] = None  # makes `import triton` fail
import pytest, torch, kernels
assert not kernels.HAVE_TRITON
z, c = torch.randn(7, 3), torch.randn(5, 3)
assert torch.equal(kernels.nearest_code(z, c)[0], kernels.nearest_code_reference(z, c)[0])
with pytest.raises(RuntimeError, match="triton installed: False"):
    kernels.nearest_code(z, c, backend="triton")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "VQ_KERNEL": "auto"}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True)


def test_bench_goals():
    from kernels import bench

    def row(path, us, fell_back=None):
        precision, variant, _ = bench.PATHS[path]
        return dict(N=65536, K=512, D=64, inputs="normal", path=path, precision=precision, variant=variant,
                    graph_us=us, fell_back=fell_back)

    rows = [row("triton tf32 base", 30.0), row("triton tf32 packed", 18.0), row("triton tf32 prepared", 9.0, "no"),
            row("torch addmm tf32", 50.0), row("triton tf32x3 base", 40.0), row("triton tf32x3 prepared", 34.0),
            row("torch addmm fp32", 60.0)]
    tf32, exact = bench.goals(rows)
    assert (tf32["best_path"], tf32["base_us"], tf32["meets_time"], tf32["meets_speedup"]) == \
        ("triton tf32 packed", 30.0, True, True)  # the prepared row did not compile: not a candidate
    assert exact["best_path"] == "triton tf32x3 prepared" and exact["meets_time"] and not exact["meets_speedup"]
    assert exact["speedup"] == pytest.approx(60 / 34)
    other = bench.goals([dict(r, N=16384) for r in rows])
    assert [v["meets_time"] for v in other] == [None, None]  # the time goals hold at (65536, 512, 64) only


@needs_triton
def test_bench_gpu_table_with_a_stand_in_timer(tmp_path):
    # The GPU bench's table, JSON and goals on the CPU: kernels interpreted, a stand-in for the timer.
    from kernels import bench

    path = tmp_path / "bench.json"
    bench.gpu_table([(300, 100, 8)], DEVICE, lambda fn: ((fn(), 7.0)[1], 8.0, 0), 1e12, {}, str(path),
                    log=lambda *args, **kwargs: None)
    report = json.loads(path.read_text())
    assert len(report["rows"]) == 2 * len(bench.GPU_PATHS)
    for r in report["rows"]:
        # torch's own tf32 search is the baseline, not ours: on a GPU it is truly tf32 and can pick a farther
        # code (an H200 did, on one row in 300); every other path must be exact
        tf32_baseline = r["path"] == "torch addmm tf32" and DEVICE == "cuda"
        assert "error" not in r and not r["fell_back"] and (r["beyond_near_tie"] == 0 or tf32_baseline), r
        assert r["graph_us"] == 7.0 and r["x_floor"] == pytest.approx(7.0 / r["floor_us"])
    assert all(0 <= r["rechecked_fraction"] <= 1 for r in report["rows"] if r["path"].startswith("triton tf32 "))
    assert [(v["inputs"], v["precision"], v["speedup"]) for v in report["goals"]] == \
        [("normal", "tf32", 1.0), ("normal", "tf32x3", 1.0), ("clustered", "tf32", 1.0), ("clustered", "tf32x3", 1.0)]
    # a kernel that does not compile: every row of its path says so, untimed, not only the first (it was the
    # torch path after that, timed under the kernel's name)
    def no_packed(z, codebook, precision, variant="base", *a, **k):
        if variant == "packed":
            raise nc.CompilationError(None, None, "no packed kernel here")
        return launch(z, codebook, precision, variant, *a, **k)
    launch, nc._COMPILE_FAILED = nc._launch, {}
    nc._launch = no_packed
    try:
        with pytest.warns(RuntimeWarning, match="did not compile"):
            rows = bench.gpu_table([(64, 20, 8), (96, 20, 8)], DEVICE, lambda fn: ((fn(), 7.0)[1], 8.0, 0), 1e12,
                                   {}, log=lambda *args, **kwargs: None)["rows"]
    finally:
        nc._launch, nc._COMPILE_FAILED = launch, {}
    packed = [r for r in rows if r["path"].startswith("triton") and r["variant"] == "packed"]
    assert len(packed) == 8 and all("no packed kernel" in r["fell_back"] and "graph_us" not in r for r in packed)
    assert all(r["graph_us"] == 7.0 for r in rows if r not in packed)
    # --warm's shards share the kernel paths out between them
    assert sorted(bench._warm_shard([(300, 100, 8)], 0, 2, DEVICE) + bench._warm_shard([(300, 100, 8)], 1, 2, DEVICE)) \
        == sorted(p for p in bench.GPU_PATHS if p.startswith("triton"))


def test_bench_main_writes_json(tmp_path):
    from kernels import bench

    path = tmp_path / "bench.json"
    bench.main(["--shapes", "2048x256x16", "--json", str(path)])
    report = json.loads(path.read_text())
    assert report["rows"] and all(r["N"] == 2048 for r in report["rows"])
    assert all(r["ms"] > 0 for r in report["rows"]) if "cpu" in report["device"] else report["goals"]


@pytest.mark.parametrize("returncode, stderr, says", [
    (-9, "", "was killed by SIGKILL (out of memory?)"),  # a shape too big for the machine
    (1, "Traceback (most recent call last):\n...\nRuntimeError: can't allocate memory", "exited with 1: RuntimeError"),
])
def test_bench_worker_that_dies_is_one_line(returncode, stderr, says, capsys, monkeypatch):
    from kernels import bench

    died = lambda cmd, **k: subprocess.CompletedProcess(cmd, returncode, "", stderr)  # noqa: E731
    monkeypatch.setattr(bench.subprocess, "run", died)
    with pytest.raises(SystemExit) as e:
        bench.main(["--shapes", "4096x64x8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "N=4096 K=64 D=8" in err[0] and says in err[0], err


@pytest.mark.parametrize("argv, says", [
    (["--shapes", "4x0x4"], "K >= 1"), (["--shapes", "4x4x0"], "D >= 1"), (["--shapes=-1x4x4"], "N >= 0"),
    (["--json", "/no/such/folder/x.json"], "its folder does not exist"), (["--json", "."], "a folder"),
    (["--load", "0"], "--load must be at least 1"), (["--load", "-5"], "--load"),
    (["--load", "2", "--size", "8", "-1"], "--size"), (["--steps", "--batch", "0"], "--batch"),
    (["--load", "1", "--size", "1", "1"], "--size must be at least 2"),
    pytest.param(["--load", "2", "--json", "/proc/x.json"], "--json /proc/x.json",  # a folder no file can go in
                 marks=pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc")),
])
def test_bench_bad_flags_exit_2_with_one_line_before_any_timing(argv, says, capsys, monkeypatch):
    from kernels import bench

    for timed in ("_cpu_in_subprocess", "bench_load", "bench_steps"):
        monkeypatch.setattr(bench, timed, lambda *a, **k: pytest.fail("timed before the flags were checked"))
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and says in err[0], err


def test_gpu_check_counts_tests_from_junit_xml(tmp_path, monkeypatch):
    from kernels import gpu_check

    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "@pytest.fixture\ndef broken():\n    raise OSError('no device')\n"
        "def test_passes(): pass\n"
        "@pytest.mark.parametrize('x', [1, 2])\ndef test_fails(x): assert x == 1, 'one only'\n"
        "def test_skips(): pytest.skip('not here')\n"
        "def test_errors(broken): pass\n")
    monkeypatch.setattr(gpu_check, "QUICK_TEST_ARGS", [str(tmp_path / "test_sample.py")])
    result = gpu_check.step_tests(gpu_check._Context(tmp_path / "out", tmp_path / "work", True), 120)
    assert result["status"] == "failed" and (tmp_path / "out" / "logs" / "tests.xml").exists()
    assert {k: result[k] for k in ("collected", "passed", "failed", "skipped", "errors")} == \
        {"collected": 5, "passed": 2, "failed": 1, "skipped": 1, "errors": 1}
    names = [f.split(": ")[0] for f in result["failures"]]  # JUnit's class names start at pytest's rootdir,
    assert [n.split()[0] for n in names] == ["FAILED", "ERROR"]  # which may lie above the test file
    assert names[0].endswith("test_sample::test_fails[2]") and names[1].endswith("test_sample::test_errors")
    assert "one only" in result["failures"][0] and "no device" in result["failures"][1]


def test_gpu_check_never_reports_an_earlier_runs_bench(tmp_path, monkeypatch):
    from kernels import gpu_check

    ctx = gpu_check._Context(tmp_path / "out", tmp_path / "work", True)
    (ctx.out / "bench.json").write_text(json.dumps({"rows": [{"N": 2048}], "goals": []}))  # a kept --out's
    monkeypatch.setattr(gpu_check, "_run", lambda *a, **k: ("timed out", 3.1, -9, "killed while compiling"))
    result = gpu_check.step_bench(ctx, 3)
    assert result["status"] == "timed out" and result["rows"] is None and result["goals"] is None


def test_gpu_check_training_steps_never_report_a_kept_works_run(tmp_path, monkeypatch):
    from kernels import gpu_check

    ctx = gpu_check._Context(tmp_path / "out", tmp_path / "work", True)
    for name in ("train_bf16", "train_compile"):  # an earlier gpu_check's models and figures, in a kept --work
        (ctx.work / name).mkdir(parents=True)
        for f in ("model.pt", "vqvae.pt", "prior.pt"):
            (ctx.work / name / f).write_bytes(b"old")
        (ctx.work / name / "summary.json").write_text(json.dumps({"test_ssim_mean": 0.9, "prior_bits_per_code": 1.5}))
        (ctx.work / name / "metrics.jsonl").write_text(json.dumps({"stage": "prior", "epoch": 1, "seconds": 9}) + "\n")
        (ctx.work / f"{name}.json").write_text(json.dumps({"worker_seconds": 99}))
    seen = {}

    def failing(argv, *a, **k):  # the step's train.py: what its folder held when it started, then a failure
        out = Path(json.loads(argv[-1])[3])  # the worker's train.py argv: --data TREE --out OUT ...
        seen[out.name] = sorted(p.name for p in out.iterdir()) if out.exists() else []
        return "failed", 1.0, 1, "error: it broke"
    monkeypatch.setattr(gpu_check, "_run", failing)
    bf16 = gpu_check.step_train_bf16(ctx, 60)
    assert seen["train_bf16"] == [] and bf16["status"] == "failed"
    assert "worker_seconds" not in bf16 and bf16.get("test_ssim_mean") is None and not bf16["seconds_per_epoch"]
    (ctx.work / "train_bf16").mkdir()
    (ctx.work / "train_bf16" / "model.pt").write_bytes(b"new")  # as a finished train_bf16 leaves it
    compiled = gpu_check.step_train_compile(ctx, 60)
    assert seen["train_compile"] == ["model.pt"] and "worker_seconds" not in compiled  # no old prior.pt to refuse it


def test_gpu_check_refuses_training_steps_without_their_tree(tmp_path, capsys, monkeypatch):
    from kernels import gpu_check

    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path / "out"), "--only", "sampler", "train_fp32"])
    assert e.value.code == 2 and "trains on the phantom tree: add tree" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything is made
    (tmp_path / "a_file").write_text("")
    for flag in ("--out", "--work"):  # a file where a folder goes: one line, not a traceback
        with pytest.raises(SystemExit) as e:
            gpu_check.main(["--out", str(tmp_path / "o"), flag, str(tmp_path / "a_file"), "--only", "bench", "--quick"])
        assert e.value.code == 2 and f"{flag} {tmp_path / 'a_file'}: a file, not a folder" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the full sizes on a CPU: refused before anything is made
        with pytest.raises(SystemExit) as e:
            gpu_check.main(["--out", str(tmp_path / "o2"), "--only", "bench"])
        assert e.value.code == 2 and "no CUDA GPU found" in capsys.readouterr().err and not (tmp_path / "o2").exists()
        monkeypatch.setattr(gpu_check, "start_tree", lambda ctx, limit: "started")  # the tree alone: any machine
        monkeypatch.setattr(gpu_check, "STEPS", [("tree", lambda ctx, limit: {"status": "ok"})])
        gpu_check.main(["--out", str(tmp_path / "o3"), "--only", "tree"])
        assert (tmp_path / "o3" / "gpu_check.json").exists()


def test_gpu_check_limits_fit_seven_minutes():
    from kernels import gpu_check

    limits = gpu_check.LIMITS
    assert limits["tree"] <= limits["tests"]  # written beside the tests: it adds no time
    assert sum(v for k, v in limits.items() if k != "tree") <= gpu_check.TOTAL_S < 7 * 60


def test_gpu_check_quick(tmp_path):
    # The device script end to end in its CPU form: every step runs and leaves its figures.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "kernels.gpu_check", "--out", str(tmp_path), "--quick"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=1000)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert {k: s["status"] for k, s in steps.items()} == {
        "tests": "ok", "bench": "ok", "tree": "ok", "train_bf16": "ok", "sampler": "ok", "train_fp32": "ok",
        "train_compile": "skipped"}, {k: s.get("output", s.get("reason")) for k, s in steps.items()}
    assert {k: steps["tests"][k] for k in ("collected", "passed", "failed", "skipped", "errors")} == \
        {"collected": 2, "passed": 2, "failed": 0, "skipped": 0, "errors": 0}
    # within its limit, each step, and the whole (a wall-clock bound would only say how busy the machine was)
    assert all(s["seconds"] <= s["limit_s"] for s in steps.values() if s["status"] != "skipped"), steps
    assert report["seconds"] <= report["total_limit_s"]
    assert steps["bench"]["rows"] and all(r["ms"] > 0 for r in steps["bench"]["rows"])
    assert steps["tree"]["files"] == 2 * (48 + 16 + 16) and steps["tree"]["write_seconds"] > 0
    for name, stages in (("train_bf16", ("vqvae", "prior")), ("train_fp32", ("vqvae",))):
        run = steps[name]
        assert 0 < run["test_ssim_mean"] < 1 and run["epochs_vqvae"] == 1
        assert all(run["img_per_s"][s]["median"] > 0 and run["seconds_per_epoch"][s] > 0 for s in stages)
    assert steps["train_bf16"]["prior_bits_per_code"] > 0
    # a timing run times training, not the realism report
    assert "--realism" in steps["train_bf16"]["argv"] and not any("realism |" in line
                                                                   for line in steps["train_bf16"]["output"])
    assert steps["sampler"]["cached"]["seconds"] > 0 and steps["sampler"]["cached"]["maps"] == "16x8"
    compare = report["compare"]
    assert compare["bf16_vs_fp32"]["same_epochs"] and compare["extrapolated"]["seconds_30_30"]["metrics"] > 0
    assert "| train_bf16 | ok |" in (tmp_path / "gpu_check.md").read_text()


def test_bench_load_times_the_loader_and_cleans_up(capsys, tmp_path, monkeypatch):
    from kernels import bench

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # tempfile honours it once its cached choice is reset
    monkeypatch.setattr("tempfile.tempdir", None)
    times = bench.main(["--load", "12", "--size", "32", "16", "--json", str(tmp_path / "load.json")])
    assert sorted(times) == ["cold", "naive", "warm"] and all(t > 0 for t in times.values())
    assert "12 slices of 32x16" in capsys.readouterr().out
    assert json.loads((tmp_path / "load.json").read_text())["load"] == times  # --json as for the other modes
    assert list(tmp_path.iterdir()) == [tmp_path / "load.json"]  # the slices and the cache went with their folder


def test_bench_steps_times_every_row_and_restores_the_blur_and_the_dropout(capsys):
    from kernels import bench

    blur, dropout = bench.vq._blur, bench.vq.byte_dropout
    times = bench.bench_steps(reps=1, batch=2, size=(32, 16))
    assert sorted(times) == ["prior step", "prior step, bf16", "prior step, bf16, torch dropout",
                             "ssim loss, conv blur", "ssim loss, matmul blur", "vqvae step", "vqvae step, bf16"]
    assert all(t > 0 for t in times.values()) and bench.vq._blur is blur and bench.vq.byte_dropout is dropout
    assert "batch 2 of 32x16 (codes 8x4)" in capsys.readouterr().out


@pytest.mark.parametrize("backend", [pytest.param(f"triton-tf32-{v}", marks=needs_triton) for v in nc.VARIANTS])
def test_near_ties_within_one_slot_are_not_proven(backend, monkeypatch):
    # Codes j and j + 256 share a slot of the running argmin (256 is a multiple of every BLOCK_K), so the
    # runner-up of a row near both is the slot's own second best, not another slot's best: the tf32 pass
    # must not prove such a row. z sits between the two, a near-tie (about 2e-3 of the distance: above fp32
    # rounding, below tf32's bound) that tf32 rounding may get wrong; the other codes are far away. Every
    # such row is queued, and the recheck makes it exact. tf32x3 has no proof: nothing queued, no recheck.
    variant = backend.split("-")[2]
    codebook = _randn(512, 40, seed=30)
    codebook[256:] = codebook[:256] + 0.3 * _randn(256, 40, seed=29)  # code j + 256 beside code j
    g = torch.Generator().manual_seed(31)
    j = torch.randint(0, 256, (300,), generator=g)
    a, b = codebook[j], codebook[j + 256]
    side = torch.where(torch.rand(300, 1, generator=g) < 0.5, 1.0, -1.0)
    z = (a + b) / 2 + side * 2e-4 * (a - b) + 1e-5 * _randn(300, 40, seed=32)
    want = nearest_code_reference(z, codebook)[0]
    assert ((want == j) | (want == j + 256)).all() and (want == j).any() and (want != j).any()
    codes, dist = search(z, codebook, backend)
    assert torch.equal(codes, want)
    _assert_matches_reference(z, codebook, codes, dist)
    queued = []
    monkeypatch.setattr(nc, "_recheck", lambda z, c, codes, dist, queue, count: queued.append(count.item()))
    nc._launch(z.to(DEVICE), codebook.to(DEVICE), "tf32", variant)
    assert queued == [300]
    assert nc._launch(z.to(DEVICE), codebook.to(DEVICE), "tf32x3", variant)[2].item() == 0 and queued == [300]


@needs_triton
def test_prepared_codebook_pads_k_to_the_next_multiple():
    for K, Kp in [(1, 256), (256, 256), (257, 512), (512, 512)]:
        assert nc._prepare(_randn(K, 8).to(DEVICE), "tf32", nc._d_blocks(8))[2] == Kp


@needs_triton
@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
def test_packed_at_its_largest_codebook(precision):
    # K = 8192 on 32-code tiles: 256 tiles, the most a packed key's 8 low bits can number. Rows sit beside
    # codes of the first and the last tiles (well separated codes: every code is exact).
    codebook = 10 * _randn(8192, 5, seed=33)
    g = torch.Generator().manual_seed(34)
    truth = torch.cat([torch.arange(8160, 8192), torch.arange(0, 32), torch.randint(0, 8192, (64,), generator=g)])
    z = codebook[truth] + 1e-3 * _randn(128, 5, seed=35)
    assert torch.equal(nearest_code_reference(z, codebook)[0], truth)
    codes, dist, _ = nc._launch(z.to(DEVICE), codebook.to(DEVICE), precision, "packed",
                                blocks=dict(BLOCK_N=64, BLOCK_K=nc._MIN_BLOCK_K))
    assert torch.equal(codes.cpu(), truth)
    _assert_matches_reference(z, codebook, codes.cpu(), dist.cpu())
    with pytest.raises(ValueError, match="K <= 8192"):  # one code more needs a 257th tile
        nc._launch(z[:1].to(DEVICE), _randn(8193, 5).to(DEVICE), precision, "packed")


@needs_triton
@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's tf32 emulation; a GPU rounds in its tensor cores")
@pytest.mark.parametrize("variant", ["base", "prepared"])
def test_interpreted_tf32_pass_truncates_both_operands(variant, monkeypatch):
    # The tf32 pass (recheck taken away, no bound) scores ||c||^2 - 2 z.c with both z and c truncated to
    # tf32's 10 mantissa bits, as a tensor core may: the proof is tested against that rounding only if
    # both operands get it. Its codes minimise that score, up to fp32 rounding, on every row.
    codebook = _randn(513, 40, seed=36)
    z = _randn(3000, 40, seed=37)
    monkeypatch.setattr(nc, "_recheck", lambda *args: None)
    codes = nc._launch(z, codebook, "tf32", variant, eps=0.0)[0]
    trunc = lambda x: (x.view(torch.int32) & -0x2000).view(torch.float32).double()  # noqa: E731
    score = codebook.double().pow(2).sum(1) - 2 * trunc(z) @ trunc(codebook).T  # (N, K)
    chosen, best = score.gather(1, codes[:, None])[:, 0], score.min(1).values
    assert (chosen - best <= 1e-4).all()
    assert (codes != nearest_code_reference(z, codebook)[0]).any()  # and tf32 rounding does change codes


@needs_triton
def test_compile_failure_is_remembered_per_precision_and_variant(monkeypatch):
    # A kernel that did not compile is the one of that precision and variant: the others still run theirs.
    tried = []

    def launch(z, codebook, precision, variant="base", *args, **kwargs):
        tried.append((precision, variant))
        if (precision, variant) == ("tf32", "prepared"):
            raise nc.CompilationError(None, None, "no tf32 prepared kernel here")
        return (*nearest_code_torch(z, codebook), None)

    monkeypatch.setattr(nc, "_launch", launch)
    monkeypatch.setattr(nc, "_COMPILE_FAILED", {})
    z, codebook = _randn(30, 8, seed=38), _randn(20, 8, seed=39)
    with pytest.warns(RuntimeWarning, match="tf32, prepared.*did not compile"):
        search(z, codebook, "triton-tf32-prepared")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for backend in ("triton-tf32-prepared", "triton-tf32x3-prepared", "triton-tf32-base", "triton-tf32-packed"):
            search(z, codebook, backend)
    assert tried == [("tf32", "prepared"), ("tf32x3", "prepared"), ("tf32", "base"), ("tf32", "packed")]


@needs_triton
@pytest.mark.parametrize("variant", nc.VARIANTS)
def test_tf32_proof_is_sound_when_d_streams(variant, monkeypatch):
    # As test_tf32_proof_is_sound, at D = 200 (z and codes stream in D chunks, the last one partial), with
    # ||z|| about 600 times ||c||: the bound then rests on the ||z|| term, so ||z||^2 must be summed
    # over every chunk (z's last chunk is zero here: it alone would give a bound that proves wrong rows).
    # A third of the rows point along a code (provable), the rest sit at near-ties between two codes (a gap of
    # 3% of ||c||^2: far below the bound, far above what a bound from z's last chunk alone would be).
    codebook = 5e-3 * _randn(257, 200, seed=40)
    g = torch.Generator().manual_seed(42)
    t, i = torch.randint(0, 257, (500,), generator=g), torch.randint(0, 257, (1000,), generator=g)
    j = (i + torch.randint(1, 257, (1000,), generator=g)) % 257
    c, head = codebook.double(), torch.arange(200) < 192
    tie, u = head * 300 * (c[i] + c[j]), head * (c[i] - c[j])  # z's last chunk is zero
    gap = (c[i].pow(2).sum(1) - c[j].pow(2).sum(1)) - 2 * (tie * u).sum(1)  # score of i - score of j
    side = torch.where(torch.rand(1000, generator=g) < 0.5, 1.0, -1.0)
    tie += ((gap - side * 0.03 * c[i].pow(2).sum(1)) / (2 * u.pow(2).sum(1)))[:, None] * u
    z = torch.cat([head * 600 * codebook[t], tie.float()])
    want = nearest_code_reference(z, codebook)[0]
    assert torch.equal(want[:500], t) and torch.equal(want[500:], torch.where(side > 0, j, i))
    queued = []
    monkeypatch.setattr(nc, "_recheck", lambda z, c, codes, dist, queue, count: queued.append(queue[:count.item()]))
    codes = nc._launch(z.to(DEVICE), codebook.to(DEVICE), "tf32", variant)[0].cpu()
    proven = torch.ones(len(z), dtype=torch.bool)
    proven[queued[0].cpu()] = False
    assert (codes == want)[proven].all() and proven[:500].all()
