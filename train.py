"""Train the VQ-VAE (stage 1) and its PixelCNN prior (stage 2), evaluate, write pictures.

    python train.py                      # embedded phantom slices: both stages on a laptop CPU
    python train.py --data ROOT          # HipMRI / OASIS / any folder of slices, official split
    torchrun --standalone --nproc_per_node=N train.py --data ROOT     # several GPUs or processes

Writes to --out: vqvae.pt and prior.pt (resumable training state), model.pt (what sample.py
reads), metrics.jsonl, summary.json and PNG pictures.
"""

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import vq

# Without --data: defaults sized so both stages finish in minutes on a 2-core CPU (flags still win).
PHANTOM_DEFAULTS = dict(size=[128, 64], epochs=10, prior_epochs=12, channels=64, n_codes=128, prior_channels=32,
                        prior_layers=8)
REAL_DEFAULTS = dict(size=[256, 128], epochs=30, prior_epochs=30)


class UsageError(Exception):
    """A mistake the user can fix: reported as one line, exit code 2."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        fail(f"{message} (see --help)")


def _bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _config_flags(parser, config_cls, skip=()):
    for f in fields(config_cls):
        if f.name in skip:
            continue
        kind = {bool: _bool, tuple: int}.get(type(f.default), type(f.default))
        nargs = "+" if isinstance(f.default, tuple) else None
        parser.add_argument(f"--{f.name}", type=kind, nargs=nargs, default=f.default, help="config field")


def parse_args(argv=None):
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="root folder of slices; default: the embedded phantom data set")
    p.add_argument("--out", default="out", help="output folder (default out)")
    p.add_argument("--stage", choices=["vqvae", "prior", "all"], default="all")
    p.add_argument("--epochs", type=int, help="VQ-VAE epochs (default 30; phantom 10)")
    p.add_argument("--prior_epochs", type=int, help="prior epochs (default 30; phantom 12)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget per stage")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--prior_batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prior_lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="slice size (default 256 128; phantom 128 64)")
    p.add_argument("--n_train", type=int, default=2000, help="phantom slices for training")
    p.add_argument("--n_val", type=int, default=200, help="phantom slices for validation")
    p.add_argument("--n_test", type=int, default=300, help="phantom slices for testing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default cuda when present)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--bf16", type=_bool, default=True, help="bf16 autocast on CUDA (default true)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
    p.add_argument("--log_every", type=int, default=50, help="steps between log lines")
    p.add_argument("--bench_load", type=int, metavar="N", help="time loading N phantom .nii.gz slices, then exit")
    _config_flags(p, vq.VQVAEConfig)
    _config_flags(p, vq.PriorConfig, skip=("n_codes", "height", "width"))
    known, _ = p.parse_known_args(argv)
    p.set_defaults(**(REAL_DEFAULTS if known.data else PHANTOM_DEFAULTS))
    args = p.parse_args(argv)
    for name in ("batch_size", "prior_batch_size", "n_train", "n_val", "n_test", "log_every"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("epochs", "prior_epochs"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be 0 or more, got {getattr(args, name)}")
    for name in ("lr", "prior_lr", "minutes"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            fail(f"--{name} must be positive, got {getattr(args, name)}")
    return args


# ----------------------------------------------------------------------------- setup


class Run:
    """What both stages share: arguments, device, ranks, output folder, data."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available")
        if device == "cuda" and self.world > 1:
            device = f"cuda:{local}"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # set_device needs an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cpu":  # share the cores between the processes
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.main = self.rank == 0
        self.out = Path(args.out)
        self.t0 = time.time()

    def log(self, line):
        if self.main:
            print(line, flush=True)

    def write_metrics(self, record):
        if self.main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, obj, name):
        if self.main:
            vq.save_checkpoint(obj, self.out / name)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.args.bf16)


def load_data(run, files):
    """files: find_splits' lists, or None for the phantom set -> dict with train / validate / test
    tensors (N, 1, H, W), data settings and skipped files."""
    args = run.args
    if args.data is None:
        size = tuple(args.size)
        # one seed per split, so the splits share no slice
        splits = {k: vq.phantom_slices(n, size, seed=1000 * args.seed + i) for i, (k, n) in
                  enumerate([("train", args.n_train), ("validate", args.n_val), ("test", args.n_test)])}
        return dict(splits, settings={"source": "phantom", "size": list(size), "rot90": 1}, skipped=[])
    size = tuple(args.size)
    skipped, splits = [], {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", vq.SkippedFileWarning)
        for k in ("train", "validate", "test"):
            info = {}
            splits[k] = vq.load_slices(files[k], size, strict=args.strict, info=info)
            skipped += [{"file": str(p), "reason": r} for p, r in info.get("skipped", [])]
    for w in caught:
        if not issubclass(w.category, vq.SkippedFileWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if skipped:
        run.log(f"skipped {len(skipped)} unreadable file(s):")
        for s in skipped:
            run.log(f"  {s['file']}: {s['reason']}")
    pngs = any(str(f).endswith(".png") for f in files["train"])
    settings = {"source": str(Path(args.data).resolve()), "size": list(size), "rot90": 0 if pngs else 1}
    return dict(splits, settings=settings, skipped=skipped)


def _check_fresh(run, name):
    path = run.out / name
    if path.exists() and not run.args.resume and not run.args.overwrite:
        raise UsageError(f"{path} holds an earlier run: add --resume to continue it or --overwrite to replace it")


def _fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _lr_at(step, total, lr):
    warmup = min(100, max(1, total // 20))
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def _epoch_batches(run, n, batch_size, epoch):
    """This rank's batches of one epoch: a permutation fixed by (seed, epoch), so resuming replays it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(run.args.seed * 100003 + epoch))
    per_rank = n // run.world if run.world > 1 else n
    mine = perm[run.rank * per_rank:(run.rank + 1) * per_rank]
    return list(mine.split(batch_size))


class Trainer:
    """The loop both stages share: epochs, resumable mid-epoch, budget, log lines, best by validation."""

    def __init__(self, run, name, model, step_fn, n_train, batch_size, epochs, lr, validate, better,
                 generator=None):
        self.run, self.name, self.model, self.step_fn = run, name, model, step_fn
        self.generator = generator  # a model's own random stream, saved with the training state
        self.n_train, self.batch_size, self.epochs, self.lr = n_train, batch_size, epochs, lr
        self.validate, self.better = validate, better
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.steps_per_epoch = len(_epoch_batches(run, n_train, batch_size, 0))
        self.epoch = self.batch = self.step = 0
        self.best, self.best_state, self.seconds = None, None, 0.0
        self.ddp = model
        if run.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                broadcast_buffers=False)  # the quantizer all-reduces its own statistics
        if run.args.compile:
            self.ddp = torch.compile(self.ddp)

    def state(self):
        return {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": self.epoch,
            "batch": self.batch, "step": self.step, "best": self.best, "best_state": self.best_state,
            "seconds": self.seconds, "rng": torch.get_rng_state(),
            "generator": self.generator.get_state() if self.generator is not None else None,
        }

    def load_state(self, s):
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.epoch, self.batch, self.step = s["epoch"], s["batch"], s["step"]
        self.best, self.best_state, self.seconds = s["best"], s["best_state"], s["seconds"]
        torch.set_rng_state(s["rng"])
        if self.generator is not None:
            self.generator.set_state(s["generator"])

    @property
    def done(self):
        return self.epoch >= self.epochs

    def fit(self, save):
        """Train to self.epochs or the --minutes budget; save() writes the resumable state."""
        run, args = self.run, self.run.args
        total = self.epochs * self.steps_per_epoch
        start = fit_start = time.time()
        start_step = self.step
        budget = args.minutes * 60 if args.minutes else None
        while not self.done:
            self.model.train()
            batches = _epoch_batches(run, self.n_train, self.batch_size, self.epoch)
            meter, t_log, n_img = {}, time.time(), 0
            while self.batch < len(batches):
                idx = batches[self.batch]
                for g in self.opt.param_groups:
                    g["lr"] = _lr_at(self.step, total, self.lr)
                with run.autocast():
                    loss, parts = self.step_fn(self.ddp, idx)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(
                        f"{self.name}: the loss became {loss.item()} at step {self.step} (epoch {self.epoch + 1}); "
                        f"stopped, the last checkpoint in {run.out} is intact: try a lower learning rate")
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.batch, self.step, n_img = self.batch + 1, self.step + 1, n_img + len(idx) * run.world
                for k, v in dict(parts, loss=loss.detach()).items():
                    meter[k] = meter.get(k, 0.0) + float(v)
                meter["n"] = meter.get("n", 0) + 1
                if self.step % args.log_every == 0 or self.batch == len(batches):
                    rate = n_img / max(time.time() - t_log, 1e-9)
                    per_step = (time.time() - fit_start) / max(1, self.step - start_step)
                    eta = per_step * (total - self.step)
                    if budget:
                        eta = min(eta, budget - (time.time() - fit_start))
                    n = meter.pop("n")
                    shown = " | ".join(self._fmt(k, v / n) for k, v in meter.items())
                    run.log(f"{self.name} ep {self.epoch + 1}/{self.epochs} step {self.step} | {shown} | "
                            f"{rate:.0f} img/s | eta {_fmt_time(eta)}")
                    meter, t_log, n_img = {}, time.time(), 0
                if budget and time.time() - fit_start > budget:
                    break
            self.seconds += time.time() - start
            start = time.time()
            if self.batch == len(batches):
                self.epoch, self.batch = self.epoch + 1, 0
                record = self.validate(self.model)
                if self.best is None or self.better(record, self.best):
                    self.best, self.best_state = record, copy.deepcopy(self.model.state_dict())
                run.write_metrics(dict(stage=self.name, epoch=self.epoch, step=self.step,
                                       seconds=round(self.seconds, 1), **record))
                run.log(f"{self.name} ep {self.epoch}/{self.epochs} validation | " +
                        " | ".join(self._fmt(k, v) for k, v in record.items()))
                save()
            else:
                run.log(f"{self.name}: --minutes budget of {args.minutes} reached at step {self.step}")
                save()
                break
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    @staticmethod
    def _fmt(k, v):
        if k in ("perplexity", "used"):
            return f"{k} {v:.0f}"
        return f"{k} {v:.4f}" if abs(v) < 100 else f"{k} {v:.1f}"


# ----------------------------------------------------------------------------- stage 1


def _config(config_cls, args, **derived):
    """A model config from the flags of the same names; a bad value is a usage error."""
    values = {f.name: getattr(args, f.name) for f in fields(config_cls) if f.name not in derived}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return config_cls(**values, **derived)
    except ValueError as e:
        raise UsageError(str(e)) from None


@torch.no_grad()
def reconstruct(run, model, x, batch_size=64):
    """(N, 1, H, W) -> reconstructions (N, 1, H, W) in [0, 1], batched, on CPU."""
    model.eval()
    out = []
    for xb in x.split(batch_size):
        with run.autocast():
            out.append(model(xb.to(run.device))[0].float().clamp(0, 1).cpu())
    return torch.cat(out)


def _code_stats(codes, n_codes):
    counts = torch.bincount(codes.flatten(), minlength=n_codes).double()
    p = counts / counts.sum()
    entropy = max(0.0, -(p[p > 0] * p[p > 0].log2()).sum().item())  # no -0.0 when one code is used
    return {"usage": (counts > 0).double().mean().item(), "perplexity": 2 ** entropy, "bits": entropy}


@torch.no_grad()
def encode_all(run, model, x, batch_size=64):
    model.eval()
    return torch.cat([model.encode(xb.to(run.device)).cpu() for xb in x.split(batch_size)])


def train_vqvae(run, data):
    args = run.args
    cfg = _config(vq.VQVAEConfig, args)
    H, W = data["settings"]["size"]
    if H % cfg.downsample or W % cfg.downsample:
        raise UsageError(f"--size {H} {W} must be divisible by --downsample {cfg.downsample}")
    torch.manual_seed(args.seed)
    model = vq.VQVAE(cfg).to(run.device)
    model.quantizer.generator = torch.Generator().manual_seed(args.seed + 1)
    train_x, val_x = data["train"], data["validate"]
    val_show = val_x[:8]

    def step_fn(net, idx):
        _, loss, stats = net(train_x[idx].to(run.device, non_blocking=True))
        return loss, {"recon": stats["recon"], "perplexity": stats["perplexity"],
                      "used": stats["usage"] * cfg.n_codes}

    def validate(m):
        r = reconstruct(run, m, val_x)
        if run.main:
            vq.save_png(run.out / f"recon_ep{trainer.epoch:03d}.png",
                        vq.image_grid(torch.cat([val_show, r[:8]]), ncol=8, rot90=data["settings"]["rot90"]))
        return {"val_ssim": vq.ssim(val_x, r).mean().item(), "val_psnr": vq.psnr(val_x, r).mean().item()}

    trainer = Trainer(run, "vqvae", model, step_fn, len(train_x), args.batch_size, args.epochs, args.lr,
                      validate, better=lambda a, b: a["val_ssim"] > b["val_ssim"],
                      generator=model.quantizer.generator)
    if args.resume and (run.out / "vqvae.pt").exists():
        ckpt = vq.load_checkpoint(run.out / "vqvae.pt")
        if ckpt["vqvae_config"] != asdict(cfg):
            raise UsageError(f"{run.out / 'vqvae.pt'} was trained with other model flags: {ckpt['vqvae_config']}")
        trainer.load_state(ckpt["trainer"])
        run.log(f"vqvae: resumed at epoch {trainer.epoch} step {trainer.step}")

    def save():
        run.save({"vqvae_config": asdict(cfg), "data": data["settings"], "trainer": trainer.state()}, "vqvae.pt")

    trainer.fit(save)
    model.eval()
    # the final model file: best weights by validation, plain configs, nothing else
    run.save({"vqvae_config": asdict(cfg), "vqvae": model.state_dict(), "data": data["settings"]}, "model.pt")
    return model, trainer


def evaluate_vqvae(run, model, data, trainer):
    test_x = data["test"]
    r = reconstruct(run, model, test_x)
    s, p = vq.ssim(test_x, r), vq.psnr(test_x, r)
    stats = _code_stats(encode_all(run, model, test_x), model.config.n_codes)
    order = s.argsort()
    rot = data["settings"]["rot90"]
    if run.main:
        for old in run.out.glob("test_*_ssim*.png"):  # an earlier run's pictures would mislead
            old.unlink()
        for tag, picks in (("best", order.flip(0)[:4]), ("worst", order[:4])):
            for rank, i in enumerate(picks.tolist(), 1):
                vq.save_png(run.out / f"test_{tag}{rank}_ssim{s[i]:.4f}.png",
                            vq.image_grid(torch.cat([test_x[i:i + 1], r[i:i + 1]]), ncol=2, rot90=rot))
    return {
        "test_ssim_mean": s.mean().item(), "test_ssim_std": s.std().item() if len(s) > 1 else 0.0,
        "test_ssim_min": s.min().item(), "test_psnr_mean": p.mean().item(),
        "val_ssim_best": trainer.best["val_ssim"] if trainer.best else None,
        "codebook_usage": stats["usage"], "perplexity": stats["perplexity"],
        "seconds_vqvae": round(trainer.seconds, 1), "epochs_vqvae": trainer.epoch,
    }


# ----------------------------------------------------------------------------- stage 2


def train_prior(run, data, vqvae):
    args = run.args
    t0 = time.time()
    codes = {k: encode_all(run, vqvae, data[k]) for k in ("train", "validate", "test")}  # (N, h, w)
    h, w = codes["train"].shape[1:]
    cfg = _config(vq.PriorConfig, args, n_codes=vqvae.config.n_codes, height=h, width=w)
    torch.manual_seed(args.seed)
    prior = vq.PixelCNN(cfg).to(run.device)
    train_c, val_c = codes["train"], codes["validate"]
    run.log(f"prior: encoded {len(train_c)} train maps of {h}x{w} codes in {time.time() - t0:.1f}s")

    def step_fn(net, idx):
        c = train_c[idx].to(run.device)
        nats = F.cross_entropy(net(c).float(), c)
        return nats, {"bits": nats.detach() / math.log(2)}

    @torch.no_grad()
    def bits(m, c):
        m.eval()
        total = sum(m.loss(cb.to(run.device))[1].item() * len(cb) for cb in c.split(128))
        return total / len(c)

    def validate(m):
        return {"val_bits": bits(m, val_c)}

    trainer = Trainer(run, "prior", prior, step_fn, len(train_c), args.prior_batch_size, args.prior_epochs,
                      args.prior_lr, validate, better=lambda a, b: a["val_bits"] < b["val_bits"])
    if args.resume and (run.out / "prior.pt").exists():
        ckpt = vq.load_checkpoint(run.out / "prior.pt")
        trainer.load_state(ckpt["trainer"])
        run.log(f"prior: resumed at epoch {trainer.epoch} step {trainer.step}")

    def save():
        run.save({"prior_config": asdict(cfg), "trainer": trainer.state()}, "prior.pt")

    trainer.fit(save)
    prior.eval()
    if run.main:
        final = vq.load_checkpoint(run.out / "model.pt")
        final.update(prior_config=asdict(cfg), prior=prior.state_dict())
        run.save(final, "model.pt")
        g = torch.Generator(run.device).manual_seed(args.seed)
        samples = vqvae.decode(prior.generate(16, generator=g)).float().cpu()
        vq.save_png(run.out / "samples.png", vq.image_grid(samples, ncol=8, rot90=data["settings"]["rot90"]))
    return prior, {
        "prior_bits_per_code": bits(prior, codes["test"]),
        "unigram_bits_per_code": _code_stats(train_c, cfg.n_codes)["bits"],
        "prior_val_bits_best": trainer.best["val_bits"] if trainer.best else None,
        "seconds_prior": round(trainer.seconds, 1), "epochs_prior": trainer.epoch,
    }


# ----------------------------------------------------------------------------- loader benchmark


def _write_volume(task):
    """Pool task: one phantom volume as raw-intensity float32 .nii.gz slices."""
    import nibabel as nib
    import numpy as np

    folder, v, k, size = task
    x = vq.phantom_slices(k, size, seed=v)[:, 0].numpy() * (800 + 150 * (v % 7))  # (k, H, W), raw-ish
    for z in range(k):
        nib.save(nib.Nifti1Image(x[z], np.eye(4)), folder / f"case_{v:03d}_week_0_slice_{z}.nii.gz")


def bench_load(n, size):
    """Write n phantom slices, then time the usual nibabel loop, load_slices cold and warm."""
    import multiprocessing
    import tempfile

    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "slices", Path(tmp) / "cache"
        folder.mkdir()
        tasks = [(folder, v, min(60, n - i), size) for v, i in enumerate(range(0, n, 60))]
        with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
            pool.map(_write_volume, tasks)
        t = time.perf_counter()
        np.stack([nib.load(f).get_fdata() for f in sorted(folder.glob("*.nii.gz"))])  # what people write
        times = {"naive": time.perf_counter() - t}
        for name in ("cold", "warm"):
            t = time.perf_counter()
            vq.load_slices(folder, size=size, cache_dir=cache)
            times[name] = time.perf_counter() - t
    print(f"{n} slices of {size[0]}x{size[1]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"naive nib.load().get_fdata() loop  {times['naive']:7.2f} s")
    print(f"load_slices, cold (empty cache)   {times['cold']:7.2f} s   {times['naive'] / times['cold']:.2f}x faster")
    print(f"load_slices, warm (cached)        {times['warm']:7.2f} s")
    return times


# ----------------------------------------------------------------------------- main


def train(args):
    files = vq.find_splits(args.data) if args.data is not None else None  # a bad layout fails first, fast
    run = Run(args)
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
    stages = ["vqvae", "prior"] if args.stage == "all" else [args.stage]
    if args.resume and not any((run.out / f"{s}.pt").exists() for s in stages):
        raise UsageError(f"--resume: nothing to resume in {run.out} (no {' or '.join(s + '.pt' for s in stages)})")
    for s in stages:
        if not (args.resume and s == "prior" and "vqvae" in stages):
            _check_fresh(run, f"{s}.pt")
    if args.stage == "prior" and not (run.out / "model.pt").exists():
        raise UsageError(f"--stage prior needs a trained VQ-VAE: {run.out / 'model.pt'} does not exist")
    data = load_data(run, files)
    n = {k: len(data[k]) for k in ("train", "validate", "test")}
    run.log(f"data: {n['train']} train, {n['validate']} validate, {n['test']} test slices of "
            f"{tuple(data['train'].shape[-2:])} from {data['settings']['source']} | device {run.device}")
    summary_path = run.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if args.resume and summary_path.exists() else {}
    summary.update(n_train=n["train"], n_val=n["validate"], n_test=n["test"], skipped_files=data["skipped"],
                   device=str(run.device) + (f" x{run.world}" if run.world > 1 else ""),
                   data=data["settings"])
    if args.stage in ("vqvae", "all"):
        vqvae, trainer = train_vqvae(run, data)
        summary.update(evaluate_vqvae(run, vqvae, data, trainer))
        run.log(f"vqvae test | ssim {summary['test_ssim_mean']:.4f} +- {summary['test_ssim_std']:.4f} "
                f"(min {summary['test_ssim_min']:.4f}) | psnr {summary['test_psnr_mean']:.2f} | "
                f"codebook usage {summary['codebook_usage']:.2f} | perplexity {summary['perplexity']:.0f}")
    else:
        vqvae = vq.VQVAE.from_checkpoint(run.out / "model.pt").to(run.device)
        if list(data["train"].shape[-2:]) != list(vq.load_checkpoint(run.out / "model.pt")["data"]["size"]):
            raise UsageError("--size differs from the size the VQ-VAE in --out was trained at")
    if run.main:
        _write_json(summary_path, summary)
    prior = None
    if args.stage in ("prior", "all"):
        prior, stats = train_prior(run, data, vqvae)
        summary.update(stats)
        run.log(f"prior test | {summary['prior_bits_per_code']:.3f} bits per code "
                f"(unigram {summary['unigram_bits_per_code']:.3f}) | samples in {run.out / 'samples.png'}")
    summary["seconds_total"] = round(time.time() - run.t0, 1)
    if run.main:
        _write_json(summary_path, summary)
        run.log(f"wrote {run.out}/model.pt, metrics.jsonl, summary.json and pictures")
    return {"summary": summary, "vqvae": vqvae, "prior": prior}


def _write_json(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    """Parse flags and train; user errors print one line and exit with code 2."""
    args = parse_args(argv)
    if args.bench_load:
        return bench_load(args.bench_load, tuple(args.size))
    try:
        return train(args)
    except (UsageError, vq.DataError, vq.CheckpointError, FloatingPointError) as e:
        fail(str(e))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
