"""Everything a GPU has to measure, as one script that fits a short lease: at most 7 minutes.

    python -m kernels.gpu_check --out gpu_out            # on a GPU
    python -m kernels.gpu_check --out /tmp/gc --quick    # tiny sizes on the CPU: about a minute (tests, CI)

Steps, each in its own process under its own time limit, so one that fails or runs over is recorded
and the next one starts:

    tree           a HipMRI-sized phantom tree (kernels.bench.write_phantom_tree 11460 / 660 / 540 at 256 x 128),
                   written while the tests run: they check correctness only, so sharing the CPUs costs no figure
    tests          the GPU-only tests, compiled (no TRITON_INTERPRET), in one pytest run
    bench          python -m kernels.bench: every kernel variant beside torch's materialised search
    train_bf16     train.py --data TREE, the defaults (bf16), two epochs of each stage
    sampler        sample.py --bench --n 16 on that model's 64 x 32 code maps
    train_fp32     stage 1 again with --bf16 false: test SSIM at the same epochs
    train_compile  stage 2 again with --compile, on train_bf16's VQ-VAE: images a second against train_bf16's

OUT/gpu_check.json holds every figure and OUT/gpu_check.md the same for a person; both are rewritten
after every step, so a run cut short keeps what it measured. Step logs go to OUT/logs/. The tree and
the models go to --work (default: a temporary folder, removed at the end), never to OUT.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: where train.py and sample.py live

# Per-step limits in seconds: each step's time on an H100 (2026-12-05, kernels/NOTES.md) and a margin. The
# bench ran over its first limit of 80 s with two of its three shapes done; its new limit is a guess, not
# measured. The sequential steps' limits sum to 414 s (the tree runs beside the tests), under TOTAL_S.
LIMITS = {
    "tree": 60,  # 47.5 s: 12,660 slices on 8 processes; beside the tests, so it adds no time
    "tests": 125,  # 113 s: ~108 kernel compiles and the GPU tests of test_vq.py in one pytest run
    "bench": 95,  # over 80 s: compiles, autotunes and 54 timed rows (45 done at 80 s)
    "train_bf16": 85,  # 71 s: start-up, the caps 2 x 24 s (two epochs of each stage: 17 s), evaluation, samples
    "sampler": 15,  # 6.3 s: start-up and 16 cached samples of 64 x 32 codes (1.7 s; a 64-channel prior, now 128)
    "train_fp32": 34,  # 29 s: start-up, the cap 18 s (two float32 epochs: 22 s), evaluation
    "train_compile": 60,  # 54 s: start-up, encoding, the cap 30 s with the compile inside it, bits and samples
}
# --quick (the CPU): about 35 s pinned to one core (130 s with the realism report); its limits only
# catch a hang, with room for a busy or slow CI machine.
QUICK_LIMITS = {"tree": 120, "tests": 120, "bench": 120, "train_bf16": 300, "sampler": 120, "train_fp32": 120,
                "train_compile": 0}
TOTAL_S, QUICK_TOTAL_S = 415, 900
# What the GPU run's tests select: every kernel test, and the GPU tests of test_vq.py. This script's
# own tests are left out (one would run the quick check inside the check), and so are the offline sm_90
# compile test, which the compiled tests make redundant on a GPU, and bench.main's, which the bench step runs.
TEST_ARGS = ["kernels", "test_vq.py", "-k", "(gpu or cuda or kernel) and not gpu_check and not sm90 and not bench_main"]
QUICK_TEST_ARGS = ["kernels/test_kernels.py", "-k", "test_torch_path_chunks or test_bench_goals"]
TREE = dict(n_train=11460, n_val=660, n_test=540, size=(256, 128))  # HipMRI's split sizes
QUICK_TREE = dict(n_train=48, n_val=16, n_test=16, size=(64, 32))
# Epochs of each stage (a timed second epoch has no warm-up in it); bf16 and float32 are compared at
# equal epochs. --minutes caps each stage in case an epoch is slower than expected; the timing runs leave
# out stage 2's realism report (--realism false), whose SSIM searches on the host take minutes at this size.
EPOCHS, QUICK_EPOCHS = 2, 1
GOAL_TRAIN_S, GOAL_SAMPLE_S = 600, 1.0  # 30 + 30 HipMRI epochs in 10 minutes; 16 samples of 64 x 32 in 1 s


# ----------------------------------------------------------------------------- running steps


def _env(quick):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if quick:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the quick check is the CPU's, even on a GPU machine
    return env


def _run(cmd, limit, log, env, wait=True):
    """Start cmd (output to the file log, so a killed run keeps it); with wait, return its result."""
    f = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log, proc.file, proc.t0, proc.limit = log, f, time.time(), limit
    return _wait(proc) if wait else proc


def _wait(proc):
    """(status, seconds, exit code, output) of a process started by _run, killed at its limit."""
    try:
        rc = proc.wait(timeout=max(0.1, proc.limit - (time.time() - proc.t0)))
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its whole group: pools and compilers it started too
        rc, status = proc.wait(), "timed out"
    proc.file.close()
    return status, round(time.time() - proc.t0, 1), rc, Path(proc.log).read_text(errors="replace")


def _tail(text, n=15):
    return text.strip().splitlines()[-n:]


# ----------------------------------------------------------------------------- steps


def step_tests(ctx, limit):
    """One pytest run; the counts from the JUnit XML it writes at its end."""
    args = QUICK_TEST_ARGS if ctx.quick else TEST_ARGS
    xml = ctx.logs / "tests.xml"
    xml.unlink(missing_ok=True)  # a kept --out holds an earlier run's
    status, _, _, out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                              *args], limit, ctx.logs / "tests.log", ctx.env)
    result = {"status": status, "command": shlex.join(["python", "-m", "pytest", "-q", *args]), "output": _tail(out)}
    if xml.exists():
        result.update(junit_counts(xml))
    return result


def junit_counts(path):
    """collected, passed, failed, skipped, errors and the failed tests' names from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in suite.iter("testcase"):
        for kind, tag in (("FAILED", "failure"), ("ERROR", "error")):
            for e in case.findall(tag):
                message = ((e.get("message") or "").strip().splitlines() or [""])[0][:200]
                failures.append(f"{kind} {case.get('classname')}::{case.get('name')}: {message}")
    return {"collected": n["tests"], "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
            "failed": n["failures"], "skipped": n["skipped"], "errors": n["errors"], "failures": failures}


def step_bench(ctx, limit):
    path = ctx.out / "bench.json"
    path.unlink(missing_ok=True)  # a kept --out holds an earlier run's: never reported as this one's
    shapes = ["--shapes", "2048x256x16"] if ctx.quick else []
    cmd = [sys.executable, "-m", "kernels.bench", "--json", str(path), *shapes]
    if not ctx.quick:
        cmd += ["--warm", str(max(1, min(6, (os.cpu_count() or 2) // 2)))]
    status, seconds, _, out = _run(cmd, limit, ctx.logs / "bench.log", ctx.env)
    report = json.loads(path.read_text()) if path.exists() else {}
    return {"status": status, **{k: report.get(k) for k in ("device", "bandwidth", "rows", "goals", "check")},
            "output": _tail(out, 60)}


def start_tree(ctx, limit):
    spec = QUICK_TREE if ctx.quick else TREE
    return _run([sys.executable, "-m", "kernels.gpu_check", "--worker", "tree", str(ctx.work / "tree.json"),
                 str(ctx.tree), json.dumps(spec)], limit, ctx.logs / "tree.log", ctx.env, wait=False)


def step_tree(ctx, limit):
    """Waits for the tree that start_tree began before the tests."""
    spec = QUICK_TREE if ctx.quick else TREE
    status, seconds, _, out = _wait(ctx.tree_proc)
    result = {"status": status, "seconds_from_start": seconds, **spec, "output": _tail(out)}
    record = ctx.work / "tree.json"
    if record.exists():
        result.update(json.loads(record.read_text()))
        result["slices_per_second"] = sum(spec[k] for k in ("n_train", "n_val", "n_test")) / result["write_seconds"]
    return result


def _train(ctx, name, limit, flags, stages=("vqvae", "prior"), fresh=True):
    """train.py in its own process into WORK/name (emptied first unless fresh is False: the step filled it)."""
    out_dir = ctx.work / name
    record = ctx.work / f"{name}.json"
    record.unlink(missing_ok=True)  # a kept --work holds an earlier run's: never reported as this one's
    if fresh:
        shutil.rmtree(out_dir, ignore_errors=True)
    size = QUICK_TREE["size"] if ctx.quick else TREE["size"]
    argv = ["--data", str(ctx.tree), "--out", str(out_dir), "--size", *map(str, size), *flags]
    status, seconds, _, out = _run([sys.executable, "-m", "kernels.gpu_check", "--worker", "train", str(record),
                                    json.dumps(argv)], limit, ctx.logs / f"{name}.log", ctx.env)
    result = {"status": status, "argv": argv, **parse_train(out, out_dir, stages), "output": _tail(out, 25)}
    if record.exists():
        result.update(json.loads(record.read_text()))
    return result


def parse_train(log, out_dir, stages=("vqvae", "prior")):
    """Images a second from the log lines, epochs from metrics.jsonl, results from summary.json, for
    the stages this run trained (a --stage prior run's folder also holds the VQ-VAE's records)."""
    out_dir = Path(out_dir)
    rates = {}
    for stage, rate in re.findall(r"^(\w+) ep \d+/\d+ step \d+ \|.*\| (\d+) img/s", log, re.M):
        rates.setdefault(stage, []).append(int(rate))
    result = {"img_per_s": {}, "seconds_per_epoch": {}}
    for stage, values in rates.items():
        steady = values[1:] or values  # the first interval of a stage carries its warm-up (compiles)
        result["img_per_s"][stage] = {"median": statistics.median(steady), "max": max(values), "lines": values}
    metrics = out_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    for stage in stages:
        mine = [r for r in records if r["stage"] == stage]
        if mine:  # seconds is cumulative: the last epoch's increment is the steadiest figure
            last = mine[-1]["seconds"] - (mine[-2]["seconds"] if len(mine) > 1 else 0)
            result["seconds_per_epoch"][stage] = last
        result.setdefault("val", {})[stage] = [{k: v for k, v in r.items() if k in ("epoch", "seconds", "val_ssim",
                                                                                    "val_bits")} for r in mine]
    summary = out_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        keys = ["n_train", "seconds_total", "device"]
        keys += ["test_ssim_mean", "test_psnr_mean", "seconds_vqvae", "epochs_vqvae"] if "vqvae" in stages else []
        keys += ["prior_bits_per_code", "seconds_prior", "epochs_prior"] if "prior" in stages else []
        result.update({k: s.get(k) for k in keys})
    return result


def extrapolate(run, n_train, quick=False):
    """Seconds for 30 + 30 epochs from the measured epochs, and from the steady images a second; the
    goal applies to the full run only (--quick's tiny sizes say nothing about it)."""
    per_epoch = {}
    for stage in ("vqvae", "prior"):
        rate = run.get("img_per_s", {}).get(stage, {}).get("median")
        per_epoch[stage] = {"metrics": run.get("seconds_per_epoch", {}).get(stage),
                            "from_img_per_s": n_train / rate if rate else None}
    total = {}
    for kind in ("metrics", "from_img_per_s"):
        if all(per_epoch[s][kind] for s in per_epoch):
            total[kind] = 30 * per_epoch["vqvae"][kind] + 30 * per_epoch["prior"][kind]
    return {"seconds_per_epoch": per_epoch, "seconds_30_30": total,
            "meets_goal": {k: None if quick else v <= GOAL_TRAIN_S for k, v in total.items()}}


def _epochs(ctx):
    return str(QUICK_EPOCHS if ctx.quick else EPOCHS)


def step_train_bf16(ctx, limit):
    minutes = "0.1" if ctx.quick else "0.4"
    return _train(ctx, "train_bf16", limit, ["--epochs", _epochs(ctx), "--prior_epochs", _epochs(ctx),
                                             "--minutes", minutes, "--realism", "false"])


def step_train_fp32(ctx, limit):
    minutes = "0.1" if ctx.quick else "0.3"
    return _train(ctx, "train_fp32", limit, ["--stage", "vqvae", "--bf16", "false", "--epochs", _epochs(ctx),
                                             "--minutes", minutes])


def step_train_compile(ctx, limit):
    """Stage 2 compiled, on a copy of train_bf16's VQ-VAE, one epoch or --minutes: it measures speed
    (the log lines after the compile), not quality."""
    base = ctx.work / "train_bf16"
    if not (base / "model.pt").exists():
        return {"status": "not run", "reason": "train_bf16 left no model.pt"}
    out_dir = ctx.work / "train_compile"
    shutil.rmtree(out_dir, ignore_errors=True)  # a kept --work's prior.pt would refuse this run
    out_dir.mkdir()
    for name in ("model.pt", "vqvae.pt", "summary.json", "metrics.jsonl"):
        if (base / name).exists():
            shutil.copy(base / name, out_dir / name)
    return _train(ctx, "train_compile", limit, ["--stage", "prior", "--compile", "--prior_epochs", "1",
                                                "--minutes", "0.5", "--realism", "false"], ("prior",), False)


def step_sampler(ctx, limit):
    model = ctx.work / "train_bf16"
    if not (model / "model.pt").exists():
        return {"status": "not run", "reason": "train_bf16 left no model.pt"}
    n = "2" if ctx.quick else "16"
    status, seconds, _, out = _run([sys.executable, "sample.py", "--out", str(model), "--bench", "--n", n], limit,
                                   ctx.logs / "sampler.log", ctx.env)
    result = {"status": status, "n": int(n), "lines": _tail(out, 10)}
    for name, secs, maps, passes in re.findall(r"^(\w+)\s+sampler: ([\d.]+) s for \d+ maps of ([\dx +]+) codes = "
                                               r"([\d.]+) forward passes", out, re.M):
        result[name] = {"seconds": float(secs), "maps": maps, "forward_passes": float(passes)}
    if "cached" in result and not ctx.quick:
        result["meets_goal"] = result["cached"]["seconds"] <= GOAL_SAMPLE_S
    return result


# In this order; the tree was started before the tests and its step only waits for it.
STEPS = [("tests", step_tests), ("tree", step_tree), ("bench", step_bench), ("train_bf16", step_train_bf16),
         ("sampler", step_sampler), ("train_fp32", step_train_fp32), ("train_compile", step_train_compile)]


def compare(steps, quick):
    """What the three training runs say side by side."""
    bf16, fp32, comp = (steps.get(k, {}) for k in ("train_bf16", "train_fp32", "train_compile"))
    n_train = (QUICK_TREE if quick else TREE)["n_train"]
    rate = lambda run, stage: run.get("img_per_s", {}).get(stage, {}).get("median")  # noqa: E731
    result = {"extrapolated": extrapolate(bf16, n_train, quick)}
    if bf16.get("test_ssim_mean") is not None and fp32.get("test_ssim_mean") is not None:
        result["bf16_vs_fp32"] = {
            "test_ssim_bf16": bf16["test_ssim_mean"], "test_ssim_fp32": fp32["test_ssim_mean"],
            "difference": bf16["test_ssim_mean"] - fp32["test_ssim_mean"],
            "epochs": [bf16.get("epochs_vqvae"), fp32.get("epochs_vqvae")],
            "same_epochs": bf16.get("epochs_vqvae") == fp32.get("epochs_vqvae"),
            "vqvae_img_per_s": [rate(bf16, "vqvae"), rate(fp32, "vqvae")]}
    if rate(bf16, "prior") and rate(comp, "prior"):
        result["compile_vs_eager"] = {"prior_img_per_s_eager": rate(bf16, "prior"),
                                      "prior_img_per_s_compiled": rate(comp, "prior"),
                                      "speedup": rate(comp, "prior") / rate(bf16, "prior")}
    return result


# ----------------------------------------------------------------------------- report


def _device(quick=False):
    import torch

    # --quick hides the GPU from its steps (_env): the report says where they ran
    info = {"torch": torch.__version__, "cpus": os.cpu_count(), "cuda": torch.cuda.is_available() and not quick}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory=p.total_memory, capability=f"{p.major}.{p.minor}")
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                               capture_output=True, text=True)
            info["nvidia_smi"] = q.stdout.strip()
    return info


def _fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report):
    """gpu_check.md: the figures for a person, every one from gpu_check.json."""
    d, steps = report["device"], report["steps"]
    lines = [f"# gpu_check{' --quick' if report['quick'] else ''}: {d.get('gpu', 'no GPU (CPU)')}", "",
             f"torch {d.get('torch')}, triton {d.get('triton', '-')}, {d.get('cpus')} CPUs"
             + (f", nvidia-smi: {d['nvidia_smi']}" if d.get("nvidia_smi") else "")
             + f"; started {report['started']}, {report.get('seconds', '-')} s in all", "",
             "| step | status | seconds (limit) |", "|---|---|---|"]
    lines += [f"| {k} | {s['status']} | {_fmt(s.get('seconds'))} ({s.get('limit_s')}) |" for k, s in steps.items()]
    t = steps.get("tests")
    if t and "passed" in t:
        lines += ["", f"## tests\n\n`{t['command']}`: {t['passed']} passed, {t['failed']} failed, "
                  f"{t['skipped']} skipped, {t['errors']} errors ({t['collected']} collected)"]
        lines += [f"- {f}" for f in t["failures"]]
    b = steps.get("bench")
    if b and b.get("rows"):
        lines += ["", "## bench", "", f"{b.get('device')}", ""]
        if any("graph_us" in r for r in b["rows"]):
            lines += ["| N | K | D | inputs | path | graph us | call us | x floor | codes differ (beyond near-tie) | "
                      "rechecked |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in b["rows"]:
                lines.append(f"| {r['N']} | {r['K']} | {r['D']} | {r['inputs']} | {r['path']} | "
                             f"{_fmt(r.get('graph_us'))} | {_fmt(r.get('call_us'))} | {_fmt(r.get('x_floor'))} | "
                             f"{r.get('codes_differ', '-')} ({r.get('beyond_near_tie', '-')}) | "
                             f"{_fmt(r.get('rechecked_fraction'), 3)} |"
                             + (f" {r['fell_back'] or r.get('error')}" if r.get("fell_back") or r.get("error") else ""))
            lines += ["", "| shape | inputs | precision | best | us | goal us | met | x faster than torch | met |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for v in b.get("goals") or []:
                lines.append(f"| ({v['N']}, {v['K']}, {v['D']}) | {v['inputs']} | {v['precision']} | {v['best_path']} | "
                             f"{_fmt(v['best_us'])} | {_fmt(v['goal_us'], 0)} | {_fmt(v['meets_time'])} | "
                             f"{_fmt(v['speedup'], 2)} | {_fmt(v['meets_speedup'])} |")
        else:
            lines += ["| N | K | D | path | ms | peak extra MB |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['N']} | {r['K']} | {r['D']} | {r['path']} | {r['ms']:.2f} | {r['peak_bytes'] / 2**20:.1f} |"
                      for r in b["rows"]]
    tree = steps.get("tree")
    if tree and "write_seconds" in tree:
        lines += ["", f"## tree\n\n{tree['n_train']} / {tree['n_val']} / {tree['n_test']} slices at "
                  f"{tree['size'][0]} x {tree['size'][1]} in {tree['write_seconds']:.1f} s on {tree['workers']} "
                  f"processes ({tree['files']} files)"]
    lines += ["", "## training", "", "| run | status | vqvae img/s | prior img/s | s/epoch vqvae | s/epoch prior | "
              "test SSIM | bits/code | peak GPU MB |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("train_bf16", "train_fp32", "train_compile"):
        r = steps.get(name)
        if not r:
            continue
        rate = lambda stage: _fmt(r.get("img_per_s", {}).get(stage, {}).get("median"))  # noqa: E731
        spe = r.get("seconds_per_epoch", {})
        peak = r.get("max_memory_allocated")
        lines.append(f"| {name} | {r['status']} | {rate('vqvae')} | {rate('prior')} | {_fmt(spe.get('vqvae'))} | "
                     f"{_fmt(spe.get('prior'))} | {_fmt(r.get('test_ssim_mean'), 4)} | "
                     f"{_fmt(r.get('prior_bits_per_code'), 3)} | {_fmt(peak / 2**20 if peak else None, 0)} |")
    c = report.get("compare", {})
    e = c.get("extrapolated", {})
    verdict = {True: "met", False: "NOT MET", None: "no goal at --quick sizes"}
    for kind, total in e.get("seconds_30_30", {}).items():
        lines.append(f"\n30 + 30 epochs, extrapolated ({kind}): {total:.0f} s "
                     f"(goal <= {GOAL_TRAIN_S} s: {verdict[e['meets_goal'][kind]]})")
    if "bf16_vs_fp32" in c:
        x = c["bf16_vs_fp32"]
        lines.append(f"\nbf16 against float32, test SSIM after {x['epochs']} VQ-VAE epochs: {x['test_ssim_bf16']:.4f} "
                     f"vs {x['test_ssim_fp32']:.4f} (difference {x['difference']:+.4f})")
    if "compile_vs_eager" in c:
        x = c["compile_vs_eager"]
        lines.append(f"\n--compile, prior: {x['prior_img_per_s_compiled']:.0f} img/s against "
                     f"{x['prior_img_per_s_eager']:.0f} eager ({x['speedup']:.2f}x)")
    s = steps.get("sampler")
    if s and s.get("lines"):
        lines += ["", "## sampler", "", "```", *s["lines"], "```"]
        if "meets_goal" in s:
            lines.append(f"16 samples in {s['cached']['seconds']:.2f} s (goal <= {GOAL_SAMPLE_S:.0f} s: "
                         f"{'met' if s['meets_goal'] else 'NOT MET'})")
    for k, st in steps.items():
        if st["status"] not in ("ok", "skipped") and st.get("output"):
            lines += ["", f"## {k}: {st['status']}, last lines", "", "```", *st["output"][-12:], "```"]
    return "\n".join(lines) + "\n"


def _save(report, out):
    for name, text in (("gpu_check.json", json.dumps(report, indent=1)), ("gpu_check.md", markdown(report))):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


# ----------------------------------------------------------------------------- workers


def _worker(kind, record, *args):
    """Runs in a step's own process: the tree writer, or train.main in-process (for the GPU's peak memory)."""
    import torch

    t0 = time.time()
    if kind == "tree":
        from kernels.bench import write_phantom_tree

        root, spec = args[0], json.loads(args[1])
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = max(1, cpus // 2)  # the tests compile kernels on the other half
        write_phantom_tree(root, spec["n_train"], spec["n_val"], spec["n_test"], size=tuple(spec["size"]), seed=0,
                           workers=workers)
        result = {"write_seconds": time.time() - t0, "workers": workers,
                  "files": sum(1 for p in Path(root).rglob("*.nii.gz"))}
    else:
        import train

        train.main(json.loads(args[0]))
        cuda = torch.cuda.is_available()
        result = {"worker_seconds": time.time() - t0,
                  "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
                  "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None}
    Path(record).write_text(json.dumps(result))


class _Context:
    def __init__(self, out, work, quick):
        self.out, self.work, self.quick = out, work, quick
        self.logs, self.tree, self.env, self.tree_proc = out / "logs", work / "tree", _env(quick), None
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env["VQ_CACHE_DIR"] = str(work / "cache")  # the first run decodes the tree, the others read it


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="where gpu_check.json, gpu_check.md and logs/ go (required)")
    p.add_argument("--quick", action="store_true", help="tiny sizes on the CPU, about a minute: for tests and CI")
    p.add_argument("--work", help="where the tree and the models go (default: a temporary folder, then removed)")
    p.add_argument("--only", nargs="+", choices=[name for name, _ in STEPS], help="run these steps only")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(*args.worker)
    if not args.out:
        p.error("--out is required")
    needs_tree = set(args.only or ()) & {"train_bf16", "sampler", "train_fp32", "train_compile"}
    if needs_tree and "tree" not in args.only and not (args.work and (Path(args.work) / "tree").is_dir()):
        p.error(f"--only {' '.join(sorted(needs_tree))} trains on the phantom tree: add tree, or --work a folder "
                "that holds one")
    import torch

    gpu_steps = not args.only or set(args.only) - {"tree"}  # the tree alone may be written ahead, on any machine
    if gpu_steps and not args.quick and not torch.cuda.is_available():  # full sizes on a CPU: minutes of failures
        p.error("no CUDA GPU found: the full check measures a GPU (--quick: tiny sizes on the CPU)")
    t0 = time.time()
    out = Path(args.out).resolve()  # the steps run from the repository root: a relative path would move
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    for flag, folder in (("--out", out), ("--work", work)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file of that name, /proc
            p.error(f"{flag} {folder}: {'a file, not a folder' if folder.is_file() else e.strerror}")
    ctx = _Context(out, work, args.quick)
    limits, total = (QUICK_LIMITS, QUICK_TOTAL_S) if args.quick else (LIMITS, TOTAL_S)
    report = {"quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": _device(args.quick),
              "limits_s": limits, "total_limit_s": total, "steps": {}}
    try:
        if not args.only or "tree" in args.only:
            ctx.tree_proc = start_tree(ctx, limits["tree"])
        for name, step in STEPS:
            if args.only and name not in args.only:
                continue
            limit = min(limits[name], total - (time.time() - t0))  # the whole run stays within its total
            t = time.time()
            if limits[name] == 0:
                result = {"status": "skipped", "reason": "torch.compile takes about 90 s on a CPU (measured on a "
                          "2-core machine, both stages): too slow for the quick check"}
            elif limit < 3:
                result = {"status": "not run", "reason": "out of time"}
            else:
                try:
                    result = step(ctx, limit)
                except Exception as e:  # this script's own failure in one step does not lose the others
                    result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            report["steps"][name] = {**result, "seconds": round(time.time() - t, 1), "limit_s": round(limit, 1)}
            report["compare"] = compare(report["steps"], args.quick)
            report["seconds"] = round(time.time() - t0, 1)
            _save(report, out)
            print(f"gpu_check: {name} {result['status']} in {time.time() - t:.1f} s", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {time.time() - t0:.0f} s")
    return report


if __name__ == "__main__":
    main()
