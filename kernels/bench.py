"""Benchmark nearest_code's paths: time, peak extra memory, and on a GPU the memory-bandwidth floor.

    python -m kernels.bench                       # GPU: every kernel variant beside torch's materialised search
    python -m kernels.bench --json bench.json     # the same, every figure also written to a file
    python -m kernels.bench --warm 4              # compile the kernels in 4 processes first (faster start)
    python -m kernels.bench --shapes 4096x512x64  # other (N, K, D)
    python -m kernels.bench --all                 # on a CPU, include (262144, 1024, 64) too
    python -m kernels.bench --registers           # registers a thread of each variant for sm_90 (no GPU needed)
    python -m kernels.bench --load 11460          # vq.load_slices against a plain nibabel loop (the data loader)

On a GPU each path is timed twice: as a replayed CUDA graph (the device time of its kernels,
which is what the floor compares with) and as plain calls (host launch overhead included).
Inputs are random normal (every distance alike: the hardest case for the tf32 proof) and
clustered (each row near one code, as encoder outputs of a trained VQ-VAE are); codes are
checked against the float64 reference. Per shape it says whether the goals hold: at
(65536, 512, 64) tf32 <= 20 us and exact (tf32x3) <= 35 us, and at every shape both at least 2x
faster than torch's materialised search in the same precision. On a CPU it times the torch paths.
"""

import argparse
import importlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import vq

from .nearest_code import HAVE_TRITON, VARIANTS, nearest_code, nearest_code_reference, nearest_code_torch

SHAPES = [(65536, 512, 64), (262144, 1024, 64), (16384, 512, 256)]  # (N, K, D)
CPU_TOO_SLOW = {(262144, 1024, 64)}
# The contract: at this shape the chunked path needs <= 1/4 of cdist's memory and no more time.
CHECK_SHAPE = (65536, 512, 64)
# Goals (issue 17): device time at GOAL_SHAPE per precision, and speed-up over torch at every shape.
GOAL_SHAPE, GOAL_US, GOAL_SPEEDUP = (65536, 512, 64), {"tf32": 20.0, "tf32x3": 35.0}, 2.0
# Spec sheet peak HBM bandwidth, B/s; first matching substring of the device name wins.
PEAK_BANDWIDTH = {"H100 PCIe": 2.0e12, "H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def _materialised(tf32):
    """torch's obvious search: the whole (N, K) score matrix, then argmin; ||c||^2 is precomputed."""
    # torch's fp32_precision API where it exists: after a program used it, the legacy flag raises
    knob = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(torch.backends, "fp32_precision") else "allow_tf32"
    value = ("tf32" if tf32 else "ieee") if name == "fp32_precision" else tf32

    def search(z, c, c_sq):
        saved = getattr(knob, name)
        setattr(knob, name, value)
        try:
            return torch.addmm(c_sq, z, c.T, alpha=-2).argmin(1)
        finally:
            setattr(knob, name, saved)
    return search


# name -> (precision, variant or None for torch, fn(z, c, c_sq) -> codes or (codes, dist))
PATHS = {f"triton {p} {v}": (p, v, lambda z, c, _, p=p, v=v: nearest_code(z, c, backend="triton", precision=p, variant=v))
         for v in VARIANTS for p in ("tf32", "tf32x3")}
PATHS.update({
    "torch addmm tf32": ("tf32", None, _materialised(True)),
    "torch addmm fp32": ("tf32x3", None, _materialised(False)),
    "torch chunked": ("float64", None, lambda z, c, _: nearest_code_torch(z, c)),
    "cdist+argmin": ("fp32", None, lambda z, c, _: torch.cdist(z, c).argmin(1)),
})
CPU_PATHS = ["torch chunked", "cdist+argmin"]
GPU_PATHS = [p for p in PATHS if p != "cdist+argmin"]


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
    fn = PATHS[path][2]
    fn(z[:256], c, None)  # lazy library set-up (thread pools, BLAS buffers) is not the path's memory
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(z, c, None)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024  # KiB on Linux
    return _median_ms(lambda: fn(z, c, None), reps, lambda: None), peak


def _gpu_timer(fn):
    """(graph us, call us, peak extra bytes) of fn on the GPU, after one warm-up call."""
    from triton.testing import do_bench_cudagraph

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    graph_us = 1e3 * do_bench_cudagraph(fn, rep=100, return_mode="median")
    call_us = 1e3 * _median_ms(fn, 20, torch.cuda.synchronize)
    return graph_us, call_us, peak


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


def floor_us(N, K, D, bandwidth):
    """Read z and the codebook once, write int64 codes and fp32 distances once: no path beats that."""
    return 1e6 * (4 * (N * D + K * D) + N * (8 + 4)) / bandwidth


def goals(rows):
    """Per shape and inputs, the best kernel of each precision against the goals and torch's search."""
    verdicts = []
    for N, K, D, inputs in dict.fromkeys((r["N"], r["K"], r["D"], r["inputs"]) for r in rows):
        mine = [r for r in rows if (r["N"], r["K"], r["D"], r["inputs"]) == (N, K, D, inputs) and "graph_us" in r]
        for precision, torch_path in (("tf32", "torch addmm tf32"), ("tf32x3", "torch addmm fp32")):
            kernels = [r for r in mine if r["variant"] and r["precision"] == precision and not r["fell_back"]]
            torch_row = next((r for r in mine if r["path"] == torch_path), None)
            if not kernels:
                continue
            best = min(kernels, key=lambda r: r["graph_us"])
            default = next((r for r in kernels if r["variant"] == "base"), None)
            v = {"N": N, "K": K, "D": D, "inputs": inputs, "precision": precision, "best_path": best["path"],
                 "best_us": best["graph_us"], "base_us": default["graph_us"] if default else None,
                 "goal_us": GOAL_US[precision] if (N, K, D) == GOAL_SHAPE else None,
                 "torch_path": torch_path, "torch_us": torch_row["graph_us"] if torch_row else None}
            v["meets_time"] = None if v["goal_us"] is None else best["graph_us"] <= v["goal_us"]
            v["speedup"] = v["torch_us"] / best["graph_us"] if v["torch_us"] else None
            v["meets_speedup"] = None if v["speedup"] is None else v["speedup"] >= GOAL_SPEEDUP
            verdicts.append(v)
    return verdicts


def _write_json(path, obj):
    if path:  # rewritten after every row, so a run cut short still leaves what it measured
        vq.save_json(path, obj)


def gpu_table(shapes, device, timer, bandwidth, report, json_path=None, paths=GPU_PATHS, log=print):
    """Time every path at every shape on both inputs: report (a dict, written to json_path) gets
    "rows" and "goals". timer(fn) -> (graph us, call us, peak extra bytes); the CPU tests pass a
    stand-in, with the kernel interpreted."""
    nc = importlib.import_module(".nearest_code", __package__)  # the module: the package re-exports the function
    report.setdefault("rows", [])
    log(f"{'N':>7} {'K':>5} {'D':>4} {'inputs':>9}  {'path':<24} {'graph us':>9} {'call us':>9} {'x floor':>8} "
        f"{'extra MB':>9}  codes vs float64")
    for N, K, D in shapes:
        floor = floor_us(N, K, D, bandwidth)
        for inputs in ("normal", "clustered"):
            z, c = _inputs(N, K, D, device, inputs == "clustered")
            c_sq = c.pow(2).sum(1)
            ref = [torch.cat(t) for t in zip(*(nearest_code_reference(zc, c) for zc in z.split(16384)))]  # float64
            for path in paths:
                precision, variant, fn = PATHS[path]
                row = {"N": N, "K": K, "D": D, "inputs": inputs, "path": path, "precision": precision,
                       "variant": variant, "floor_us": floor, "fell_back": None}
                key = nc._compile_key(z, c, precision, variant)
                try:
                    out = fn(z, c, c_sq)  # warm-up: compilation and autotuning
                    if path.startswith("triton") and key in nc._COMPILE_FAILED:  # now or at an earlier row
                        row["fell_back"] = nc._COMPILE_FAILED[key]  # nearest_code took the torch path: not timed
                    else:
                        row["graph_us"], row["call_us"], row["extra_bytes"] = timer(lambda: fn(z, c, c_sq))
                        row["x_floor"] = row["graph_us"] / floor
                    codes = out[0] if isinstance(out, (tuple, list)) else out
                    row["codes_differ"], row["beyond_near_tie"] = _check_codes(z, c, codes, ref)
                    if precision == "tf32" and variant and not row["fell_back"]:
                        queued = nc._launch(z, c, "tf32", variant)[2].item()
                        row["rechecked_fraction"] = queued / N
                except Exception as e:  # one path failing (out of memory, say) does not lose the others
                    row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                report["rows"].append(row)
                report["goals"] = goals(report["rows"])
                _write_json(json_path, report)
                log(_format_row(row), flush=True)
        for v in (v for v in report["goals"] if (v["N"], v["K"], v["D"]) == (N, K, D)):
            log(_format_goal(v), flush=True)
    return report


def _format_row(r):
    head = f"{r['N']:>7} {r['K']:>5} {r['D']:>4} {r['inputs']:>9}  {r['path']:<24}"
    if "error" in r:
        return f"{head} failed: {r['error']}"
    note = f"{r['codes_differ']} differ, {r['beyond_near_tie']} beyond a near-tie"
    if r["fell_back"]:
        return f"{head} did not compile, not timed ({r['fell_back']}); {note}"
    if "rechecked_fraction" in r:
        note += f"; {r['rechecked_fraction']:.1%} rows rechecked"
    return (f"{head} {r['graph_us']:>9.1f} {r['call_us']:>9.1f} {r['x_floor']:>8.1f} {r['extra_bytes'] / 2**20:>9.1f}"
            f"  {note}")


def _format_goal(v):
    ok = {True: "ok", False: "NOT MET", None: "-"}
    line = (f"goals at ({v['N']}, {v['K']}, {v['D']}) {v['inputs']}, {v['precision']}: best {v['best_path']} "
            f"{v['best_us']:.1f} us")
    if v["goal_us"] is not None:
        line += f" (goal <= {v['goal_us']:.0f} us: {ok[v['meets_time']]})"
    if v["speedup"] is not None:
        line += (f", {v['speedup']:.2f}x faster than {v['torch_path']} {v['torch_us']:.1f} us "
                 f"(goal >= {GOAL_SPEEDUP:.0f}x: {ok[v['meets_speedup']]})")
    return line


def compile_offline(kernel, args, constexprs, num_warps=4, num_stages=2, arch=90):
    """Compile a @triton.jit kernel for NVIDIA sm_<arch> without a GPU (Triton ships ptxas) and return
    ptxas's report as {"registers", "spill_stores", "stack", "shared"} (bytes) and the programs an SM
    can hold at once (for sm_90). args, in the kernel's order: a
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
    report = {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
              "stack": number(r"(\d+) bytes stack frame"), "shared": compiled.metadata.shared}
    # Programs an SM can hold (sm_90: 64K registers allocated per warp in units of 256, 227 KiB of
    # shared memory plus 1 KiB reserved per program, 64 warps): occupancy, which latency-bound kernels need.
    warp_regs = -(-report["registers"] * 32 // 256) * 256
    report["programs_per_sm"] = min(65536 // (warp_regs * num_warps), 64 // num_warps,
                                    (233472 // (report["shared"] + 1024)) if report["shared"] else 32)
    return report


def search_args(N, K, D, variant="base"):
    """compile_offline's args for _nearest_code_kernel on contiguous fp32 inputs."""
    from .nearest_code import K_ALIGN, _d_blocks

    blocks = _d_blocks(D)
    Kp, Dp = (0, 0) if variant == "base" else (-(-K // K_ALIGN) * K_ALIGN, -(-D // blocks["BLOCK_D"]) * blocks["BLOCK_D"])
    return ["*fp32"] * 4 + ["*i64", "*fp32", "*i64", "*i32", N, K, D, Kp, Dp, D, 1, D, 1, 2.0**-7]


def registers(shapes=((65536, 512, 64), (16384, 512, 256)), log=print):
    """ptxas's registers and spills for every variant and autotune config, compiled for sm_90: what
    sets occupancy, measured without a GPU. Returns the rows."""
    nc = importlib.import_module(".nearest_code", __package__)
    rows = []
    log(f"{'D':>4}  {'precision':<7} {'variant':<9} {'BLOCK_N':>7} {'BLOCK_K':>7} {'warps':>5} {'stages':>6} "
        f"{'registers':>9} {'spill bytes':>11} {'shared KiB':>10} {'programs/SM':>11}")
    for N, K, D in shapes:
        for precision in ("tf32", "tf32x3"):
            for variant in nc.VARIANTS:
                for config in nc._CONFIGS:
                    blocks = dict(config.kwargs)
                    report = compile_offline(nc._nearest_code_kernel, search_args(N, K, D, variant), dict(
                        PRECISION=precision, CERTIFY=precision == "tf32", VARIANT=variant, EMULATE_TF32=False,
                        **blocks, **nc._d_blocks(D)), num_warps=config.num_warps, num_stages=config.num_stages)
                    rows.append(dict(D=D, precision=precision, variant=variant, **blocks, num_warps=config.num_warps,
                                     num_stages=config.num_stages, **report))
                    log(f"{D:>4}  {precision:<7} {variant:<9} {blocks['BLOCK_N']:>7} {blocks['BLOCK_K']:>7} "
                        f"{config.num_warps:>5} {config.num_stages:>6} {report['registers']:>9} "
                        f"{report['spill_stores']:>11} {report['shared'] / 1024:>10.0f} {report['programs_per_sm']:>11}",
                        flush=True)
    return rows


def _warm(shapes, processes):
    """Compile (and autotune) every kernel path at these shapes in processes side by side: exit codes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shape_args = ["--shapes", *("x".join(map(str, s)) for s in shapes)]
    procs = [subprocess.Popen([sys.executable, "-m", "kernels.bench", "--warm-shard", str(i), str(processes),
                               *shape_args], cwd=root) for i in range(processes)]
    return [proc.wait() for proc in procs]


def _warm_shard(shapes, i, processes, device="cuda"):
    kernels = [p for p in GPU_PATHS if PATHS[p][1]][i::processes]
    for N, K, D in shapes:
        z, c = _inputs(N, K, D, device)
        for path in kernels:
            PATHS[path][2](z, c, None)
    return kernels


def _cpu_in_subprocess(path, N, K, D):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "kernels.bench", "--worker", path, str(N), str(K), str(D)],
                          cwd=root, capture_output=True, text=True)
    if done.returncode:  # one line, not a CalledProcessError: the rows before it are in --json already
        how = (f"was killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0 else
               f"exited with {done.returncode}") + (" (out of memory?)" if done.returncode == -signal.SIGKILL else "")
        last = (done.stderr.strip().splitlines() or [""])[-1]
        print(f"error: {path} at N={N} K={K} D={D} {how}{': ' + last if last else ''}", file=sys.stderr)
        raise SystemExit(2)
    result = json.loads(done.stdout.splitlines()[-1])
    return result["ms"], result["peak"]


def _write_volume(task):
    """Pool task: one phantom volume, as raw-intensity image and label slices (.nii.gz)."""
    import nibabel as nib
    import numpy as np

    root, split, case, week, start, k, size, seed = task
    x, lab = vq._draw_phantoms(range(start, start + k), size, seed, labels=True, levels=np.arange(k) / max(1, k - 1))
    scale, offset = 800 + 150 * (case % 7), 10 * (case % 3)  # raw intensities differ per volume, like MR
    for z in range(k):
        name = f"{case:03d}_week_{week}_slice_{z}.nii.gz"
        nib.save(nib.Nifti1Image(x[z] * scale + offset, np.eye(4)), root / f"keras_slices_{split}" / f"case_{name}")
        nib.save(nib.Nifti1Image(lab[z], np.eye(4)), root / f"keras_slices_seg_{split}" / f"seg_{name}")


def write_phantom_tree(root, n_train=240, n_val=60, n_test=60, size=(256, 128), seed=0, slices_per_volume=60,
                       workers=None):
    """Write phantom slices as a HipMRI-style tree (keras_slices_*, keras_slices_seg_*) of .nii.gz, on
    `workers` processes (default all cores); returns root. Slice z of a volume of k is drawn at level
    z / (k - 1), so names and anatomy agree on the position. The HipMRI size: 11460, 660, 540. For the loading
    bench, gpu_check and the tests: a data tree to read, not part of the models."""
    import concurrent.futures

    root, start, case, tasks = Path(root), 0, 4, []  # case ids run on across splits, as in the real data
    for split, n in zip(vq.SPLITS, (n_train, n_val, n_test)):
        for kind in ("", "seg_"):
            (root / f"keras_slices_{kind}{split}").mkdir(parents=True, exist_ok=True)
        volumes = range(0, n, slices_per_volume)
        for v, first in enumerate(volumes):  # two weeks (volumes) per case
            tasks.append((root, split, case + v // 2, v % 2, start + first, min(slices_per_volume, n - first), size, seed))
        start, case = start + n, case + -(-len(volumes) // 2)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(tasks), workers or vq._cpu_count()))) as pool:
        list(pool.map(_write_volume, tasks))  # zlib and numpy release the GIL
    return root


def bench_load(n, size):
    """Write n phantom slices, then time the usual nibabel loop, load_slices cold and warm."""
    import tempfile
    from pathlib import Path

    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = write_phantom_tree(tmp, n, 0, 0, size) / "keras_slices_train", Path(tmp) / "cache"
        t = time.perf_counter()
        np.stack([nib.load(f).get_fdata() for f in sorted(folder.glob("*.nii.gz"))])  # what people write
        times = {"naive": time.perf_counter() - t}
        for name in ("cold", "warm"):
            t = time.perf_counter()
            vq.load_slices(folder, size=size, cache_dir=cache)
            times[name] = time.perf_counter() - t
    print(f"{n} slices of {size[0]}x{size[1]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"naive nib.load().get_fdata() loop  {times['naive']:7.2f} s")
    print(f"load_slices, cold (empty cache)   {times['cold']:7.2f} s   {times['naive'] / times['cold']:.2f}x the loop's speed")
    print(f"load_slices, warm (cached)        {times['warm']:7.2f} s")
    return times


def bench_steps(reps=10, batch=32, size=(128, 64)):
    """Milliseconds of one training step (forward, backward, Adam) of the phantom defaults' VQ-VAE and
    (tied) prior, in float32 and in bf16 autocast (the prior also with torch's dropout in place of vq.byte_dropout),
    and of the SSIM loss term alone, its blur as matmuls (vq) and as the one-channel convolutions it replaced."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    h, w = size[0] // 4, size[1] // 4
    vqvae = vq.VQVAE(vq.VQVAEConfig(channels=64, n_codes=128, rate=0.25)).train()
    prior = vq.PixelCNN(vq.PriorConfig(n_codes=128, height=h, width=w, prior_channels=32, prior_layers=12,
                                       code_dim=vqvae.config.code_dim)).tie(vqvae.quantizer.codebook).train()
    x, codes = torch.rand(batch, 1, *size), torch.randint(128, (batch, h, w))

    def conv_blur(t, sigma=1.5, valid=True):  # the former path: one-channel convolutions, 'valid' outputs only
        r = int(3.5 * sigma + 0.5)  # vq._blur's window
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1.0) / sigma) ** 2)
        g = g / g.sum()
        out = F.conv2d(F.conv2d(t.flatten(0, 1)[:, None], g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))
        return out.view(*t.shape[:2], *out.shape[-2:])

    def ssim_loss(blur):
        y = x.clone().requires_grad_(True)
        saved, vq._blur = vq._blur, blur
        try:
            (1 - vq._ssim_terms(x, y)[0].mean()).backward()
        finally:
            vq._blur = saved

    def step(model, loss, bf16=False, dropout=None):  # bf16: the forward in bf16 autocast, as train.py uses
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def run():
            saved, vq.byte_dropout = vq.byte_dropout, dropout or vq.byte_dropout
            try:
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    value = loss()
                value.backward()
                opt.step()
            finally:
                vq.byte_dropout = saved
        return run

    vqvae_loss, prior_loss = lambda: vqvae(x)[1], lambda: vq.code_nats(prior(codes), codes)
    rows = {"vqvae step": step(vqvae, vqvae_loss), "vqvae step, bf16": step(vqvae, vqvae_loss, True),
            "prior step": step(prior, prior_loss), "prior step, bf16": step(prior, prior_loss, True),
            "prior step, bf16, torch dropout": step(prior, prior_loss, True, F.dropout),
            "ssim loss, matmul blur": lambda: ssim_loss(vq._blur),
            "ssim loss, conv blur": lambda: ssim_loss(conv_blur)}
    print(f"batch {batch} of {size[0]}x{size[1]} (codes {h}x{w}), {torch.get_num_threads()} threads; median of {reps}")
    times = {}
    for name, fn in rows.items():
        fn()  # warm-up
        times[name] = _median_ms(fn, reps, sync=lambda: None)
        print(f"{name:<32} {times[name]:8.1f} ms")
    return times


def _shape(text):
    try:
        N, K, D = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is NxKxD, e.g. 65536x512x64; got {text!r}")
    if N < 0 or K < 1 or D < 1:
        raise argparse.ArgumentTypeError(f"a shape needs N >= 0 rows, K >= 1 codes and D >= 1; got {text!r}")
    return N, K, D


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as train.py and sample.py
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None):
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="also run the shapes that are slow on a CPU")
    parser.add_argument("--shapes", type=_shape, nargs="+", metavar="NxKxD", help="default: " +
                        " ".join("x".join(map(str, s)) for s in SHAPES))
    parser.add_argument("--json", metavar="PATH", help="write every figure to this file too")
    parser.add_argument("--registers", action="store_true", help="compile each variant for sm_90 and report "
                        "its registers and spills (needs no GPU), then exit")
    parser.add_argument("--warm", type=int, default=0, metavar="P", help="on a GPU, first compile every kernel in "
                        "P processes side by side (compiling is CPU-bound); the timed run then loads them from "
                        "Triton's cache")
    parser.add_argument("--load", type=int, metavar="N", help="time loading N phantom .nii.gz slices, then exit")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"),
                        help="slice size for --load (default 256 128)")
    parser.add_argument("--steps", action="store_true", help="time training steps of the phantom defaults' "
                        "models and the SSIM loss's two blurs, then exit")
    parser.add_argument("--batch", type=int, default=32, help="batch size for --steps (default 32)")
    parser.add_argument("--worker", nargs=4, metavar=("PATH", "N", "K", "D"), help=argparse.SUPPRESS)
    parser.add_argument("--warm-shard", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, value, least in (("--load", args.load, 1), ("--size", min(args.size), 2), ("--batch", args.batch, 1)):
        if value is not None and value < least:  # a 1-pixel slice would squeeze to a number
            parser.error(f"{flag} must be at least {least}, got {value}")
    if args.json and (Path(args.json).is_dir() or not Path(args.json).parent.is_dir()):
        parser.error(f"--json {args.json}: {'a folder' if Path(args.json).is_dir() else 'its folder does not exist'}")
    report = {"torch": torch.__version__, "argv": sys.argv[1:] if argv is None else list(argv)}
    try:  # written now too, so a file that cannot be written is refused before any timing
        _write_json(args.json, report)
    except OSError as e:
        parser.error(f"--json {args.json}: {e.strerror or e}")
    if args.load is not None or args.steps:
        times = bench_load(args.load, tuple(args.size)) if args.load is not None else bench_steps(batch=args.batch)
        _write_json(args.json, {**report, "load" if args.load is not None else "steps": times})
        return times
    if args.worker:
        path, *nkd = args.worker
        ms, peak = _measure_cpu(path, *map(int, nkd), reps=5)
        print(json.dumps({"ms": ms, "peak": peak}))
        return None
    if args.warm_shard:
        return _warm_shard(args.shapes or SHAPES, *args.warm_shard)
    if HAVE_TRITON:
        import triton

        report["triton"] = triton.__version__
    if args.registers:
        report["registers"] = registers(**({"shapes": args.shapes} if args.shapes else {}))
        _write_json(args.json, report)
        return report
    shapes = args.shapes or SHAPES
    if torch.cuda.is_available():
        bandwidth, source = _peak_bandwidth()
        report.update(device=source, bandwidth=bandwidth)
        print(f"device: {source}, peak bandwidth {bandwidth / 1e12:.2f} TB/s")
        paths = [p for p in GPU_PATHS if HAVE_TRITON or not p.startswith("triton")]
        if args.warm and HAVE_TRITON:
            t = time.time()
            report["warm"] = _warm(shapes, args.warm)
            print(f"compiled every kernel in {args.warm} processes in {time.time() - t:.1f} s: {report['warm']}")
        return gpu_table(shapes, "cuda", _gpu_timer, bandwidth, report, args.json, paths)

    report["device"] = f"cpu, {torch.get_num_threads()} threads"
    report["rows"] = []
    print(f"device: cpu, {torch.get_num_threads()} threads; each path runs in a fresh process")
    print(f"{'N':>7} {'K':>5} {'D':>4}  {'path':<14} {'ms':>9} {'peak extra MB':>14}")
    results = {}
    for N, K, D in shapes:
        if (N, K, D) in CPU_TOO_SLOW and not args.all:
            print(f"{N:>7} {K:>5} {D:>4}  skipped on CPU (too slow; --all runs it)")
            continue
        for path in CPU_PATHS:
            ms, peak = _cpu_in_subprocess(path, N, K, D)
            results[path, (N, K, D)] = ms, peak
            report["rows"].append({"N": N, "K": K, "D": D, "path": path, "ms": ms, "peak_bytes": peak})
            _write_json(args.json, report)
            print(f"{N:>7} {K:>5} {D:>4}  {path:<14} {ms:>9.2f} {peak / 2**20:>14.1f}", flush=True)
    if ("torch chunked", CHECK_SHAPE) in results:
        (t_ours, m_ours), (t_cdist, m_cdist) = results["torch chunked", CHECK_SHAPE], results["cdist+argmin", CHECK_SHAPE]
        ok = m_ours <= m_cdist / 4 and t_ours <= t_cdist
        report["check"] = {"shape": CHECK_SHAPE, "memory_ratio": m_ours / m_cdist, "time_ratio": t_ours / t_cdist,
                           "ok": ok}
        _write_json(args.json, report)
        print(f"chunked / cdist at {CHECK_SHAPE}: memory {m_ours / m_cdist:.2f} (needs <= 0.25), "
              f"time {t_ours / t_cdist:.2f} (needs <= 1): {'ok' if ok else 'FAIL'}")
    return report


if __name__ == "__main__":
    main()
