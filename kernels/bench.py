"""Benchmark nearest_code's paths: time, peak extra memory, and on a GPU the memory-bandwidth floor.

    python -m kernels.bench            # all shapes on a GPU; on a CPU the biggest is skipped
    python -m kernels.bench --all      # include (262144, 1024, 64) on a CPU too

On a GPU each path is timed twice: as a replayed CUDA graph (the device time of its kernels,
which is what the floor compares with) and as plain calls (host launch overhead included).
Inputs are random normal (every distance alike: the hardest case for the tf32 proof) and
clustered (each row near one code, as encoder outputs of a trained VQ-VAE are); codes are
checked against the float64 reference.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from .nearest_code import HAVE_TRITON, nearest_code, nearest_code_reference, nearest_code_torch

SHAPES = [(4096, 512, 64), (65536, 512, 64), (262144, 1024, 64)]  # (N, K, D)
CPU_TOO_SLOW = {(262144, 1024, 64)}
# The contract: at this shape the chunked path needs <= 1/4 of cdist's memory and no more time.
CHECK_SHAPE = (65536, 512, 64)
# Spec sheet peak HBM bandwidth, B/s; first matching substring of the device name wins.
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}
PATHS = {
    "triton tf32": lambda z, c: nearest_code(z, c, backend="triton", precision="tf32"),
    "triton tf32x3": lambda z, c: nearest_code(z, c, backend="triton", precision="tf32x3"),
    "torch chunked": nearest_code_torch,
    "cdist+argmin": lambda z, c: torch.cdist(z, c).argmin(1),
}


def _inputs(N, K, D, device, clustered=False):
    g = torch.Generator(device=device).manual_seed(0)
    c = torch.randn(K, D, generator=g, device=device)
    if clustered:
        rows = torch.randint(0, K, (N,), generator=g, device=device)
        return c[rows] + 0.3 * torch.randn(N, D, generator=g, device=device), c
    return torch.randn(N, D, generator=g, device=device), c


def _median_ms(fn, reps, sync):
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# Runs in a fresh process, so ru_maxrss (the process's peak) sees this path alone.
def _measure_cpu(path, N, K, D, reps):
    z, c = _inputs(N, K, D, "cpu")
    fn = PATHS[path]
    fn(z[:256], c)  # lazy library set-up (thread pools, BLAS buffers) is not the path's memory
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(z, c)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024  # KiB on Linux
    return _median_ms(lambda: fn(z, c), reps, lambda: None), peak


def _measure_gpu(path, z, c):
    """(graph us, call us, peak extra bytes, codes) of one path on the GPU."""
    from triton.testing import do_bench_cudagraph

    fn = PATHS[path]
    codes = fn(z, c)  # warm-up: compilation and autotuning
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(z, c)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    graph_us = 1e3 * do_bench_cudagraph(lambda: fn(z, c), rep=200, return_mode="median")
    call_us = 1e3 * _median_ms(lambda: fn(z, c), 50, torch.cuda.synchronize)
    return graph_us, call_us, peak, codes[0] if isinstance(codes, tuple) else codes


def _check_codes(z, c, codes, ref):
    """(mismatches against the float64 reference, how many of them are farther than a near-tie)."""
    ref_codes, ref_dist = ref
    chosen = (z.double() - c.double()[codes]).pow(2).sum(1)
    return int((codes != ref_codes).sum()), int((chosen > ref_dist * (1 + 1e-5) + 1e-6).sum())


def _peak_bandwidth():
    name = torch.cuda.get_device_name()
    for key, bandwidth in PEAK_BANDWIDTH.items():
        if key in name:
            return bandwidth, f"{name}, spec sheet"
    # Unknown GPU: a device-to-device copy (read + write) is close to the achievable peak.
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    ms = _median_ms(lambda: y.copy_(x), 20, torch.cuda.synchronize)
    return 2 * x.numel() / (ms / 1e3), f"{name}, measured copy"


def compile_offline(kernel, args, constexprs, num_warps=4, num_stages=2, arch=90):
    """Compile a @triton.jit kernel for NVIDIA sm_<arch> without a GPU (Triton ships ptxas) and return
    ptxas's report as {"registers", "spill_stores", "stack"} (bytes). args, in the kernel's order: a
    dtype string such as "*fp32" for a pointer, an int or a float for a scalar, as a launch would see
    them (ints divisible by 16 and pointers get Triton's divisibility hint; ints equal to 1 become
    constants, as Triton specialises them). Raises what a launch would: CompilationError and the like."""
    import re
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    signature, attrs, constants = {}, {}, dict(constexprs)
    for i, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, str):
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:  # ptxas again, verbose: Triton keeps no resource report
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", ptx, "-o", ptx + ".cubin"],
                             capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "stack": number(r"(\d+) bytes stack frame")}


def search_args(N, K, D, variant="base"):
    """compile_offline's args for _nearest_code_kernel on contiguous fp32 inputs."""
    from .nearest_code import K_ALIGN, _d_blocks

    blocks = _d_blocks(D)
    Kp, Dp = (0, 0) if variant == "base" else (-(-K // K_ALIGN) * K_ALIGN, -(-D // blocks["BLOCK_D"]) * blocks["BLOCK_D"])
    return ["*fp32"] * 4 + ["*i64", "*fp32", "*i64", "*i32", N, K, D, Kp, Dp, D, 1, D, 1, 2.0**-7]


def _cpu_in_subprocess(path, N, K, D):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-m", "kernels.bench", "--worker", path, str(N), str(K), str(D)],
        cwd=root, check=True, capture_output=True, text=True,
    ).stdout
    result = json.loads(out.splitlines()[-1])
    return result["ms"], result["peak"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="also run the shapes that are slow on a CPU")
    parser.add_argument("--worker", nargs=4, metavar=("PATH", "N", "K", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        path, *nkd = args.worker
        ms, peak = _measure_cpu(path, *map(int, nkd), reps=5)
        print(json.dumps({"ms": ms, "peak": peak}))
        return

    if torch.cuda.is_available():
        return _main_gpu()
    print(f"device: cpu, {torch.get_num_threads()} threads; each path runs in a fresh process")
    paths = ["torch chunked", "cdist+argmin"]
    print(f"{'N':>7} {'K':>5} {'D':>4}  {'path':<14} {'ms':>9} {'peak extra MB':>14}")
    results = {}
    for N, K, D in SHAPES:
        if (N, K, D) in CPU_TOO_SLOW and not args.all:
            print(f"{N:>7} {K:>5} {D:>4}  skipped on CPU (too slow; --all runs it)")
            continue
        for path in paths:
            ms, peak = _cpu_in_subprocess(path, N, K, D)
            results[path, (N, K, D)] = ms, peak
            print(f"{N:>7} {K:>5} {D:>4}  {path:<14} {ms:>9.2f} {peak / 2**20:>14.1f}")
    (t_ours, m_ours), (t_cdist, m_cdist) = results["torch chunked", CHECK_SHAPE], results["cdist+argmin", CHECK_SHAPE]
    ok = m_ours <= m_cdist / 4 and t_ours <= t_cdist
    print(f"chunked / cdist at {CHECK_SHAPE}: memory {m_ours / m_cdist:.2f} (needs <= 0.25), "
          f"time {t_ours / t_cdist:.2f} (needs <= 1): {'ok' if ok else 'FAIL'}")


def _main_gpu():
    from .nearest_code import _launch

    bandwidth, source = _peak_bandwidth()
    print(f"device: {source}, peak bandwidth {bandwidth / 1e12:.2f} TB/s")
    paths = [p for p in PATHS if HAVE_TRITON or not p.startswith("triton")]
    print(f"{'N':>7} {'K':>5} {'D':>4} {'inputs':>9}  {'path':<14} {'graph us':>9} {'call us':>9} {'% floor':>8} "
          f"{'extra MB':>9}  codes vs float64")
    for N, K, D in SHAPES:
        # Read z and codebook once, write int64 codes and fp32 dist once: no path beats that.
        floor_us = 1e6 * (4 * (N * D + K * D) + N * (8 + 4)) / bandwidth
        for clustered in (False, True):
            z, c = _inputs(N, K, D, "cuda", clustered)
            ref = [torch.cat(t) for t in zip(*(nearest_code_reference(zc, c) for zc in z.split(16384)))]  # float64
            for path in paths:
                graph_us, call_us, peak, codes = _measure_gpu(path, z, c)
                wrong, far = _check_codes(z, c, codes, ref)
                note = f"{wrong} differ, {far} beyond a near-tie"
                if path == "triton tf32":
                    note += f"; {_launch(z, c, 'tf32')[2].item() / N:.1%} rows rechecked"
                print(f"{N:>7} {K:>5} {D:>4} {'clustered' if clustered else 'normal':>9}  {path:<14} {graph_us:>9.1f} "
                      f"{call_us:>9.1f} {100 * floor_us / graph_us:>8.1f} {peak / 2**20:>9.1f}  {note}", flush=True)


if __name__ == "__main__":
    main()
