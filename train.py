"""Train the VQ-VAE (stage 1) and its PixelCNN prior (stage 2), evaluate, write pictures.

    python train.py                      # embedded phantom slices: both stages on a laptop CPU
    python train.py --data ROOT          # HipMRI / OASIS / any folder of slices, official split
    torchrun --standalone --nproc_per_node=N train.py --data ROOT     # several GPUs or processes

Writes to --out: vqvae.pt and prior.pt (resumable training state), model.pt (what sample.py
reads), metrics.jsonl, summary.json (the figures of the model in model.pt) and PNG pictures.
"""

import argparse
import contextlib
import copy
import errno
import hashlib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import vq
from sample import (Parser, UsageError, check_seed_and_device, fail, fewest_layers, image_grid, lesion_report,
                    lock_folder, out_of_memory, read_summary, realism_report, save_png, warnings_as_lines)

# Without --data: defaults sized so both stages finish in minutes on a 2-core CPU (flags still win).
# lr, prior_lr: the best measured at the same budget (README). The phantom's VQ-VAE, 1875 steps, at 5e-3
# (1e-3 to 3e-3 lose); DEV's, 270 steps of 100 slices, at 1e-3 (3e-3 loses). The prior was far from
# converged at 1e-3: 6e-3 on the phantom (1e-2 no better), 3e-3 on real anatomy (6e-3 no better).
# prior_channels: on real anatomy 128 (DEV: inner structure where 64 drew mottled middles, README; 2.5x the
# prior's time); the phantom keeps 32 for a 2-core CPU's minutes (64 loses there at equal time, wins at twice it)
# rate 0.25: codes the prior predicts better (README: DEV samples whole hemispheres, the phantom's SSIM kept); the
# library's VQVAEConfig keeps rate 0, so checkpoints without the field load as plain VQ
# largest_batch: the batch size without --batch_size, less for small folders; 16 on the phantom, where a step
# costs half of one at 32 on a CPU and steps count (README)
PHANTOM_DEFAULTS = dict(size=[128, 64], largest_batch=16, epochs=15, prior_epochs=14, channels=64, n_codes=128,
                        prior_channels=32, prior_layers=12, lr=5e-3, prior_lr=6e-3, rate=0.25)
# None: set by the folder's size once it is loaded (_fill_defaults)
REAL_DEFAULTS = dict(size=None, largest_batch=32, epochs=None, prior_epochs=None, lr=1e-3, prior_lr=3e-3,
                     rate=0.25, prior_shifts=None, prior_dropout=None, prior_channels=128)
# A small folder takes few steps an epoch (DEV's 100 slices: 9). Where these --data flags are not given, a stage
# that REAL_EPOCHS would give fewer than MIN_STEPS steps trains MIN_STEPS, and its prior, which would then learn
# its few maps by heart (best at a quarter of the steps), trains on 4 shifted maps of each slice with dropout 0.3
# (README: DEV)
REAL_EPOCHS, MIN_STEPS = 30, 1000
# --data without --size: the training slices' own shape, scaled to fit this on its longer side (_native_size)
LONGEST = 256
PRIOR_BY_SIZE = dict(prior_shifts=(4, 1), prior_dropout=(0.3, vq.PriorConfig.prior_dropout))  # small folder, other
SYNC_EVERY = 16  # under DDP, steps between the shared "is the --minutes budget spent?" votes
# curves.png during training at most this often (and always at the end): a drawing takes 0.5 s, and on an
# H200 a phantom epoch takes 1 to 3 s (README)
CURVES_EVERY_S = 30


def _bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _config_flags(parser, config_cls, skip=(), defaults=None):
    """A flag per field of config_cls; defaults: help text of a default that is not the field's."""
    for f in fields(config_cls):
        if f.name in skip:
            continue
        kind = {bool: _bool, tuple: int}.get(type(f.default), type(f.default))
        nargs = "+" if isinstance(f.default, tuple) else None
        parser.add_argument(f"--{f.name}", type=kind, nargs=nargs, default=f.default,
                            help=f"{config_cls.__name__}.{f.name} "
                                 f"(default {(defaults or {}).get(f.name, '%(default)s')})")


def _recorded_data(model_path):
    """--stage prior: the data flags model.pt's VQ-VAE was trained with, as defaults (a flag given still wins, and
    other slices are then refused); none without a readable model.pt."""
    try:
        record = vq.load_checkpoint(model_path)["data"]
    except (vq.CheckpointError, KeyError, TypeError):  # none, or not readable: said when the stage starts
        return {}
    return {"size": record["size"], **(dict(zip(vq.PHANTOM_RECORD, record["phantom"])) if record.get("phantom")
                                       else {"data": record["source"]})}


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=os.path.expanduser,  # ~ in --data=~/x, quoted, or in a script
                   help="root folder of slices; default: the embedded phantom data set")
    p.add_argument("--out", type=os.path.expanduser, default="out", help="output folder (default out)")
    p.add_argument("--stage", choices=["vqvae", "prior", "all"], default="all",
                   help="prior: of the VQ-VAE in OUT/model.pt, on its slices (--data, --size: as it was trained)")
    p.add_argument("--epochs", type=int, help=f"VQ-VAE epochs (default {REAL_EPOCHS}, or {MIN_STEPS} steps' worth on a "
                   "small folder; phantom 15)")
    p.add_argument("--prior_epochs", type=int, help=f"prior epochs (default {REAL_EPOCHS}, or {MIN_STEPS} steps' worth "
                   "on a small folder, whatever --epochs is; phantom 14)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget per stage")
    p.add_argument("--batch_size", type=int,
                   help="default 32 (phantom 16), less for small folders: at least 8 steps an epoch")
    p.add_argument("--prior_batch_size", type=int, help="default as --batch_size")
    p.add_argument("--lr", type=float, help="the VQ-VAE's peak learning rate: default 1e-3; phantom 5e-3")
    p.add_argument("--prior_lr", type=float, help="default 3e-3; phantom 6e-3")
    p.add_argument("--prior_shifts", type=int, default=1, help="code maps per training slice for the prior: itself and "
                   "copies moved by up to 2 px, one drawn per epoch (default 1; 4, and --prior_dropout 0.3, on a "
                   "small folder)")
    p.add_argument("--prior_ema", type=float, default=0.0, help="decay of an average of the prior's weights (0: none)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="slice size (default: the training slices' "
                   f"most common shape, fit within {LONGEST} (HipMRI 256 128, OASIS 256 256); phantom 128 64)")
    p.add_argument("--n_train", type=int, default=2000, help="phantom slices for training")
    p.add_argument("--n_val", type=int, default=200, help="phantom slices for validation")
    p.add_argument("--n_test", type=int, default=300, help="phantom slices for testing")
    p.add_argument("--seed", type=int, default=0, help="weights, slice order and, on the phantom, its slices")
    p.add_argument("--prior_seed", type=int, help="the prior's weights, slice order and dropout (default --seed): "
                   "another prior of the same VQ-VAE and data")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default cuda when present)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    p.add_argument("--compile", action="store_true", help="torch.compile the models (CUDA only)")
    p.add_argument("--bf16", type=_bool, default=True, help="bf16 autocast on CUDA, and on CPUs with bf16 "
                   "instructions (default true)")
    p.add_argument("--realism", type=_bool, default=True,
                   help="the realism report after stage 2 (default true); false for timing runs: at HipMRI size "
                        "its SSIM searches take minutes on the host; sample.py --evaluate runs it later")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
    p.add_argument("--log_every", type=int, default=50, help="steps between log lines")
    _config_flags(p, vq.VQVAEConfig, skip=("in_channels",), defaults={"rate": "0.25; 0 with --levels 2"})  # one channel
    p.set_defaults(in_channels=1)
    _config_flags(p, vq.PriorConfig, skip=("n_codes", "height", "width", "positional", "cond_codes", "code_dim"),
                  defaults={"prior_dropout": f"{vq.PriorConfig.prior_dropout}; 0.3 on a small folder",
                            "prior_layers": "%(default)s; more where the code map is too wide for them to reach"})
    p.add_argument("--prior_tied", type=_bool, default=True, help="tie the prior's code embedding and logits to "
                   "the codebook (default true; README: fewer bits, nearer wrong draws)")
    known, _ = p.parse_known_args([a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-h", "--help")])
    recorded = _recorded_data(Path(known.out) / "model.pt") if known.stage == "prior" else {}
    data = known.data or recorded.get("data")
    p.set_defaults(**{**(REAL_DEFAULTS if data else PHANTOM_DEFAULTS), **recorded})
    p.epilog = ("Defaults shown: a folder's." if data else
                "Defaults shown: the phantom's; a folder's differ: python train.py --data DIR --help")
    args = p.parse_args(argv)
    args.data_from_model = known.data is None and "data" in recorded
    model_flags, counts = [f.name for f in fields(vq.VQVAEConfig)], ("n_train", "n_val", "n_test")
    p.set_defaults(**dict.fromkeys(model_flags + list(counts) + ["prior_layers"]))  # None: not given
    given = vars(p.parse_args(argv))
    args.model_flags_given = [k for k in model_flags if given[k] is not None]  # --stage prior: as model.pt's or refused
    args.prior_layers_given = given["prior_layers"] is not None  # else raised where the map needs more (_prior_config)
    if args.levels == 2 and given["rate"] is None:  # the rate model is of one level's codes
        args.rate = 0.0
    for k in counts if data else ():
        if given[k] is not None:  # a quick try on a subset would silently train on the whole folder
            fail(f"--{k} counts the phantom's slices; with --data every slice of the folder is used: drop --{k}")
    for names, ok, rule in ((("batch_size", "prior_batch_size", "n_train", "n_val", "n_test", "log_every",
                              "prior_shifts"),
                             lambda v: v >= 1, "at least 1"),
                            (("epochs", "prior_epochs"), lambda v: v >= 0, "0 or more"),
                            (("lr", "prior_lr", "minutes"), lambda v: v > 0, "positive")):  # NaN is not positive
        for name in names:
            if getattr(args, name) is not None and not ok(getattr(args, name)):
                fail(f"--{name} must be {rule}, got {getattr(args, name)}")
    if args.prior_seed is not None and not 0 <= args.prior_seed < 2**63:
        fail(f"--prior_seed must be between 0 and 2**63 - 1, got {args.prior_seed}")
    if not 0 <= args.prior_ema < 1:
        fail(f"--prior_ema must be in [0, 1) (0: no average), got {args.prior_ema}")
    if not args.out:  # an empty variable: the run would fill the current folder
        fail("--out must name a folder, got ''")
    if args.resume and args.overwrite:
        fail("--resume continues OUT's run and --overwrite replaces it: give one")
    if args.size is not None and min(args.size) < 16:
        fail(f"--size must be at least 16 x 16 (SSIM's window is 11), got {args.size[0]} {args.size[1]}")
    check_seed_and_device(args)
    return args


# ----------------------------------------------------------------------------- setup


def _cpu_has_bf16():
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX): there bf16 autocast makes a training step
    about 26% cheaper (python -m kernels.bench --steps); elsewhere it is emulated and slower."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


class Run:
    """What both stages share: arguments, device, ranks, output folder, data."""

    def __init__(self, args):
        self.args = args
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # checked by parse_args
        if ":" in device and self.world > 1:
            raise UsageError(f"--device {device} would put all {self.world} processes on one GPU: pass --device cuda "
                             "(each process takes the GPU of its LOCAL_RANK)")
        if device == "cuda" and self.world > 1:
            device = f"cuda:{local}"
        self.device = torch.device(device)
        if args.compile and self.device.type != "cuda":  # torch 2.13's CPU inductor segfaults on the prior
            raise UsageError("--compile is for CUDA devices: on a CPU torch.compile crashed the prior's training")
        if self.device.type == "cuda" and self.device.index is None:  # set_device needs an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            if self.device.type == "cpu":  # share the cores between the processes
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # Training matmuls and convolutions may use TF32; metrics and the reference code search
            # run in float64 or with their own settings, so reported figures do not move.
            vq.set_tf32(True)
        self.bf16 = args.bf16 and (self.device.type == "cuda" or _cpu_has_bf16())  # training steps in bf16 autocast
        self.main = self.rank == 0
        self.signalled = None  # the name of a SIGINT / SIGTERM that came: save at the next step, then stop
        self.at_once = None  # set by _stops_at_once: a signal stops the run at once, with the line it gives
        self.curves_drawn = 0.0  # when curves.png was last drawn during training
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
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def most(self, code):
        """The largest of every rank's code, on every rank: one decision, so no rank leaves the others waiting."""
        if self.world == 1:
            return code
        t = torch.tensor([code], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def rng_states(self):
        """Every rank's random state, gathered (a collective: all ranks call it together)."""
        mine = {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        every = [mine] + [None] * (self.world - 1)
        if self.world > 1:
            dist.all_gather_object(every, mine)
        return every

    def set_rng_state(self, states):
        torch.set_rng_state(states[self.rank]["cpu"])
        if self.device.type == "cuda" and states[self.rank]["cuda"] is not None:
            torch.cuda.set_rng_state(states[self.rank]["cuda"], self.device)

    def seed(self, seed, salt=0):
        """Seed for what should differ between ranks (dropout, restarts): seed, rank and salt."""
        torch.manual_seed((seed * 1_000_003 + self.rank * 7919 + salt) % 2**63)  # any --seed


def _data_settings(args):
    return {"source": args.data, "size": args.size,
            "phantom": None if args.data else [getattr(args, k) for k in vq.PHANTOM_RECORD]}


def load_data(run, files=None):
    """The splits of --data, or the phantom set (files: find_splits' lists, if already found), logged.
    Under DDP rank 0 decodes the slices and fills the cache; the other ranks then read it."""
    args, settings = run.args, _data_settings(run.args)
    if files:  # the first read decodes them all (HipMRI's 12,660: 16 to 40 s on 2 cores), later ones read the cache
        run.log(f"reading {sum(map(len, files.values()))} slice files (decoded once, then cached)")
    if run.world > 1 and not run.main:
        dist.barrier()
    with warnings_as_lines(run.log, ignore=(vq.SkippedFileWarning,)):  # such as NaN zeroed; skipped files below
        data = vq.load_splits(settings, strict=args.strict, files=files)
    if run.world > 1 and run.main:
        dist.barrier()
    if data["skipped"]:
        run.log(f"skipped {len(data['skipped'])} unreadable file(s):\n"
                + "\n".join(f"  {s['file']}: {s['reason']}" for s in data["skipped"]))
    if data["positions"]["train"] is None:
        run.log("slice names carry no slice number (such as slice_Z): the prior is not conditioned on positions")
    run.log(f"data: {len(data['train'])} train, {len(data['validate'])} validate, {len(data['test'])} test slices "
            f"of {tuple(data['train'].shape[-2:])} from {data['settings']['source']} | device {run.device}"
            + (" (bf16 autocast)" if run.bf16 else ""))
    return data


def _fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _lr_at(step, total, lr):
    """Linear warm-up, cosine down to 0.1 lr at step `total`, then flat (extra epochs of a resumed run)."""
    warmup = min(100, max(1, total // 20))
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def _epoch_order(run, n, epoch, seed):
    """This rank's slice order for one epoch: a permutation fixed by (seed, epoch), so resuming replays it."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 100003 + epoch) % 2**63))
    per_rank = n // run.world
    return perm[run.rank * per_rank:(run.rank + 1) * per_rank]


def _fingerprint(model):
    """A short hash of a model's weights: ties a prior and a summary to the VQ-VAE they describe."""
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim too
    return h.hexdigest()[:16]


def _afresh(name):
    """How to start a stage afresh: a new prior keeps the trained VQ-VAE (a plain --overwrite would retrain it)."""
    return "train a new prior of this VQ-VAE with --stage prior --overwrite" if name == "prior" else \
        "start afresh with --overwrite"


def _resume_state(run, name, settings, config_key, config):
    """The checkpoint to resume a stage from, or None when this run starts it afresh; refused when it was
    written with other flags, for other data or size, or by another number of processes."""
    path = run.out / f"{name}.pt"
    if not (run.args.resume and path.exists()):
        return None
    ckpt = vq.load_checkpoint(path)
    if not isinstance(ckpt.get("trainer"), dict) or config_key not in ckpt:  # model.pt copied over it, say
        raise UsageError(f"{path} is not a {name} training state (no trainer): {_afresh(name)}")
    old = ckpt[config_key]
    # a field added since the checkpoint holds its (off) default there; one dropped is left out
    norm = lambda c: asdict(vq._config_of(vq.VQVAEConfig if name == "vqvae" else vq.PriorConfig, c))
    two = "top" in old and "top" in config  # two levels: the same flags in both priors
    try:
        old = {k: norm(v) for k, v in old.items()} if two else norm(old) if "top" not in old else old
    except (TypeError, ValueError) as e:  # a setting this version no longer takes
        raise UsageError(f"{path} was written by another version of vq.py ({e}): {_afresh(name)}") from None
    if old != config:
        pairs = [(old[k], config[k]) for k in ("top", "bottom")] if two else [(old, config)]
        tied = lambda o, c, k: name == "prior" and k == "code_dim" and bool(o.get(k)) != bool(c.get(k))  # noqa: E731
        what = ", ".join(sorted({f"--prior_tied {bool(o.get(k))} (now {bool(c.get(k))})" if tied(o, c, k) else
                                 f"--{k} {o.get(k)} (now {c.get(k)})" for o, c in pairs for k in set(o) | set(c)
                                 if o.get(k) != c.get(k)}))
        raise UsageError(f"{path} was trained with other {'prior' if name == 'prior' else 'model'} flags: {what}; "
                         f"pass the same, or {_afresh(name)}")
    saved, world = ckpt.get("data", {}), ckpt["trainer"].get("world", 1)
    for key, flag in (("source", "--data"), ("size", "--size")):
        if saved.get(key) != settings[key]:
            raise UsageError(f"{path} was trained with {flag} {saved.get(key)}, not {settings[key]}: "
                             f"resume with the same {flag}, or {_afresh(name)}")
    if saved.get("files", settings.get("files")) != settings.get("files"):  # a checkpoint from before: no digest
        raise UsageError(f"{path} was trained on other files in {settings['source']} (added, removed or rewritten "
                         f"since), so its splits would differ: resume with the files it began with, or {_afresh(name)}")
    if world != run.world:
        raise UsageError(f"{path} was written by {world} process(es), this run has {run.world}: "
                         "resume with the same number of processes")
    return ckpt


class Interrupted(Exception):
    """Training stopped by SIGINT / SIGTERM, after saving."""


def _stopped_in_reports(run):
    return (f"stopped by {run.signalled} during the reports: {run.out / 'model.pt'} holds both models; "
            f"python sample.py --evaluate --out {run.out} writes the reports")


def _stopped_reading(run):
    return f"stopped by {run.signalled} while reading the slices: nothing was trained or saved"


def _stopped_encoding(run):
    go_on = ("run the same command again" if run.args.resume or run.args.stage == "prior" else  # it trained no prior
             "add --resume to go on")
    return (f"stopped by {run.signalled} while the prior's slices were encoded: {run.out / 'model.pt'} holds the "
            f"VQ-VAE; {go_on}")


@contextlib.contextmanager
def _stops_at_once(run, line):
    """A signal in the block stops the run at once, with line(run), as does one that came before it: where the
    loop has nothing to save (the slices being read or encoded, or the reports once model.pt is complete)."""
    if run.signalled:
        raise Interrupted(line(run))
    run.at_once = line
    try:
        yield
    finally:
        run.at_once = None


@contextlib.contextmanager
def _save_on_signals(run):
    """SIGINT and SIGTERM (a cluster's preemption) ask the loop to save and stop at the next step;
    a second one stops at once, as usual."""
    def handler(signum, frame):
        run.signalled = signal.Signals(signum).name
        for s, h in saved.items():
            signal.signal(s, h)
        if run.at_once:
            raise Interrupted(run.at_once(run))

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in saved:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _batch_size(run, n_train, given):
    """given, or the largest batch; a small folder gets smaller batches, at least 8 steps an epoch."""
    return given or min(run.args.largest_batch, max(1, n_train // run.world // 8))


def _fill_defaults(run, n_train):
    """--data's defaults that depend on the folder's size (None until it is loaded): see MIN_STEPS."""
    args, said = run.args, []
    steps = {name: max(1, math.ceil(n_train // run.world / _batch_size(run, n_train, batch))) for name, batch in
             (("epochs", args.batch_size), ("prior_epochs", args.prior_batch_size or args.batch_size))}
    small = REAL_EPOCHS * steps["prior_epochs"] < MIN_STEPS
    fill = {name: max(REAL_EPOCHS, math.ceil(MIN_STEPS / k)) for name, k in steps.items()}
    fill.update({name: values[0] if small else values[1] for name, values in PRIOR_BY_SIZE.items()})
    for name, value in fill.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
            trained = args.stage != ("prior" if name == "epochs" else "vqvae")  # named only if this run trains it
            said += [f"--{name} {value}"] if trained and (value > REAL_EPOCHS if "epochs" in name else small) else []
    if said:
        run.log(f"a small folder ({n_train} training slices, {steps['epochs']} steps an epoch): {', '.join(said)}")


class Trainer:
    """The loop both stages share: epochs, resumable mid-epoch, budget, log lines, best by validation."""

    def __init__(self, run, name, model, step_fn, n_train, batch_size, epochs, lr, validate, better,
                 seed, generator=None, ema=0.0, flags=None):
        self.run, self.name, self.model, self.step_fn, self.seed = run, name, model, step_fn, seed
        self.flags = flags or {}  # {flag: value} a resume must be given again: it would not continue exactly
        self.partial = None  # ({name: sum}, steps) of the epoch a mid-epoch stop cut, for its metrics line
        # an exponential moving average of the weights (decay ema; 0: none): validated, kept and saved as best
        self.weights = [p.detach() for p in model.parameters()]  # views: writing them writes the model
        self.ema = ema and [w.clone() for w in self.weights]
        self.decay = ema
        self.generator = generator  # a model's own random stream, saved with the training state
        batch_size = _batch_size(run, n_train, batch_size)
        self.n_train, self.batch_size, self.epochs, self.lr = n_train, batch_size, epochs, lr
        self.validate, self.better = validate, better
        if n_train < run.world:
            raise UsageError(f"{name}: {n_train} training slice(s) cannot be shared by {run.world} processes: "
                             "use fewer processes or more data")
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=run.device.type == "cuda")
        self.steps_per_epoch = math.ceil(n_train // run.world / batch_size)
        run.log(f"{name}: batches of {batch_size}{f' per process x {run.world}' if run.world > 1 else ''}, "
                f"{self.steps_per_epoch} steps an epoch")
        # The schedule's length is fixed when training starts: resuming with more --epochs must not
        # jump the learning rate back up; the extra epochs run at the schedule's final rate.
        self.schedule_steps = epochs * self.steps_per_epoch
        self.epoch = self.batch = self.step = 0
        self.best, self.best_state, self.seconds, self.history = None, None, 0.0, []
        self.ddp = model
        if run.world > 1:
            ddp = torch.nn.parallel.DistributedDataParallel
            # the quantizer all-reduces its own statistics (the flag was renamed in torch 2.13)
            no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters else \
                "broadcast_buffers"
            self.ddp = ddp(model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
                           **{no_sync: False})
        if run.args.compile:
            self.ddp = torch.compile(self.ddp)

    def state(self):
        """The resumable state; a collective under DDP (every rank's random state is gathered)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": self.epoch,
            "batch": self.batch, "step": self.step, "best": self.best, "best_state": self.best_state,
            "seconds": self.seconds, "rng": self.run.rng_states(), "world": self.run.world,
            "schedule_steps": self.schedule_steps, "history": self.history, "batch_size": self.batch_size,
            "generator": self.generator.get_state() if self.generator is not None else None,
            "ema": self.ema or None, "seed": self.seed, "flags": self.flags,
            "partial": self.partial and ({k: v.item() for k, v in self.partial[0].items()}, self.partial[1]),
        }

    def resume(self, ckpt):
        """Continue from a checkpoint of _resume_state (None: start afresh)."""
        if ckpt is None:
            return
        s = ckpt["trainer"]
        if s["batch_size"] != self.batch_size:  # the position in the epoch would index other batches
            raise UsageError(f"{self.name} was trained with batch size {s['batch_size']}, not {self.batch_size}: "
                             "resume with the same batch size")
        if s.get("seed", self.seed) != self.seed:  # its slice order and random streams come from the seed
            flag = "--prior_seed" if self.name == "prior" else "--seed"
            raise UsageError(f"{self.name} was trained with {flag} {s['seed']}, not {self.seed}: "
                             f"resume with the same {flag}, or {_afresh(self.name)}")
        for flag, was in s.get("flags", {}).items():  # a checkpoint from before flags were kept: none
            if self.flags.get(flag) != was:
                raise UsageError(f"{self.name} was trained with {flag} {was}, not {self.flags.get(flag)}: resume "
                                 f"with the same, or {_afresh(self.name)}")
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["optimizer"])
        self.epoch, self.batch, self.step = s["epoch"], s["batch"], s["step"]
        self.best, self.best_state, self.seconds = s["best"], s["best_state"], s["seconds"]
        self.schedule_steps, self.history = s["schedule_steps"], s["history"]
        if self.ema:
            torch._foreach_copy_(self.ema, s.get("ema") or self.weights)
        self.run.set_rng_state(s["rng"])
        if self.generator is not None:
            self.generator.set_state(s["generator"])
        if s.get("partial"):
            self.partial = ({k: torch.tensor(v, device=self.run.device) for k, v in s["partial"][0].items()},
                            s["partial"][1])
        _trim_metrics(self.run, lambda r: r["stage"] != self.name or r["epoch"] <= self.epoch)  # a crash's leftovers
        done = self.epoch >= self.epochs  # then nothing trains: the stage is evaluated and written again
        self.run.log(f"{self.name}: resumed at epoch {self.epoch} step {self.step}" + ", its epochs done" * done)
        if not done and self.epochs * self.steps_per_epoch > self.schedule_steps:
            self.run.log(f"{self.name}: training on to epoch {self.epochs}; the epochs past the original schedule "
                         f"run at its final learning rate")

    def _stop(self, elapsed, steps_done):
        """Why to stop before this step: None, "budget" (--minutes spent) or "signal" (SIGINT / SIGTERM,
        here or on any rank). Each rank has its own clock and signals: under DDP they agree every
        SYNC_EVERY steps, in one all-reduce, and all stop together, a signal outranking the budget."""
        budget = self.run.args.minutes
        # every call makes progress, however small the budget
        code = 2 if self.run.signalled else int(bool(budget and steps_done and elapsed > budget * 60))
        if self.run.world > 1:
            code = self.run.most(code) if steps_done % SYNC_EVERY == 0 else 0
        return (None, "budget", "signal")[code]

    def _check_finite(self, bad_step):
        if self.run.world > 1:  # every rank stops at the first bad step of any: none is left waiting
            bad_step = bad_step.clone()
            dist.all_reduce(bad_step.masked_fill_(bad_step < 0, 2**62), op=dist.ReduceOp.MIN)
            bad_step.masked_fill_(bad_step == 2**62, -1)
        s = int(bad_step)  # one host sync, at log lines and before anything is saved
        if s >= 0:
            raise FloatingPointError(
                f"{self.name}: the loss became non-finite at step {s} (epoch {self.epoch + 1}); stopped, the last "
                f"checkpoint in {self.run.out} is intact: try a lower learning rate")

    def fit(self, checkpoint):
        """Train to self.epochs or the --minutes budget; after each epoch (and when stopped) NAME.pt gets
        the checkpoint dict with the resumable state under "trainer"."""
        run, args = self.run, self.run.args
        start = fit_start = time.time()
        start_step = self.step
        bad_step = torch.tensor(-1, device=run.device)  # the first step whose loss was not finite, on the device
        stopped = None
        while self.epoch < self.epochs and not stopped:
            self.model.train()
            batches = _epoch_order(run, self.n_train, self.epoch, self.seed).to(run.device).split(self.batch_size)
            sums, steps = self.partial or ({}, 0)  # on the device: no syncs; resumed mid-epoch, its sums so far
            logged, t_log, n_img, self.partial = (0.0, 0), time.time(), 0, None
            while self.batch < len(batches):
                stopped = self._stop(time.time() - fit_start, self.step - start_step)
                if stopped:
                    break
                idx = batches[self.batch]
                for g in self.opt.param_groups:
                    g["lr"] = _lr_at(self.step, self.schedule_steps, self.lr)
                with run.autocast():
                    loss, parts = self.step_fn(self.ddp, idx)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                if self.ema:  # the average starts short and lengthens to 1 / (1 - decay) steps
                    d = min(self.decay, (1 + self.step) / (10 + self.step))
                    torch._foreach_lerp_(self.ema, self.weights, 1 - d)
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), self.step, bad_step)
                for k, v in dict(parts, loss=loss).items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                self.batch, self.step, steps = self.batch + 1, self.step + 1, steps + 1
                n_img += len(idx) * run.world
                if self.step % args.log_every == 0 or self.batch == len(batches):
                    self._check_finite(bad_step)
                    now = torch.stack(list(sums.values()))
                    values = ((now - logged[0]) / (steps - logged[1])).tolist()  # one sync per line
                    per_step = (time.time() - fit_start) / max(1, self.step - start_step)
                    eta = per_step * (self.epochs * len(batches) - self.step)
                    if args.minutes:
                        eta = min(eta, args.minutes * 60 - (time.time() - fit_start))
                    run.log(f"{self.name} ep {self.epoch + 1}/{self.epochs} step {self.step} | "
                            + " | ".join(self._fmt(k, v) for k, v in zip(sums, values))
                            + f" | {n_img / max(time.time() - t_log, 1e-9):.0f} img/s | eta {_fmt_time(eta)}")
                    logged, t_log, n_img = (now, steps), time.time(), 0
            self._check_finite(bad_step)
            self.seconds += time.time() - start
            start = time.time()
            if self.batch == len(batches):
                self.epoch, self.batch = self.epoch + 1, 0
                with self._averaged():
                    record = self.validate(self.model)
                    if self.best is None or self.better(record, self.best):
                        self.best, self.best_state = record, copy.deepcopy(self.model.state_dict())
                means = torch.stack(list(sums.values())).div(max(1, steps)).tolist() if sums else []
                record = dict({f"train_{k}": v for k, v in zip(sums, means)},
                              lr=_lr_at(self.step - 1, self.schedule_steps, self.lr), **record)
                run.write_metrics(dict(stage=self.name, epoch=self.epoch, step=self.step,
                                       seconds=round(self.seconds, 1), **record))
                if run.main and time.time() - run.curves_drawn >= CURVES_EVERY_S:
                    draw_curves(_read_json_lines(run.out / "metrics.jsonl"), run.out / "curves.png")
                    run.curves_drawn = time.time()
                run.log(f"{self.name} ep {self.epoch}/{self.epochs} validation | " +
                        " | ".join(self._fmt(k, v) for k, v in record.items() if k == "train_loss" or k[:4] == "val_"))
            self.partial = (sums, steps) if self.batch else None
            run.save({**checkpoint, "trainer": self.state()}, f"{self.name}.pt")  # an epoch ended, or a stop
            if stopped == "signal":
                raise Interrupted(f"{self.name}: stopped by {run.signalled or 'a signal to another process'} at "
                                  f"step {self.step}; saved {run.out / (self.name + '.pt')}: add --resume to "
                                  "continue from there")
            if stopped:
                run.log(f"{self.name}: --minutes budget of {args.minutes} reached at step {self.step}")
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    @contextlib.contextmanager
    def _averaged(self):
        """The model holds the averaged weights inside (none: its own), its own again after."""
        if not self.ema:
            yield
            return
        own = [w.clone() for w in self.weights]
        torch._foreach_copy_(self.weights, self.ema)
        try:
            yield
        finally:
            torch._foreach_copy_(self.weights, own)

    @staticmethod
    def _fmt(k, v):
        if k.startswith(("perplexity", "used")):
            return f"{k} {v:.0f}"
        return f"{k} {v:.4f}" if abs(v) < 100 else f"{k} {v:.1f}"


# ----------------------------------------------------------------------------- pictures


def draw_curves(records, path):
    """curves.png from metrics.jsonl records, drawn with matplotlib when it is installed; returns whether it was."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    stages = {s: [r for r in records if r["stage"] == s] for s in ("vqvae", "prior")}
    panels = [("VQ-VAE: validation SSIM", "vqvae", [("val_ssim", "whole slice"), ("val_ssim_body", "body")], "SSIM"),
              ("VQ-VAE: training loss", "vqvae", [("train_loss", "loss"), ("train_recon", "MSE")], "loss (log)"),
              ("Prior: bits per code", "prior", [("val_bits", "validation"), ("train_bits", "training")], "bits")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, stage, series, ylabel) in zip(axes, panels):
        for key, label in series:
            pts = [(r["epoch"], r[key]) for r in stages[stage] if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel, yscale="log" if "log" in ylabel else "linear")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    vq._atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def _pairs(x, r, rot90):
    """Inputs over their reconstructions, as one picture."""
    return image_grid(torch.cat([x, r]), ncol=len(x), rot90=rot90)


# ----------------------------------------------------------------------------- stage 1


def _config(config_cls, args, **derived):
    """A model config from the flags of the same names; a bad value is a usage error."""
    values = {f.name: getattr(args, f.name) for f in fields(config_cls) if f.name not in derived}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        config = config_cls(**values, **derived)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if config_cls is vq.PriorConfig and not args.prior_layers_given:  # the default: as deep as a wide map needs
        config = replace(config, prior_layers=fewest_layers(config))
    if config_cls is vq.PriorConfig and (reason := config.blind_spot()):
        raise UsageError(reason)
    return config


def _code_stats(codes, n_codes):
    """Usage and perplexity of code maps; with two levels, per level ("_top" for the top map)."""
    stats = {}
    for suffix, c in zip(("_top", "") if isinstance(codes, tuple) else ("",), vq.as_levels(codes)):
        p = torch.bincount(c.flatten(), minlength=n_codes).double()
        p = p[p > 0] / p.sum()
        entropy = max(0.0, -(p * p.log2()).sum().item())  # no -0.0 when one code is used
        stats.update({f"usage{suffix}": len(p) / n_codes, f"perplexity{suffix}": 2 ** entropy})
    return stats


def _unigram_bits(train, test, n_codes):
    """The prior's baseline: the test codes' mean bits under the training codes' frequencies (add-one, so a code
    unseen in training costs finite bits), each level under its own."""
    bits = 0.0
    for a, b in zip(vq.as_levels(train), vq.as_levels(test)):
        p = torch.bincount(a.flatten(), minlength=n_codes).double() + 1
        bits -= (p / p.sum()).log2()[b.flatten()].sum().item()
    return bits / sum(b.numel() for b in vq.as_levels(test))


def train_vqvae(run, data):
    args = run.args
    cfg = _config(vq.VQVAEConfig, args)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = vq.VQVAE(cfg).to(run.device)
    model.quantizer.generator = torch.Generator().manual_seed(args.seed + 1)
    if cfg.levels == 2:  # one random stream for both codebooks' restarts, saved with the training state
        model.quantizer_top.generator = model.quantizer.generator
    run.seed(args.seed)
    # training data on the GPU as float16 (HipMRI: 0.75 GB), so no step waits for a host copy
    train_x = data["train"].to(run.device, torch.float16) if run.device.type == "cuda" else data["train"]
    val_x = data["validate"]
    rot = data["settings"]["rot90"]

    def step_fn(net, idx):
        _, loss, stats = net(train_x[idx].float())
        used = {f"used{s}": stats[f"usage{s}"] * cfg.n_codes for s in ("", "_top") if f"usage{s}" in stats}
        return loss, {"recon": stats["recon"], "perplexity": stats["perplexity"], **used,
                      **({"rate_bits": stats["rate_bits"]} if "rate_bits" in stats else {})}

    def validate(m):
        m.eval()
        r = m.reconstruct(val_x)
        trainer.history.append(r[0, 0].half())  # one slice over the epochs, for progress.png
        codes = _code_stats(m.encode(val_x), cfg.n_codes)
        if run.main:
            save_png(run.out / "recon.png", _pairs(val_x[:8], r[:8], rot))
            shown = [trainer.history[round(i)].float() for i in np.linspace(0, len(trainer.history) - 1,
                                                                              min(10, len(trainer.history)))]
            save_png(run.out / "progress.png", image_grid(torch.stack([val_x[0, 0], *shown])[:, None], ncol=11,
                                                          rot90=rot))
        return {"val_ssim": vq.ssim(val_x, r).mean().item(),
                "val_ssim_body": vq.ssim(val_x, r, foreground=0.1).nanmean().item(),
                "val_psnr": vq.psnr(val_x, r).mean().item(),
                **{f"val_{k}": v for k, v in codes.items()}}

    trainer = Trainer(run, "vqvae", model, step_fn, len(train_x), args.batch_size, args.epochs, args.lr,
                      validate, better=lambda a, b: a["val_ssim"] > b["val_ssim"],
                      seed=args.seed, generator=model.quantizer.generator, flags={"--lr": args.lr})
    trainer.resume(_resume_state(run, "vqvae", data["settings"], "vqvae_config", asdict(cfg)))
    trainer.fit({"vqvae_config": asdict(cfg), "data": data["settings"]})
    return model.eval(), trainer


def evaluate_vqvae(run, model, data, trainer=None):
    test_x = data["test"]
    r = model.eval().reconstruct(test_x)
    s, p = vq.ssim(test_x, r), vq.psnr(test_x, r)
    body = vq.ssim(test_x, r, foreground=0.1)
    stats = _code_stats(model.encode(test_x), model.config.n_codes)
    order = s.argsort()
    rot = data["settings"]["rot90"]
    best, worst = order.flip(0)[:4], order[:4]
    if run.main:
        save_png(run.out / "test_best.png", _pairs(test_x[best], r[best], rot))
        save_png(run.out / "test_worst.png", _pairs(test_x[worst], r[worst], rot))
    return {
        "vqvae_fingerprint": _fingerprint(model),
        "test_ssim_mean": s.mean().item(), "test_ssim_std": s.std().item() if len(s) > 1 else 0.0,
        "test_ssim_min": s.min().item(), "test_ssim_body_mean": body.nanmean().item(),
        "test_psnr_mean": p.mean().item(),
        "test_best": [{"index": i, "ssim": s[i].item()} for i in best.tolist()],
        "test_worst": [{"index": i, "ssim": s[i].item()} for i in worst.tolist()],
        "val_ssim_best": trainer.best["val_ssim"] if trainer and trainer.best else None,
        "codebook_usage": stats["usage"], "perplexity": stats["perplexity"],
        **({"codebook_usage_top": stats["usage_top"], "perplexity_top": stats["perplexity_top"]}
           if "usage_top" in stats else {}),
        "seconds_vqvae": round(trainer.seconds, 1) if trainer else None,
        "epochs_vqvae": trainer.epoch if trainer else None,
    }


# ----------------------------------------------------------------------------- stage 2


def _shifted_codes(vqvae, x, codes, k, seed):
    """The prior's training maps: the codes of x (N, C, H, W), then those of k - 1 copies of x with each
    slice moved by up to 2 px each way (a random roll): more maps of the same anatomy."""
    if k == 1:
        return codes
    g = torch.Generator().manual_seed(seed)
    maps = [codes] + [vqvae.encode(torch.stack([  # one copy at a time: the memory of one data set
        s.roll(tuple(torch.randint(-2, 3, (2,), generator=g).tolist()), (-2, -1)) for s in x])) for _ in range(k - 1)]
    return tuple(map(torch.cat, zip(*maps))) if isinstance(codes, tuple) else torch.cat(maps)


def _prior_config(args, h, w, two, log, **shared):
    """The prior's config for an h x w code map (with two levels, a dict of the top's and the bottom's). Without
    --prior_layers, a map too wide for the default to reach every earlier code (OASIS's 64 x 64 codes) takes the
    fewest layers that do, set in args and logged."""
    cfg = _config(vq.PriorConfig, args, height=h, width=w, cond_codes=shared["n_codes"] if two else 0, **shared)
    if cfg.prior_layers != args.prior_layers:
        log(f"prior_layers {cfg.prior_layers}: the fewest that reach every earlier code of a {h} x {w} code map "
            f"({args.prior_layers} do not; --prior_layers to choose)")
        args.prior_layers = cfg.prior_layers  # as the checkpoint records it, for --resume and the top prior
    if two:  # the top prior: the same flags, on the top map, with no coarser map above it
        return {"top": _config(vq.PriorConfig, args, height=h // 2, width=w // 2, cond_codes=0, **shared), "bottom": cfg}
    return cfg


def train_prior(run, data, vqvae, fingerprint):
    args = run.args
    t0 = time.time()
    seed = args.seed if args.prior_seed is None else args.prior_seed
    # minutes on a CPU at HipMRI's size, with nothing to save: a signal (or one during the VQ-VAE's reports) stops it
    with _stops_at_once(run, _stopped_encoding) if run.world == 1 else contextlib.nullcontext():
        run.log("prior: encoding the slices of every split" + (f" and {args.prior_shifts - 1} shifted copies of each "
                                                                 "training slice" if args.prior_shifts > 1 else ""))
        codes = {k: vqvae.eval().encode(data[k]) for k in vq.SPLITS}  # (N, h, w), or (top, bottom) pairs
        codes["train"] = _shifted_codes(vqvae, data["train"], codes["train"], args.prior_shifts, seed)
    two = isinstance(codes["train"], tuple)
    h, w = (codes["train"][1] if two else codes["train"]).shape[1:]
    pos = data["positions"]
    shared = dict(n_codes=vqvae.config.n_codes, positional=pos["train"] is not None,
                  code_dim=vqvae.config.code_dim if args.prior_tied else 0)
    cfg = _prior_config(args, h, w, two, run.log, **shared)
    torch.manual_seed(seed)
    prior = (vq.TwoLevelPrior(cfg["top"], cfg["bottom"]) if two else vq.PixelCNN(cfg)).to(run.device)
    q = torch.quantile(pos["train"].float(), torch.linspace(0, 1, 101)) if shared["positional"] else None
    levels = ((prior.top, vqvae.quantizer_top), (prior.bottom, vqvae.quantizer)) if two else ((prior, vqvae.quantizer),)
    for m, quantizer in levels:  # each prior level with the codebook of its codes
        if args.prior_tied:
            m.tie(quantizer.codebook)
        if q is not None:  # so generate() draws positions as the training slices have them
            m.position_quantiles.copy_(q)
    saved_cfg = {k: asdict(c) for k, c in cfg.items()} if two else asdict(cfg)
    run.seed(seed, salt=1)
    train_c = tuple(c.to(run.device) for c in vq.as_levels(codes["train"]))
    train_p = pos["train"].repeat(args.prior_shifts).to(run.device) if shared["positional"] else None  # per map
    shifts = f" and {args.prior_shifts - 1} shifted copies of each" if args.prior_shifts > 1 else ""
    maps = " and ".join(f"{c.shape[-2]}x{c.shape[-1]}" for c in train_c)  # with two levels: the top's, the bottom's
    run.log(f"prior: encoded {len(data['train'])} train slices{shifts} into {maps} code maps in {time.time() - t0:.1f}s"
            + (" | conditioned on slice positions" if shared["positional"] else ""))

    n = len(data["train"])

    def step_fn(net, idx):
        if args.prior_shifts > 1:  # one of each slice's maps, at random
            idx = idx + n * torch.randint(args.prior_shifts, idx.shape, device=idx.device)
        c = tuple(level[idx] for level in train_c) if two else train_c[0][idx]
        nats = vq.code_nats(net(c, None if train_p is None else train_p[idx]), c)
        return nats, {"bits": nats.detach() / math.log(2)}

    def validate(m):
        return {f"val_bits{'' if k == 'per_code' else '_' + k}": v
                for k, v in vq.prior_bits(m, codes["validate"], pos["validate"]).items()}

    trainer = Trainer(run, "prior", prior, step_fn, n, args.prior_batch_size or args.batch_size,
                      args.prior_epochs, args.prior_lr, validate, better=lambda a, b: a["val_bits"] < b["val_bits"],
                      seed=seed, ema=args.prior_ema, flags={f"--{k}": getattr(args, k) for k in (
                          "prior_lr", "prior_shifts", "prior_ema")})
    path = run.out / "prior.pt"
    if path.exists() and vq.load_checkpoint(path).get("vqvae_fingerprint") != fingerprint:
        # its codes are another VQ-VAE's: nothing in it applies to this one
        run.log(f"prior: {path} belongs to another VQ-VAE than {run.out / 'model.pt'}: training the prior afresh")
    else:
        trainer.resume(_resume_state(run, "prior", data["settings"], "prior_config", saved_cfg))
    trainer.fit({"prior_config": saved_cfg, "data": data["settings"], "vqvae_fingerprint": fingerprint})
    prior.eval()
    # the threshold of surprise maps: a quantile of the bits of normal codes, kept with the prior
    surprise = {"threshold": vq.surprise_threshold(prior, codes["validate"], pos["validate"]),
                "quantile": vq.SURPRISE_QUANTILE, "sigma": vq.SURPRISE_SIGMA}
    test_bits = vq.prior_bits(prior, codes["test"], pos["test"])
    return prior, {"prior_fingerprint": _fingerprint(prior),
        "prior_bits_per_code": test_bits["per_code"], "prior_bits_per_slice": test_bits["per_slice"],
        **{f"prior_bits_{k}": v for k, v in test_bits.items() if k.endswith(("_top", "_bottom"))},
        "unigram_bits_per_code": _unigram_bits(codes["train"], codes["test"], shared["n_codes"]),
        "prior_val_bits_best": trainer.best["val_bits"] if trainer.best else None,
        "seconds_prior": round(trainer.seconds, 1), "epochs_prior": trainer.epoch, "prior_seed": seed,
    }, {"prior_config": saved_cfg, "prior": prior.state_dict(), "surprise": surprise}


def _real_over_samples(test, samples, rot90):
    """Up to 8 test slices, evenly spaced, over a grey band over the samples (8 a row): what a reader compares."""
    real = test[torch.linspace(0, len(test) - 1, min(8, len(test))).round().long()]
    top, bottom = image_grid(real, ncol=8, rot90=rot90), image_grid(samples, ncol=8, rot90=rot90)
    top = np.pad(top, ((0, 0), (0, bottom.shape[1] - top.shape[1])), constant_values=1)  # fewer than 8 test slices
    return np.concatenate([top, np.full((6, bottom.shape[1]), 0.5, np.float32), bottom])


def report_prior(run, data, vqvae, prior, surprise):
    """Samples and positions pictures, then (with --realism) the realism and lesion reports: run after
    model.pt holds the prior, so a report that fails loses no training."""
    args, rot, pos = run.args, data["settings"]["rot90"], data["positions"]
    g = torch.Generator(run.device).manual_seed(args.seed)
    samples = vq.sample_slices(vqvae, prior, 16, generator=g)
    save_png(run.out / "samples.png", _real_over_samples(data["test"], samples, rot))
    if prior.config.positional:  # columns from the first slice of a volume (0) to the last (1), two rows
        where = torch.linspace(0, 1, 8, device=run.device).repeat(2)
        strip = vq.sample_slices(vqvae, prior, 16, generator=g, position=where)
        save_png(run.out / "positions.png", image_grid(strip, ncol=8, rot90=rot))
    if not args.realism:
        return {}
    stats = realism_report(vqvae, prior, data["test"], data["train"], args.seed, run.device, run.log, rot,
                           position=pos["test"])
    return {**stats, **lesion_report(vqvae, prior, data["test"], pos["test"], surprise, args.seed, run.log)[0]}


# ----------------------------------------------------------------------------- main

# the figures of summary.json that describe the prior (they go when the prior does)
PRIOR_FIGURES = ("prior_", "unigram_", "realism_", "two_sample_", "nearest_train_", "copies", "diversity_",
                 "teacher_forced_", "judge_", "lesion_", "seconds_prior", "epochs_prior")
PRIOR_KEYS = ("prior_config", "prior", "prior_fingerprint", "surprise")  # model.pt's keys that the prior owns


def _read_json_lines(path):
    """The records of metrics.jsonl; a line cut short (a kill, a full disk) or no record is left out, with a warning."""
    records = []
    for k, line in enumerate(path.read_text().splitlines() if path.exists() else []):
        try:
            r = json.loads(line)
            if not isinstance(r, dict) or not isinstance(r.get("epoch"), int) or r.get("stage") not in ("vqvae", "prior"):
                raise ValueError
            records.append(r)
        except ValueError:
            if line.strip():
                warnings.warn(f"{path}, line {k + 1}: no record (cut short?), left out", stacklevel=2)
    return records


def _trim_metrics(run, keep):
    """Drop the records that no longer describe the checkpoints: keep(record) says which stay."""
    if run.main and (run.out / "metrics.jsonl").exists():
        path = run.out / "metrics.jsonl"
        vq.save_json(path, lines=[r for r in _read_json_lines(path) if keep(r)])


def _refuse_overwrite(run, stages, old):
    """old: model.pt's checkpoint, {} if none."""
    if run.args.resume and "vqvae" in stages and old and not (run.out / "vqvae.pt").exists():  # it would start afresh
        raise UsageError(f"--resume: {run.out / 'vqvae.pt'} is gone, and {run.out / 'model.pt'} holds a trained "
                         "VQ-VAE: --stage prior --resume to go on with its prior, or --overwrite to train anew")
    if run.args.resume or run.args.overwrite:
        return
    for s in stages:
        path = run.out / f"{s}.pt"
        if not path.exists():
            continue
        if s == "prior" and "vqvae" not in stages:  # a prior of another VQ-VAE is no work to protect
            if vq.load_checkpoint(path).get("vqvae_fingerprint") != old.get("vqvae_fingerprint"):
                continue
        raise UsageError(f"{path} holds an earlier run: add --resume to continue it or --overwrite to replace it")
    if old and ("vqvae" in stages or "prior" in old):  # its training state deleted, the model is still work
        raise UsageError(f"{run.out / 'model.pt'} holds a trained {'model' if 'vqvae' in stages else 'prior'}: "
                         "add --overwrite to replace it")


def _native_size(files, step):
    """The most common shape (H, W) of up to 64 of files, read from their headers, scaled to fit LONGEST on its
    longer side and rounded to multiples of step; None when no header reads."""
    shapes = []
    for f in files[::max(1, len(files) // 64)][:64]:
        try:
            if f.name.lower().endswith(".png"):
                from PIL import Image
                with Image.open(f) as im:
                    shape = im.size[::-1]
            else:
                import nibabel as nib
                shape = [d for d in nib.load(str(f)).shape if d != 1][:2]
        except Exception:  # unreadable: named when the slices are read
            continue
        if len(shape) == 2:
            shapes.append(tuple(shape))
    if not shapes:
        return None
    h, w = max(set(shapes), key=shapes.count)
    scale = min(1.0, LONGEST / max(h, w))
    return [max(16, step, round(d * scale / step) * step) for d in (h, w)]


def train(args):
    step = 4  # --stage prior: the size is model.pt's
    if args.stage != "prior":  # the VQ-VAE's flags and the size are checked before any slice is read
        cfg = _config(vq.VQVAEConfig, args)
        step = cfg.downsample * 2 ** (cfg.levels - 1)  # the top map halves the bottom one once more
        if args.size is not None and (args.size[0] % step or args.size[1] % step):
            raise UsageError(f"--size {args.size[0]} {args.size[1]} must be divisible by {step} (--downsample "
                             f"{cfg.downsample}{', two levels' if cfg.levels == 2 else ''})")
    notes = []  # such as a folder's pictures left out: logged once the run is set up
    with warnings_as_lines(notes.append):
        try:
            files = vq.find_splits(args.data) if args.data is not None else None  # a bad layout fails first, fast
        except vq.DataError as e:
            raise vq.DataError(f"{e}: --stage prior reads the slices {args.out}/model.pt was trained on (moved? put "
                               "them back)" if args.data_from_model else str(e)) from None
    found = _native_size(files["train"], step) if args.size is None else None  # --data without --size
    args.size = args.size or found or [256, 128]  # no header read: the slices will not read either, and say so
    if args.stage == "all":  # the prior's flags too, before the VQ-VAE's hours (dropout None: set by the folder)
        _prior_config(args, args.size[0] // cfg.downsample, args.size[1] // cfg.downsample, cfg.levels == 2,
                      notes.append, n_codes=cfg.n_codes, positional=False, prior_dropout=args.prior_dropout or 0,
                      code_dim=cfg.code_dim if args.prior_tied else 0)
    run = Run(args)
    for note in notes:
        run.log(note)
    if found:
        run.log(f"size {args.size[0]} x {args.size[1]}: the training slices' most common shape, fit within {LONGEST} "
                "(--size H W to choose)")
    with _save_on_signals(run), _out_locked(run):
        return _stages(run, files)


@contextlib.contextmanager
def _out_locked(run):
    """--out, created, with OUT/train.lock held (by the main process) while this run writes there: a second
    train.py into the same folder is refused, and a folder nothing can be written in is found before any slice
    is read (sample.lock_folder)."""
    if not run.main:
        yield
        return
    path = lock_folder(run.out, "--out", "train.py")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _refuse_other_data(args, model_path, old, files):
    """--stage prior learns the codes of model.pt's own slices: other --data, --size, phantom or VQ-VAE flags
    are refused before any slice is read."""
    if not old:
        stopped = " (the VQ-VAE's training was stopped: --resume --stage vqvae finishes it)" * (
            model_path.parent / "vqvae.pt").exists()
        raise UsageError(f"--stage prior needs a trained VQ-VAE: {model_path} does not exist{stopped}")
    was, now = dict(old["data"]), _data_settings(args)
    for d in (was, now):  # as load_splits records them: a resolved folder, or none and the phantom's flags
        d["source"] = None if d.get("phantom") else str(Path(d["source"]).resolve())
    said = {"source": lambda v: f"--data {v}" if v else "the phantom (no --data)",
            "size": lambda v: f"--size {v[0]} {v[1]}",
            "phantom": lambda v: " ".join(f"--{k} {n}" for k, n in zip(vq.PHANTOM_RECORD, v))}
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    try:
        has = asdict(vq._config_of(vq.VQVAEConfig, old.get("vqvae_config", {})))
    except (TypeError, ValueError):  # a VQ-VAE this vq.py refuses: said in one line when it is built
        has = {}
    for k in args.model_flags_given if has else ():  # a model flag would be silently ignored: the VQ-VAE is model.pt's
        if plain(getattr(args, k)) != plain(has[k]):
            flag = lambda v: f"--{k} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"  # noqa: E731
            raise UsageError(f"--stage prior learns the codes of the VQ-VAE in {model_path}, which has "
                             f"{flag(has[k])}, not {flag(getattr(args, k))}: drop --{k}, or train both stages")
    for key, say in said.items():
        if was.get(key) != now[key]:
            hint = " (--prior_seed: another prior of the same slices)" if was.get("phantom") and now["phantom"] \
                and was["phantom"][1:] == now["phantom"][1:] else ""
            raise UsageError(f"the VQ-VAE in {model_path} was trained with {say(was.get(key))}, not {say(now[key])}: "
                             f"pass the same, or train both stages{hint}")
    if files and "files" in was and was["files"] != vq.files_digest(files, args.data):  # none: from before
        raise UsageError(f"the VQ-VAE in {model_path} was trained on other files in {now['source']} (added, removed "
                         "or rewritten since): its test slices may now be training slices; train both stages")


def _stages(run, files):
    args, model_path, summary_path = run.args, run.out / "model.pt", run.out / "summary.json"
    stages = ["vqvae", "prior"] if args.stage == "all" else [args.stage]
    if args.resume and not any((run.out / f"{s}.pt").exists() for s in stages):
        raise UsageError(f"--resume: nothing to resume in {run.out} (no {' or '.join(s + '.pt' for s in stages)})")
    old = vq.load_checkpoint(model_path) if model_path.exists() else {}
    if args.stage == "prior":
        _refuse_other_data(args, model_path, old, files)
    _refuse_overwrite(run, stages, old)
    # with several processes each stops at a step, together
    with _stops_at_once(run, _stopped_reading) if run.world == 1 else contextlib.nullcontext():
        data = load_data(run, files)
    _fill_defaults(run, len(data["train"]))
    common = dict(n_train=len(data["train"]), n_val=len(data["validate"]), n_test=len(data["test"]),
                  skipped_files=data["skipped"], device=str(run.device) + (f" x{run.world}" if run.world > 1 else ""),
                  data=data["settings"])
    # summary.json always describes model.pt: both are rewritten, one after the other, after every stage
    before = read_summary(summary_path)

    def write(final, summary):
        if run.main:
            run.save(final, "model.pt")
            vq.save_json(summary_path, summary)

    if "vqvae" in stages:
        if not args.resume:  # a prior this run does not retrain stays, with its lines, if the codes come out the same
            _trim_metrics(run, lambda r: r["stage"] == "prior" and "prior" not in stages)
        vqvae, trainer = train_vqvae(run, data)
        summary = {**common, **evaluate_vqvae(run, vqvae, data, trainer)}
        # the final model file: best weights by validation, plain configs; the prior only if its VQ-VAE is this one
        final = {"vqvae_config": asdict(vqvae.config), "vqvae": vqvae.state_dict(), "data": data["settings"],
                 "vqvae_fingerprint": summary["vqvae_fingerprint"]}
        if old.get("vqvae_fingerprint") == final["vqvae_fingerprint"] and "prior" in old:  # e.g. --resume when done
            final.update({k: old[k] for k in PRIOR_KEYS if k in old})
            summary.update({k: v for k, v in before.items() if k.startswith(PRIOR_FIGURES)})
        elif not (args.resume and (run.out / "prior.pt").exists() and vq.load_checkpoint(
                run.out / "prior.pt").get("vqvae_fingerprint") == final["vqvae_fingerprint"]):
            _trim_metrics(run, lambda r: r["stage"] == "vqvae")  # a prior of the old codes no longer applies,
            for name in ("samples.png", "positions.png") if run.main else ():  # nor its pictures
                (run.out / name).unlink(missing_ok=True)
            if "prior" in old and "prior" not in stages:
                run.log(f"{run.out / 'model.pt'}: its prior learnt the codes of the VQ-VAE before this one, and is "
                        "dropped with its figures and pictures: train one with --stage prior")
        write(final, summary)
        run.log(f"vqvae test | ssim {summary['test_ssim_mean']:.4f} +- {summary['test_ssim_std']:.4f} "
                f"(min {summary['test_ssim_min']:.4f}) | body ssim {summary['test_ssim_body_mean']:.4f} | "
                f"psnr {summary['test_psnr_mean']:.2f} | codebook usage {summary['codebook_usage']:.2f} | "
                f"perplexity {summary['perplexity']:.0f}")
    else:
        vqvae, final = vq.VQVAE.from_checkpoint(old).to(run.device), old
        summary = ({k: v for k, v in before.items() if not k.startswith(PRIOR_FIGURES)}  # the old prior's go
                   if before.get("vqvae_fingerprint") == _fingerprint(vqvae) else evaluate_vqvae(run, vqvae, data))
        summary.update(common)
    prior = None
    if "prior" in stages:
        if not args.resume:
            _trim_metrics(run, lambda r: r["stage"] != "prior")
        prior, stats, parts = train_prior(run, data, vqvae, summary["vqvae_fingerprint"])
        if stats["prior_fingerprint"] != summary.get("prior_fingerprint"):  # another prior: none of the old one's
            summary = {k: v for k, v in summary.items() if not k.startswith(PRIOR_FIGURES)}
        summary.update(stats)
        final.update(parts, prior_fingerprint=stats["prior_fingerprint"])
        run.log(f"prior test | {summary['prior_bits_per_code']:.3f} bits per code "
                f"(unigram {summary['unigram_bits_per_code']:.3f})")
        write(final, summary)  # the prior is kept before the reports run
        if run.main:
            with _stops_at_once(run, _stopped_in_reports):  # also one after the last step: the models are saved
                summary.update(report_prior(run, data, vqvae, prior, parts["surprise"]))
            run.log(f"samples in {run.out / 'samples.png'}")
    summary["seconds_total"] = round(time.time() - run.t0, 1)
    if run.main:  # model.pt was written after its last change: on a nearly full disk the reports' figures still land
        vq.save_json(summary_path, summary)
        curves = draw_curves(_read_json_lines(run.out / "metrics.jsonl"), run.out / "curves.png")
        if not curves:
            run.log("curves.png needs matplotlib (pip install matplotlib); metrics.jsonl holds the same figures")
        run.log(f"wrote {run.out}/model.pt, summary.json, metrics.jsonl and pictures (recon.png, progress.png, "
                f"test_best.png, test_worst.png{', curves.png' if curves else ''}{', samples.png' if prior else ''}"
                f"{', positions.png' if prior and prior.config.positional else ''})")
    return {"summary": summary, "vqvae": vqvae, "prior": prior}


def main(argv=None):
    """Parse flags and train; user errors print one line and exit with code 2."""
    args = parse_args(argv)
    try:
        return train(args)
    except (UsageError, vq.DataError, vq.CheckpointError, FloatingPointError) as e:
        fail(str(e))
    except OSError as e:  # a full disk or lost folder mid-run: checkpoints already written stay whole
        room = " make room, then" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        kept = any((Path(args.out) / f"{s}.pt").exists() for s in ("vqvae", "prior"))
        fail(f"{e.filename or 'a file'}: {e.strerror or e}"
             + f" (the checkpoints written before are whole:{room} --resume)" * kept)
    except (MemoryError, RuntimeError) as e:
        if not (why := out_of_memory(e)):
            raise
        fail(f"{why}: a smaller --batch_size or --prior_batch_size (or --size, widths)")
    except Interrupted as e:
        print(e, file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
