"""Generate new slices with the trained prior, reconstruct given slices, or measure how real samples look.

    python sample.py --n 16                        # PNG grid + one .nii.gz per sample
    python sample.py --n 8 --position 0.3          # slices from 30% of the way through a volume
    python sample.py --reconstruct a.nii.gz b.nii.gz
    python sample.py --surprise a.nii.gz b.nii.gz   # where each slice is unusual: map, healed slice, score
    python sample.py --evaluate                    # realism report against the held-out test slices
    python sample.py --evaluate --repeats 4        # its two-sample score averaged over 4 draws and critics
    python sample.py --bench --n 16                # cached sampler against the naive one
    python sample.py --blind out_b                 # this run's and out_b's samples shuffled: judge, then the key
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import vq


class UsageError(Exception):
    """A mistake the user can fix: reported as one line, exit code 2."""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def out_of_memory(e):
    """The line for an allocation that failed (CUDA, numpy or torch's CPU allocator); None for any other error."""
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(e):
        return f"out of memory ({' '.join(str(e).split())[:160] or type(e).__name__})"
    return None


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        fail(f"{message} (see --help)")


@contextlib.contextmanager
def warnings_as_lines(say=print, ignore=()):
    """The warnings of the block said after it by say, one line each and each line once (a cache that cannot be
    written, met by every split, is said once), those of the kinds in ignore dropped: a user reads lines, not Python
    warnings with their source lines."""
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", vq.SkippedFileWarning)
        for kind in ignore:
            warnings.simplefilter("ignore", kind)
        yield
    for line in dict.fromkeys(str(note.message) for note in notes):
        say(line)


# The flags each mode leaves unused, refused when given ("n": plain sampling)
MODE_IGNORES = {"reconstruct": ("n", "temperature", "position", "repeats", "seed"),
                "surprise": ("n", "position", "repeats"), "evaluate": ("n", "position", "dest"),
                "bench": ("repeats", "dest"), "blind": ("repeats",), "n": ("repeats",)}


def parse_args(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    path = os.path.expanduser  # ~ in a path given as --out=~/run, quoted, or in a script
    p.add_argument("--out", type=path, default="out", help="the training output folder holding model.pt (default out)")
    p.add_argument("--n", type=int, help="number of samples (default 16; grid.png shows the first 256)")
    p.add_argument("--temperature", type=float, help="of the prior's draws (default 1)")
    p.add_argument("--position", type=float, default=None,
                   help="slice position in its volume, 0 (first) to 1 (last); default: drawn as in the training data")
    p.add_argument("--seed", type=int, help="of the draws (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:1 (default cuda when present)")
    p.add_argument("--dest", type=path, help="where to write (default a folder in OUT named for the mode)")
    p.add_argument("--reconstruct", type=path, nargs="+", metavar="PATH",
                   help="slices to reconstruct (files, or folders of them)")
    p.add_argument("--surprise", type=path, nargs="+", metavar="PATH",
                   help="slices (files, or folders of them) to score: surprise map, healed slice and picture each, surprise.json (default dest OUT/surprise)")
    p.add_argument("--evaluate", action="store_true", help="realism report against the test slices, into summary.json")
    p.add_argument("--repeats", type=int, help="with --evaluate: the two-sample score of samples "
                   "averaged over this many draws and critics (its spread on one model is about 0.02 a draw)")
    p.add_argument("--judge", type=path, metavar="PATH", help="with --evaluate: a model.pt whose prior learnt this "
                   "model's codes in the other scan order (train.py --stage prior --prior_transpose true --overwrite "
                   "in a copy of OUT, with the --prior_layers it asks for); reports the bits it gives samples beyond "
                   "their own (judge_excess_bits_*); one-level models only")
    p.add_argument("--bench", action="store_true", help="time the cached sampler against the naive one")
    p.add_argument("--blind", type=path, metavar="RUN", help="--n samples of OUT and as many of RUN (another "
                   "training output folder, or 'test' / 'train': OUT's reconstructions of random slices of that "
                   "split; a folder so named: ./test) shuffled into blind.png, to be judged before blind_key.json "
                   "says which is which (default dest OUT/blind_RUN_seedS, RUN's folder name)")
    p.add_argument("--calls", metavar="0,1,...", help="with --blind: your call on each tile of blind.png in reading "
                   "order (1: say yes, 0: no); counts them by source from blind_key.json, drawing nothing")
    args = p.parse_args(argv)
    given = {k: getattr(args, k) for k in ("n", "temperature", "position", "repeats", "seed", "dest")}
    for k, v in (("n", 16), ("temperature", 1.0), ("repeats", 1), ("seed", 0)):
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.n < 1:
        fail(f"--n must be at least 1, got {args.n}")
    if args.repeats < 1:
        fail(f"--repeats must be at least 1, got {args.repeats}")
    if not args.temperature > 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if args.position is not None and not 0 <= args.position <= 1:
        fail(f"--position must be between 0 and 1, got {args.position}")
    check_seed_and_device(args)
    modes = [f"--{m}" for m in ("reconstruct", "surprise", "evaluate", "bench", "blind") if getattr(args, m)]
    if len(modes) > 1:
        fail(f"{' and '.join(modes)} are separate modes: give one")
    mode = modes[0][2:] if modes else "n"
    ignored = [f"--{k}" for k in MODE_IGNORES[mode] if given[k] is not None]
    if ignored:
        fail(f"{' and '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} nothing with "
             f"{'sampling' if mode == 'n' else '--' + mode}: drop {'it' if len(ignored) == 1 else 'them'}")
    if args.judge and not args.evaluate:
        fail("--judge goes with --evaluate")
    if args.calls is not None and not args.blind:
        fail("--calls goes with --blind")
    if args.dest and Path(args.dest).exists() and not Path(args.dest).is_dir():
        fail(f"--dest {args.dest} is a file, not a folder")
    if Path(args.out).is_file():
        fail(f"--out {args.out} is a file: give the folder train.py wrote"
             + f" (--out {Path(args.out).parent})" * (Path(args.out).name == "model.pt"))
    return args


def lock_folder(folder, flag, script):
    """Create folder and take FOLDER/<script's name>.lock for this process (the caller unlinks the path returned):
    UsageError, one line, when the folder cannot be written or another live run of script holds it. A lock whose
    process is gone (killed) is taken over."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, a link to nowhere, a read-only disk
        why = "it is a file, not a folder" if folder.is_file() else \
            f"a link to {os.readlink(folder)}, which is missing" if folder.is_symlink() else e.strerror
        raise UsageError(f"cannot create {flag} {folder}: {why}") from None
    path, host = folder / f"{script.split('.')[0]}.lock", socket.gethostname()
    for _ in range(3):
        try:
            with open(path, "x") as f:
                f.write(f"{host} {os.getpid()}")
            return path
        except FileExistsError:
            held, _, pid = (path.read_text() if path.exists() else "").partition(" ")
            if held == host and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # its run was killed
            elif held:
                raise UsageError(f"{folder} is in use by another {script} (pid {pid} on {held}): wait for it, or "
                                 f"give another {flag} (delete {path} if no run is writing there)") from None
        except OSError as e:  # /proc, a read-only folder
            raise UsageError(f"cannot write in {flag} {folder}: {e.strerror}") from None
    raise UsageError(f"{folder} is in use by another {script}: delete {path} if no run is writing there")


def _alive(pid):
    """Whether process pid runs here (not this one: a lock of this pid is a killed run's, its number reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return pid != os.getpid()


_HELD = []  # the --dest locks this process holds, released as main returns


def _make_dest(dest, ckpt):
    """Create the output folder and hold its lock (a second sample.py into it is refused), or one line (exit 2)
    saying why it cannot be; never the model's data folder or a folder of slices directly in it (a split, a patient),
    whose outputs would be read as slices (an OUT in the data folder, and the outputs in it, are fine)."""
    data, here = ckpt["data"].get("source"), dest.resolve()
    if data and not ckpt["data"].get("phantom") and (here == (root := Path(data).resolve()) or (
            here.parent == root and here.is_dir() and vq._slice_files(here))):
        raise UsageError(f"--dest {dest} holds slices of the model's data folder {data}: its outputs would be read "
                         "as slices; give another --dest")
    _HELD.append(lock_folder(dest, "--dest", "sample.py"))


def check_seed_and_device(args):
    """--seed and --device, as both scripts take them: one line and exit 2 when they cannot work."""
    if not 0 <= args.seed < 2**63:  # what a torch.Generator (and the phantom's numpy seeds) accept
        fail(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.device is not None:
        if not re.fullmatch(r"(cpu|cuda)(:\d+)?", args.device):
            fail(f"--device {args.device}: expected cpu, cuda or cuda:N")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            fail(f"--device {args.device}: no CUDA device is available")


def _prior_command(out):
    """The train.py line that trains a prior for the VQ-VAE in OUT/model.pt, on the slices it was trained on."""
    where = [] if Path(out) == Path("out") else ["--out", str(out)]
    return shlex.join(["python", "train.py", "--stage", "prior", *where])


def _load(args, need_prior):
    path = Path(args.out) / "model.pt"
    if not path.exists():
        stopped = (Path(args.out) / "vqvae.pt").exists()  # a first stage stopped before its end
        raise vq.CheckpointError(f"no checkpoint at {path}: " + (f"its VQ-VAE's training was stopped: "
                                 f"{shlex.join(['python', 'train.py', '--resume', '--out', str(args.out)])}, with the "
                                 "flags it began with, finishes it" if stopped else "run train.py first (or pass --out)"))
    ckpt = vq.load_checkpoint(path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vqvae = vq.VQVAE.from_checkpoint(ckpt).to(device)
    prior = None
    if need_prior:
        if "prior" not in ckpt:
            raise vq.CheckpointError(f"{path} has no prior: train it with `{_prior_command(args.out)}`")
        prior = vq.load_prior(ckpt).to(device)
        if args.position is not None and not prior.config.positional:
            raise vq.CheckpointError(f"the prior in {path} was trained without slice positions: drop --position")
    return ckpt, vqvae, prior, device


def _own_data(ckpt):
    """The splits of the slices the model was trained on, or one line saying where they were looked for."""
    try:
        with warnings_as_lines(ignore=(vq.SplitWarning,)):  # how the folder is split was said in training
            data = vq.load_splits(ckpt["data"])
    except vq.DataError as e:
        raise UsageError(f"{e}: the model was trained on the slices there and reads them again (moved? put them "
                         "back)") from None
    if ckpt["data"].get("files", data["settings"].get("files")) != data["settings"].get("files"):
        print(f"note: the files in {ckpt['data']['source']} changed since the model was trained: its test split may "
              "now hold slices it trained on")
    return data


def fewest_layers(cfg):
    """The fewest prior_layers, from cfg's up, that leave no blind spot on its map (cfg's own where more layers
    would not help: gaps in the dilations)."""
    return next((n for n in range(cfg.prior_layers, cfg.prior_layers + cfg.height + cfg.width)
                 if not dataclasses.replace(cfg, prior_layers=n).blind_spot()), cfg.prior_layers)


def _judge(args, ckpt, prior, device):
    """The prior of --judge's model.pt: one of this VQ-VAE's codes, scanning them in the other order."""
    if not isinstance(prior, vq.PixelCNN):
        raise UsageError(f"--judge takes one-level priors only, and the prior in {args.out} has two levels")
    judge_ckpt = vq.load_checkpoint(Path(args.judge) / "model.pt" if Path(args.judge).is_dir() else args.judge)
    if "prior" not in judge_ckpt or judge_ckpt.get("vqvae_fingerprint") != ckpt.get("vqvae_fingerprint"):
        flip = dataclasses.replace(prior.config, prior_transpose=not prior.config.prior_transpose)
        layers = fewest_layers(flip)  # as deep as that scan needs
        raise UsageError(f"--judge {args.judge} holds no prior of this VQ-VAE's codes: train one in a copy COPY of "
                         f"{args.out}: {_prior_command('COPY')} --overwrite --prior_transpose "
                         f"{str(flip.prior_transpose).lower()} --prior_layers {layers}")
    judge = vq.load_prior(judge_ckpt).to(device)
    if judge.config.prior_transpose == prior.config.prior_transpose:  # it would share the prior's blind spots
        raise UsageError(f"--judge {args.judge} scans the codes in the same order as the prior: train it with "
                         f"--prior_transpose {str(not prior.config.prior_transpose).lower()}")
    return judge


def _save_nifti(path, image):  # whole or not at all, as every file written here
    import gzip
    import nibabel as nib

    data = nib.Nifti1Image(np.ascontiguousarray(image, dtype=np.float32), np.eye(4)).to_bytes()
    vq._atomic_write(Path(path), lambda f: f.write(gzip.compress(data, 1) if str(path).endswith(".gz") else data))


GRID_TILES = 256  # grid.png shows the first 256 samples at most: a bigger grid is more than a viewer shows


def generate(args):
    ckpt, vqvae, prior, device = _load(args, need_prior=True)
    where = "" if args.position is None else f"_p{args.position:g}"
    dest = Path(args.dest or Path(args.out) / f"samples_seed{args.seed}_t{args.temperature:g}{where}")
    _make_dest(dest, ckpt)
    g, shown, done, names, grid = torch.Generator(device).manual_seed(args.seed), [], 0, r"sample_\d{3,}\.nii\.gz", False
    stopped = lambda: f"stopped after {done} of {args.n} samples" + (  # noqa: E731
        f": sample_000 to sample_{done - 1:03d} in {dest} are this run's" + ", not grid.png" * (not grid)) * (done > 0)
    with _accounted(dest, names, lambda: {f"sample_{i:03d}.nii.gz" for i in range(done)}, stopped):
        for k in range(0, args.n, 64):  # 64 at a time, each written as drawn: bounded memory, and Ctrl-C keeps them
            part = vq.sample_slices(vqvae, prior, min(64, args.n - k), args.temperature, g, args.position)  # the
            for i, im in enumerate(part, k):  # same draws as all at once: sample_slices draws 64 at a time too
                _write_slices(dest / f"sample_{i:03d}.nii.gz", im[None], ckpt["data"]["rot90"])
                done = i + 1
            if k < GRID_TILES:
                shown.append(part[:GRID_TILES - k])
                if k + len(part) >= min(args.n, GRID_TILES):  # the grid's tiles are all drawn
                    save_png(dest / "grid.png", image_grid(torch.cat(shown), ncol=8, rot90=ckpt["data"]["rot90"]))
                    grid = True
        first = f", the first {GRID_TILES} in grid.png" if args.n > GRID_TILES else ""
        print(f"wrote {args.n} sample{'s' * (args.n > 1)} to {dest} (grid.png and sample_*.nii.gz{first})")
    return torch.cat(shown)  # (min(n, GRID_TILES), 1, H, W)


@contextlib.contextmanager
def _accounted(dest, pattern, mine, stopped):
    """Around a mode's writes into dest. Stopped by Ctrl-C, SIGTERM or a full disk, it says stopped() (what was
    written is whole); either way it counts dest's files named like this run's that it did not write (mine(): the
    names it wrote), the first named: left as they are (the folder may be the user's), but not of this run."""
    try:
        yield
    except (KeyboardInterrupt, OSError):
        print(stopped())
        raise
    finally:
        written = mine()
        older = sorted((p.name for p in dest.iterdir() if re.fullmatch(pattern, p.name) and p.name not in written),
                       key=vq._natural_key)
        if older:
            print(f"note: {dest} also holds {len(older)} file(s) not of this run ({older[0]}, ...): an earlier one's")


def blind(args):
    """A blind comparison of two runs (or of a run and real slices): --n images of each, OUT's samples (seed
    --seed) and --blind's (samples with seed --seed + 1, or reconstructions of random slices of OUT's "test" or
    "train" split: train where the test split holds one region of the anatomy), shuffled into one
    picture, 8 a row; blind_key.json names each tile's source, to be read only after each tile is judged
    (for instance: organs whole or not); with --calls, those calls counted by source. Returns (the images
    in the picture's order, their sources "a" (OUT) or "b" (--blind)), or the counts."""
    tag = Path(_source(args.blind)).name
    dest = Path(args.dest or Path(args.out) / f"blind_{tag}_seed{args.seed}")
    if args.calls is not None:
        return _count_calls(dest / "blind_key.json", args.calls, args.blind)
    try:  # the picture and key of another comparison (two runs named alike: the same default dest) are kept
        old = json.loads((dest / "blind_key.json").read_text())
        were = _source(old["b"])
    except (OSError, ValueError, KeyError, TypeError):  # none, or damaged: drawn anew
        were = None
    if were and were != _source(args.blind):  # (a key from before holds --blind as typed: read from here)
        raise UsageError(f"{dest} holds the blind test of {old['a']} against {old['b']}: give another --dest")
    ckpt, vqvae, prior, device = _load(args, need_prior=True)
    draw = lambda model, p, k: vq.sample_slices(  # noqa: E731
        model, p, args.n, args.temperature, torch.Generator(device).manual_seed(args.seed + k), args.position)
    if args.blind in ("test", "train"):  # a split of OUT's data
        x = _own_data(ckpt)[args.blind]
        if len(x) < args.n:
            raise UsageError(f"--blind {args.blind}: {len(x)} {args.blind} slices, fewer than --n {args.n}")
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[:args.n]
        second = vqvae.reconstruct(x[pick].to(device)).cpu()
    else:  # another run, its size checked before anything is drawn
        if not (Path(args.blind) / "model.pt").exists():
            raise UsageError(f"--blind {args.blind}: no model.pt there (give a training output folder, test or train)")
        theirs_ckpt, theirs_vqvae, theirs_prior, _ = _load(argparse.Namespace(**{**vars(args), "out": args.blind}),
                                                           need_prior=True)
        mine, theirs = ((c["data"]["size"], c["data"]["rot90"]) for c in (ckpt, theirs_ckpt))
        if theirs != mine:
            raise UsageError(f"--blind {args.blind}: its slices are {theirs[0]} (rot90 {theirs[1]}), {args.out}'s "
                             f"{mine[0]} (rot90 {mine[1]}): compare runs of one size")
        second = draw(theirs_vqvae, theirs_prior, 1)
    images = [draw(vqvae, prior, 0), second]
    shuffle = torch.Generator().manual_seed((args.seed + zlib.crc32(tag.encode())) % 2**63)  # a layout per source
    order = torch.randperm(2 * args.n, generator=shuffle)
    shown, sources = torch.cat(images)[order], ["ab"[i // args.n] for i in order.tolist()]
    _make_dest(dest, ckpt)
    grid = image_grid(shown, ncol=8, rot90=ckpt["data"]["rot90"])
    scale = max(1, 256 // shown.shape[-2])  # small slices enlarged, to be judged by eye
    save_png(dest / "blind.png", grid.repeat(scale, 0).repeat(scale, 1))
    vq.save_json(dest / "blind_key.json", {"a": str(Path(args.out).resolve()), "b": _source(args.blind),
                                           "tiles": sources})
    print(f"wrote {dest / 'blind.png'} ({2 * args.n} tiles, 8 a row): judge each, then give your calls with "
          f"--calls (or read {dest / 'blind_key.json'})")
    return shown, sources


def _source(blind):
    """--blind as one name: test or train, else the other run's folder, resolved."""
    return blind if blind in ("test", "train") else str(Path(blind).resolve())


def _count_calls(path, calls, blind):
    """--calls '1,0,...' against the key of a blind picture: {"a": OUT's tiles called 1, "b": --blind's}."""
    if not path.is_file():
        raise UsageError(f"no blind key at {path}: draw the picture first (same --out, --dest and --seed)")
    try:
        key = json.loads(path.read_text())
        tiles, names = key["tiles"], {a: key[a] for a in "ab"}
        if not (isinstance(tiles, list) and all(isinstance(v, str) for v in names.values())):
            raise TypeError("not a key")
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"the blind key at {path} is not one blind.png's key (damaged?): draw the picture "
                         "again") from None
    if _source(names["b"]) != _source(blind):
        raise UsageError(f"the blind key at {path} is of {names['b']}, not --blind {blind}")
    said = calls.replace(" ", "").split(",")
    if len(said) != len(tiles) or not set(said) <= {"0", "1"}:
        raise UsageError(f"--calls: give {len(tiles)} calls of 0 or 1, one per tile in reading order, got {calls!r}")
    counts = {a: sum(int(c) for c, t in zip(said, tiles) if t == a) for a in "ab"}
    for a in "ab":
        print(f"{a}: {names[a]}: {counts[a]} of {tiles.count(a)} called 1")
    return counts


def _write_slices(path, x, rot90):
    """(S, 1, H, W) in the model's orientation (rot90: its data's) as a float32 NIfTI, turned as NIfTI slices are
    stored (upright after np.rot90, as _read_inputs reads them): (H, W) for one slice, (H, W, S) for S."""
    a = np.moveaxis(torch.rot90(x[:, 0], rot90 - 1, (1, 2)).numpy(), 0, -1)
    _save_nifti(path, a[..., 0] if len(x) == 1 else a)


def _read_inputs(paths, size, rot90):
    """(path, its slices at size) for each file named, or each slice file of a folder named (naturally sorted),
    all read before anything is written; DataError names the first missing or unreadable one. A PNG is upright
    and a NIfTI slice upright after np.rot90 (as train.py reads them): one of the kind the model was not trained
    on is turned to the model's orientation (rot90: its data's), so it sees the anatomy the right way up."""
    with warnings_as_lines():  # a folder's pictures left out, NaN zeroed
        files, out = [f for path in paths for f in vq._resolve(path)[0]], []
        for f in files:
            k = (not f.name.lower().endswith(".png")) - rot90  # the turn from the file's orientation to the model's
            x = vq.load_slices(f, size[::-1] if k % 2 else size, strict=True, cache_dir=False)
            if k:
                print(f"{f}: turned the model's way up (it was trained on {'PNG' if k > 0 else 'NIfTI'} slices)")
                x = torch.rot90(x, k, (2, 3))
            out.append((f, x))
    return out


def _stem(i, path):
    """Input i's name in the outputs: its index first, so two inputs never share one."""
    return f"{i:03d}_{Path(path).name.split('.')[0]}"


def reconstruct(args):
    ckpt, vqvae, _, device = _load(args, need_prior=False)
    size, rot = tuple(ckpt["data"]["size"]), ckpt["data"]["rot90"]
    dest = Path(args.dest or Path(args.out) / "reconstructions")
    inputs = _read_inputs(args.reconstruct, size, rot)
    _make_dest(dest, ckpt)
    results, outputs = [], r"\d{3,}_.*(_reconstruction\.nii\.gz|\.png)"
    mine = lambda: {_stem(i, p) + e for i, (p, _) in enumerate(inputs[:len(results)])  # noqa: E731
                    for e in ("_reconstruction.nii.gz", ".png")}  # the outputs of the inputs done
    with _accounted(dest, outputs, mine, lambda: f"stopped after {len(results)} of {len(inputs)} inputs"):
        for i, (path, x) in enumerate(inputs):  # (S, 1, H, W): the S slices of one file
            r = vqvae.reconstruct(x)
            s = vq.ssim(x, r)
            name = _stem(i, path)
            _write_slices(dest / f"{name}_reconstruction.nii.gz", r, rot)
            save_png(dest / f"{name}.png", image_grid(torch.cat([x, r]), ncol=len(x), rot90=rot))
            print(f"{path}: ssim " + " ".join(f"{v:.4f}" for v in s.tolist()))
            results.append(s)
    print(f"reconstructions (NNN_name_reconstruction.nii.gz) and input-over-reconstruction pictures in {dest}")
    return results


def _surprise_settings(ckpt, vqvae, prior, data=None):
    """The surprise threshold and smoothing kept with the prior; for a checkpoint from before they were
    kept, set now from the validation slices, as train.py sets them."""
    if "surprise" in ckpt:
        return ckpt["surprise"]
    data = data or _own_data(ckpt)
    print("surprise: this checkpoint keeps no threshold: setting it from the validation slices")
    threshold = vq.surprise_threshold(prior, vqvae.encode(data["validate"]), data["positions"]["validate"])
    return {"threshold": threshold, "quantile": vq.SURPRISE_QUANTILE, "sigma": vq.SURPRISE_SIGMA}


def _positions_of(path, n, prior, seen):
    """The positions in their volume of a file's n slices, as training reads them: k / (n - 1) for a volume in one
    file, else from its name and its neighbours' (slice_Z of the largest Z beside it), 0.5 when the name has none;
    None for a prior without positions. seen: {folder: {name: position}} of the folders read so far, filled as
    it goes (one scan a folder)."""
    if not prior.config.positional:
        return None
    if n > 1:
        return vq._positions([path], [n])
    path = Path(path)
    if path.parent not in seen:
        with warnings_as_lines(ignore=(vq.SkippedFileWarning,)):  # its pictures were named when the inputs were read
            siblings = [f for f in vq._slice_files(path.parent) if re.fullmatch(vq.SLICE_Z, f.name.lower())]
        where = vq._positions(siblings, [1] * len(siblings), scan=False)  # those named: the whole folder's volumes
        seen[path.parent] = dict(zip((f.name for f in siblings), where))
    if path.name not in seen[path.parent]:
        print(f"{path}: no position from slice_Z in the names of its folder: taken as 0.5, the middle of a volume")
        return [0.5]
    return [seen[path.parent][path.name]]


def _runs(inputs, slices=64):
    """(index, (path, its slices)) of each input, in runs of whole files holding at least `slices` slices
    (the last run may hold fewer)."""
    run = []
    for item in enumerate(inputs):
        run.append(item)
        if sum(len(x) for _, (_, x) in run) >= slices:
            yield run
            run = []
    if run:
        yield run


def surprise(args):
    ckpt, vqvae, prior, device = _load(args, need_prior=True)
    size, rot = tuple(ckpt["data"]["size"]), ckpt["data"]["rot90"]
    settings = _surprise_settings(ckpt, vqvae, prior)
    dest = Path(args.dest or Path(args.out) / "surprise")
    inputs, seen = _read_inputs(args.surprise, size, rot), {}
    positions = [_positions_of(path, len(x), prior, seen) for path, x in inputs]  # the folders read before any write
    _make_dest(dest, ckpt)
    g = torch.Generator(device).manual_seed(args.seed)
    entries, outputs = [], r"\d{3,}_.*(_surprise\.nii\.gz|_healed\.nii\.gz|\.png)"
    index = lambda: vq.save_json(dest / "surprise.json", {  # noqa: E731
        "threshold_bits": settings["threshold"], "sigma": settings["sigma"], "slices": entries})

    def stopped():  # what was written is whole, and indexed
        try:
            index()
            said = f"surprise.json in {dest} lists them"
        except OSError:
            said = f"surprise.json in {dest}, if there, is an earlier run's"
        return f"stopped after {len(entries)} of {sum(len(x) for _, x in inputs)} slices: {said}"
    with _accounted(dest, outputs, lambda: {o for e in entries for o in e["outputs"].split(", ")}, stopped):
        for run in _runs(inputs):  # many files a call: the sampler's scan of the code map serves a batch of slices
            ps = [positions[i] for i, _ in run]
            where = None if ps[0] is None else torch.tensor([q for p in ps for q in p])
            s = vq.surprise(vqvae, prior, torch.cat([x for _, (_, x) in run]), settings["threshold"], where,
                            settings["sigma"], args.temperature, g)
            bits = torch.cat([b.flatten(1) for b in vq.as_levels(s["bits"])], 1)  # (N, all codes)
            redrawn = sum(r.flatten(1).sum(1) for r in vq.as_levels(s["redo"]))  # (N,)
            start = 0
            for (i, (path, x)), p in zip(run, ps):  # (S, 1, H, W): the S slices of one file
                at, start = slice(start, start + len(x)), start + len(x)
                name = _stem(i, path)
                for kind, image in (("surprise", s["map"][at]), ("healed", s["healed"][at])):
                    _write_slices(dest / f"{name}_{kind}.nii.gz", image, rot)
                grid = lambda t: image_grid(t, ncol=len(x), rot90=rot)  # noqa: E731
                heat = grid(s["map"][at] / max(s["map"][at].max().item(), 1e-6))
                grey = [np.stack([grid(t)] * 3, -1) for t in (x, s["healed"][at])]
                save_png(dest / f"{name}.png", np.concatenate([*grey, overlay(grid(x), heat)]))
                for k, j in enumerate(range(at.start, at.stop)):
                    entries.append({"file": str(path), "slice": k, "score": s["score"][j].item(),
                                    "bits_per_code": bits[j].mean().item(), "redrawn_codes": int(redrawn[j]),
                                    "position": None if p is None else p[k],
                                    "outputs": f"{name}_surprise.nii.gz, {name}_healed.nii.gz, {name}.png"})
                    print(f"{path}{f' slice {k}' if len(x) > 1 else ''}: score {entries[-1]['score']:.5f} | "
                          f"{entries[-1]['redrawn_codes']} codes redrawn")
        index()
    print(f"surprise maps, healed slices and surprise.json in {dest} (pictures: slice, healed, map in red over the slice)")
    return entries


def bench(args):
    _, _, prior, device = _load(args, need_prior=True)
    levels = (prior.top, prior.bottom) if isinstance(prior, vq.TwoLevelPrior) else (prior,)
    maps = tuple(torch.zeros(args.n, m.config.height, m.config.width, dtype=torch.long, device=device) for m in levels)
    n_codes, shapes = sum(m[0].numel() for m in maps), " + ".join(f"{m.shape[1]}x{m.shape[2]}" for m in maps)
    pos = torch.full((args.n,), 0.5, device=device) if prior.config.positional else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn, *a, **kw):
        sync()
        t = time.perf_counter()
        out = fn(*a, **kw)
        sync()
        return time.perf_counter() - t, out

    with torch.no_grad():
        prior(maps if len(maps) == 2 else maps[0], pos)  # warm-up
        forward = timed(lambda: [prior(maps if len(maps) == 2 else maps[0], pos) for _ in range(3)])[0] / 3
    prior.generate(1, generator=torch.Generator(device).manual_seed(0))  # warm-up: first-call set-up
    times = {}
    for name, fn in (("cached", prior.generate), ("naive", prior.generate_naive)):
        if name == "naive" and n_codes > 1024:  # a forward per code: at 64 x 32 that is minutes on a CPU
            print(f"naive sampler skipped: {n_codes} forward passes, about {n_codes * forward:.0f} s (the tests "
                  "compare the two on small maps)")
            break
        g = torch.Generator(device).manual_seed(args.seed)
        times[name] = timed(fn, args.n, args.temperature, generator=g, position=args.position)
        print(f"{name:6s} sampler: {times[name][0]:.2f} s for {args.n} maps of {shapes} codes "
              f"= {times[name][0] / forward:.1f} forward passes of {forward * 1e3:.1f} ms", flush=True)
    if "naive" in times:
        same = all(map(torch.equal, *(vq.as_levels(times[k][1]) for k in ("cached", "naive"))))
        print(f"speed-up {times['naive'][0] / times['cached'][0]:.1f}x | identical codes: {same} | {device}")
    return times


# ----------------------------------------------------------------------------- pictures


def overlay(image, heat):
    """A greyscale image (h, w) with heat (h, w) in [0, 1] laid over it in red -> (h, w, 3) in [0, 1];
    white in both (a grid's padding) stays white."""
    heat = np.where((image == 1) & (heat == 1), 0, heat)
    return np.stack([np.maximum(image, heat), image * (1 - heat), image * (1 - heat)], -1)


def save_png(path, image):
    """Write a 2-D array (greyscale) or an (h, w, 3) array (RGB) in [0, 1] as an 8-bit PNG, with zlib alone."""
    import struct
    import zlib

    a = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in a)  # filter type 0 per scanline; RGB rows interleave

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 8, 2 if a.ndim == 3 else 0, 0, 0, 0)  # 2: RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    vq._atomic_write(Path(path), lambda f: f.write(png))


def image_grid(images, ncol=8, rot90=1, pad=2):
    """(B, 1, H, W) in [0, 1] -> one 2-D array, each image turned np.rot90 k=rot90 for display."""
    imgs = [np.rot90(im[0].detach().float().cpu().numpy(), rot90) for im in images]
    h, w = imgs[0].shape
    nrow = math.ceil(len(imgs) / ncol)
    ncol = min(ncol, len(imgs))
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad), np.float32)
    for i, im in enumerate(imgs):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = im
    return grid


# ----------------------------------------------------------------------------- realism report


class _Critic(nn.Module):
    """A CNN that tells two sets of slices apart, at half resolution (the anatomy's layout, at a quarter
    of the cost); global pooling makes it judge texture and structure rather than memorise where
    things are."""

    def __init__(self, widths=(32, 64, 128, 128)):
        super().__init__()
        layers, c = [], 1
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = w
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1))

    def forward(self, x):
        return self.net(F.avg_pool2d(x, 2) * 2 - 1)[:, 0]


CRITIC_STEPS = 1000  # a critic's training steps, unless two_sample_score is given others


def two_sample_score(real_fit, fake_fit, real_test, fake_test, seed=0, steps=None, batch_size=32, device="cpu",
                     flip_dim=-2):
    """How well a CNN tells real slices from others: trained for a fixed budget on real_fit against
    fake_fit, scored on real_test against fake_test, which it never saw. Returns (mean of the two
    accuracies, [share of real_test called real, share of fake_test called fake]); 0.5: it cannot tell
    them apart, 1.0: always. All (N, 1, H, W) in [0, 1]. Training batches are mirrored at random along
    flip_dim (the body's left-right axis), so the critic needs the anatomy, not one side of it. The learning
    rate decays to 0 on a cosine: a critic stopped at full rate ends wherever its last steps left its
    threshold: six critics on two draws of one model spread over 0.085 at a constant rate, 0.05 decayed."""
    if min(len(real_fit), len(fake_fit), len(real_test), len(fake_test)) < 4:
        raise ValueError("two_sample_score needs at least 4 slices in each set")
    g, steps = torch.Generator().manual_seed(seed), CRITIC_STEPS if steps is None else steps
    x = torch.cat([real_fit, fake_fit]).float().to(device)
    y = torch.cat([torch.ones(len(real_fit)), torch.zeros(len(fake_fit))]).to(device)
    torch.manual_seed(seed)
    critic = _Critic().to(device)
    opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    for step in range(steps):
        opt.param_groups[0]["lr"] = 1e-3 * (1 + math.cos(math.pi * step / steps)) / 2  # from Adam's 1e-3 to 0
        idx = torch.randint(len(x), (batch_size,), generator=g).to(device)
        flip = (torch.rand(batch_size, generator=g) < 0.5).to(device)
        xb = torch.where(flip[:, None, None, None], x[idx].flip(flip_dim), x[idx])
        loss = F.binary_cross_entropy_with_logits(critic(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        called_real = [torch.cat([critic(b.float().to(device)) > 0 for b in t.split(256)]).float().mean().item()
                       for t in (real_test, fake_test)]
    parts = [called_real[0], 1 - called_real[1]]
    return sum(parts) / 2, parts


def nearest_ssim(x, pool, shortlist=32):
    """For each slice of x, its highest SSIM against the slices of pool, searched among the
    `shortlist` nearest in L2 on 4x-reduced images (an exact SSIM search would cost len(x) * len(pool))."""
    small = lambda t: F.avg_pool2d(t.float(), 4).flatten(1)  # noqa: E731
    ps = small(pool)
    best = []
    for xb in x.split(64):
        near = torch.cdist(small(xb), ps).topk(min(shortlist, len(pool)), largest=False).indices  # (b, shortlist)
        s = vq.ssim(xb.repeat_interleave(near.shape[1], 0), pool[near.flatten()]).view(near.shape)
        best.append(s.max(1).values)
    return torch.cat(best)


def _f(v):
    return "n/a" if v is None else f"{v:.3f}"


def pair_ssim(x, pairs=256, seed=0):
    """Mean SSIM of random pairs of different slices of x: lower is more varied; None for fewer than 2."""
    if len(x) < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(len(x), (pairs,), generator=g)
    j = (i + torch.randint(1, len(x), (pairs,), generator=g)) % len(x)
    return vq.ssim(x[i], x[j]).mean().item()


def _draw_seed(seed, r):
    """The seed of draw r of a report seeded by seed: seed itself for r = 0, else far from every other seed's."""
    return seed if r == 0 else (seed + r * 0x9E3779B97F4A7C15) % 2 ** 63


FIT = 1000  # training slices (evenly spread: the first would be a few cases') a critic learns from


@torch.no_grad()
def realism_report(vqvae, prior, test, train, seed=0, device="cpu", log=print, rot90=1, temperature=1.0,
                   position=None, repeats=1, judge=None):
    """How far decoded samples are from real held-out slices, beside the floor the decoder sets:
    two-sample scores (critics trained on up to FIT training slices against as many samples, or
    reconstructions, and scored on the test slices against as many fresh ones; "two_sample_prior": the
    reconstructions of both against samples, what the prior gets wrong beyond the decoder), memorisation and
    diversity (see the README), and the teacher-forced redraw (vq.teacher_forced). test, train: (N, 1, H, W);
    position: the test slices' positions (N,), for a positional prior; rot90 as the data's settings say, so the
    critic mirrors along the body's left-right axis. With fewer than 8 test or training slices the two-sample
    scores are left out (None), with a line saying so. repeats > 1: the samples' two-sample score is
    the mean over that many draws, each with its own critic (the first seeded by seed, the draw the other figures
    use; draw r by _draw_seed(seed, r), so two seeds share no draw), listed in "two_sample_samples_runs" and
    "two_sample_prior_runs".
    judge: a prior of the same codes in the other scan order, for judge_report's figures."""
    n, fit = len(test), train[torch.linspace(0, len(train) - 1, min(FIT, len(train))).round().long()]  # all cases
    g = torch.Generator(device).manual_seed(seed)
    samples, codes = vq.sample_slices(vqvae, prior, n, temperature, generator=g), vqvae.encode(test)
    recon = vqvae.decode(codes)
    report = {"realism_n": n, "realism_temperature": temperature}
    if min(n, len(fit)) >= 8:
        flip = -2 if rot90 % 2 else -1
        with torch.enable_grad():
            fit_recon = vqvae.reconstruct(fit)
            floor, parts = two_sample_score(fit, fit_recon, test, recon, seed, device=device, flip_dim=flip)
            report.update(two_sample_recon_floor=floor, two_sample_recon_floor_parts=parts)
            runs, prior_runs = [], []  # (score, parts) of each draw, each with its own critics
            for r in range(repeats):
                sr = _draw_seed(seed, r)
                gr = g if r == 0 else torch.Generator(device).manual_seed(sr)
                draw = samples if r == 0 else vq.sample_slices(vqvae, prior, n, temperature, gr)
                fakes = vq.sample_slices(vqvae, prior, len(fit), temperature, gr)  # the critics' own, never scored
                runs.append(two_sample_score(fit, fakes, test, draw, sr, device=device, flip_dim=flip))
                prior_runs.append(two_sample_score(fit_recon, fakes, recon, draw, sr, device=device, flip_dim=flip))
        report.update(two_sample_samples=sum(s for s, _ in runs) / repeats, two_sample_samples_parts=runs[0][1],
                      two_sample_prior=sum(s for s, _ in prior_runs) / repeats,
                      two_sample_prior_parts=prior_runs[0][1])
        if repeats > 1:
            report["two_sample_samples_runs"] = [s for s, _ in runs]
            report["two_sample_prior_runs"] = [s for s, _ in prior_runs]
    else:
        log(f"realism: {n} test and {len(fit)} training slices are too few for the two-sample scores (8 of each "
            "needed); left out")
    near_samples, near_recon = nearest_ssim(samples, train), nearest_ssim(recon, train)  # both decoded

    def centre(t):  # the central half of each side (the organs, not the outline), 11 px at least (SSIM's window)
        (h, w), cut = t.shape[-2:], lambda n: min(n // 4, (n - 11) // 2)  # noqa: E731 (a margin)
        return t[..., cut(h):h - cut(h), cut(w):w - cut(w)]

    report.update({
        "nearest_train_ssim_samples": near_samples.median().item(),
        "nearest_train_ssim_real": nearest_ssim(test, train).median().item(),
        "nearest_train_ssim_recon": near_recon.median().item(),  # the decoder's smoothing alone raises it
        "copies": (near_samples > near_recon.max()).float().mean().item(),
        **{f"nearest_train_ssim_centre_{k}": nearest_ssim(centre(v), centre(train)).median().item()
           for k, v in (("samples", samples), ("real", test), ("recon", recon))},
        "diversity_samples": pair_ssim(samples, seed=seed), "diversity_real": pair_ssim(test, seed=seed),
        "diversity_recon": pair_ssim(recon, seed=seed),  # the decoder's own smoothing raises it above real
        **{f"teacher_forced_{k}": v for k, v in vq.teacher_forced(
            vqvae, prior, test, position if prior.config.positional else None,
            torch.Generator(next(prior.parameters()).device).manual_seed(seed)).items()},
    })
    scores = ""
    if "two_sample_samples" in report:
        runs, parts = report.get("two_sample_samples_runs"), report["two_sample_samples_parts"]
        detail = (f"draws {' / '.join(f'{f:.3f}' for f in runs)}" if runs else
                  f"real called real {parts[0]:.3f}, samples called samples {parts[1]:.3f}")
        scores = (f"two-sample {report['two_sample_samples']:.3f} ({detail}; reconstruction floor "
                  f"{report['two_sample_recon_floor']:.3f}; samples against reconstructions "
                  f"{report['two_sample_prior']:.3f}) | ")
    log(f"realism | {scores}nearest training slice ssim {report['nearest_train_ssim_samples']:.3f} (real test "
        f"slices {report['nearest_train_ssim_real']:.3f}, reconstructed {report['nearest_train_ssim_recon']:.3f}; "
        f"copies {report['copies']:.1%}; centre {report['nearest_train_ssim_centre_samples']:.3f}, real "
        f"{report['nearest_train_ssim_centre_real']:.3f}, reconstructed "
        f"{report['nearest_train_ssim_centre_recon']:.3f}) | pair ssim "
        f"{_f(report['diversity_samples'])} (real {_f(report['diversity_real'])}, reconstructions "
        f"{_f(report['diversity_recon'])}) | teacher-forced redraw: "
        f"{report['teacher_forced_changed']:.1%} of codes changed, ssim to the reconstruction "
        f"{report['teacher_forced_ssim']:.3f} (argmax {report['teacher_forced_changed_argmax']:.1%}, "
        f"{report['teacher_forced_ssim_argmax']:.3f})")
    if judge is not None:
        report.update(judge_report(prior, judge, codes, position if prior.config.positional else None,
                                   temperature, seed))
        log(f"judge | samples cost the other-order prior {report['judge_excess_bits_samples']:.1f} bits a slice "
            f"beyond their own (real test slices {report['judge_excess_bits_real']:.1f} +- "
            f"{report['judge_excess_bits_real_std']:.1f})")
    return report


@torch.no_grad()
def judge_report(prior, judge, codes, position=None, temperature=1.0, seed=0, batch_size=64):
    """What a prior of the same codes in the other scan order (judge) makes of prior's samples: per slice, the
    judge's bits minus prior's own, -log2 p_judge(x) + log2 p_prior(x). On samples (as many as codes, drawn at
    temperature, positions as in the training data) its mean estimates KL(samples || judge) at temperature 1;
    on the real code maps codes (N, h, w) with their positions it is near 0 when both priors fit the data.
    The orders share no blind spot: samples that hold together by the prior's order but not by the judge's
    (a broken organ, an outline that does not close) cost the judge more."""
    n = len(codes)
    g = torch.Generator(next(prior.parameters()).device).manual_seed(seed)
    where = prior.draw_positions(n, g) if prior.config.positional else None
    drawn = vq.sample_codes(prior, n, temperature, g, where, batch_size)

    def excess(c, at):  # per slice
        return (vq.code_bits(judge, c, at) - vq.code_bits(prior, c, at)).flatten(1).sum(1)
    fake, real = excess(drawn, where), excess(codes, position)
    return {"judge_excess_bits_samples": fake.mean().item(), "judge_excess_bits_real": real.mean().item(),
            "judge_excess_bits_real_std": real.std().item() if n > 1 else 0.0}


def draw_lesions(x, seed=0, share=0.5):
    """Synthetic lesions in a share of slices x (N, 1, H, W), for scoring surprise maps: one soft ellipse
    each, inside the body, 2 to 16 pixels across (up to a few code cells), brighter or darker than the
    tissue around it by 0.12 to 0.5 (near the tissue's contrast as well as far from it), with the
    slices' own noise level. Returns (lesioned slices, masks (N, 1, H, W) bool, which slices have one
    (N,) bool, the sign of each lesion (N,): +1 bright, -1 dark, 0 none)."""
    g = torch.Generator().manual_seed(seed)
    x, (N, _, H, W) = x.clone().float(), x.shape
    has = torch.zeros(N, dtype=torch.bool)
    has[torch.randperm(N, generator=g)[:round(share * N)]] = True
    sign, masks = torch.zeros(N), torch.zeros(N, 1, H, W, dtype=torch.bool)
    body = vq._blur(x, 3.0) > 0.25  # well inside the body, not on its rim
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    for i in has.nonzero()[:, 0].tolist():
        inside = body[i, 0].nonzero()
        if not len(inside):
            has[i] = False
            continue
        cy, cx = inside[torch.randint(len(inside), (1,), generator=g)].float()[0]
        ry, rx = (1 + 7 * torch.rand(2, generator=g)).tolist()  # radii: 1 to 8 pixels
        d = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2
        m = torch.sigmoid((1 - d) * 4)  # soft edge, about a pixel wide
        local = (x[i, 0] * (d < 1)).sum() / (d < 1).sum().clamp_min(1)
        sign[i] = 1.0 if torch.rand(1, generator=g) < 0.5 else -1.0
        value = (local + sign[i] * (0.12 + 0.38 * torch.rand(1, generator=g))).clamp(0.02, 1)
        noise = 0.014 * (torch.rand(H, W, generator=g) - 0.5)
        x[i, 0] = (1 - m) * x[i, 0] + m * (value + noise)
        masks[i, 0] = m > 0.5
    return x.clamp(0, 1), masks, has, sign


def auroc(score, label):
    """Area under the ROC curve of score for the boolean labels (ties count half); None without both classes."""
    score, label = score.double().flatten(), label.flatten().bool()
    if not 0 < label.sum() < len(label):
        return None
    ranks = torch.empty_like(score)
    ranks[score.argsort()] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    for v in score.unique()[torch.unique(score, return_counts=True)[1] > 1]:  # average ranks of ties
        ranks[score == v] = ranks[score == v].mean()
    p, n = label.sum().item(), (~label).sum().item()
    return (ranks[label].sum().item() - p * (p + 1) / 2) / (p * n)


def precision_recall(score, label):
    """(average precision, best Dice over thresholds) of a pixel score against a boolean mask; tied scores are
    one threshold (a map is 0 in most pixels), as in scikit-learn; (None, None) for a mask with no pixel."""
    if not label.any():
        return None, None
    score = score.flatten().double()
    order = score.argsort(descending=True)
    hit = label.flatten()[order].double()
    tp, k = hit.cumsum(0), torch.arange(1, len(hit) + 1, dtype=torch.float64)
    last = torch.cat([score[order].diff() != 0, torch.tensor([True])])  # a run of ties ends: a threshold
    tp, k, total = tp[last], k[last], hit.sum()
    ap = (tp.diff(prepend=tp.new_zeros(1)) * tp / k).sum() / total
    return ap.item(), (2 * tp / (k + total)).max().item()


def lesion_report(vqvae, prior, x, position, surprise, seed=0, log=print):
    """Surprise maps against lesions drawn into slices x (draw_lesions): slice-level AUROC of the score,
    pixel-level average precision (AUPRC, overall and per sign) and best Dice of the map, beside two
    baselines: the VQ-VAE's residual |x - reconstruction| (smoothed alike) and the plain intensity.
    surprise: {"threshold", "sigma"}, as a checkpoint keeps them. Returns (report, (lesioned slices,
    masks, what vq.surprise returned))."""
    xl, masks, has, sign = draw_lesions(x, seed)
    device = next(prior.parameters()).device
    s = vq.surprise(vqvae, prior, xl, surprise["threshold"], position, surprise["sigma"],
                    generator=torch.Generator(device).manual_seed(seed))
    residual = vq._blur((xl - vqvae.reconstruct(xl)).abs(), surprise["sigma"])
    report = {"lesion_n": len(x), "lesion_slices": int(has.sum()), "lesion_threshold_bits": surprise["threshold"],
              "lesion_sigma": surprise["sigma"], "lesion_redrawn_share": sum(r.float().mean().item() * r[0].numel()
              for r in vq.as_levels(s["redo"])) / sum(r[0].numel() for r in vq.as_levels(s["redo"]))}
    for name, m in (("surprise", s["map"]), ("residual", residual), ("intensity", xl)):
        score = s["score"] if name == "surprise" else m.flatten(1).mean(1)
        report[f"lesion_{name}_auroc"] = auroc(score, has)
        report[f"lesion_{name}_auprc"], report[f"lesion_{name}_dice"] = precision_recall(m, masks)
        for tag, sg in (("bright", 1), ("dark", -1)):  # slices with a lesion of this sign, and those with none
            keep = (sign == sg) | ~has
            report[f"lesion_{name}_auprc_{tag}"] = precision_recall(m[keep], masks[keep])[0]
    log(f"lesions | {int(has.sum())} of {len(x)} test slices | " + " | ".join(
        f"{n}: slice auroc {_f(report[f'lesion_{n}_auroc'])}, pixel auprc {_f(report[f'lesion_{n}_auprc'])}, "
        f"dice {_f(report[f'lesion_{n}_dice'])}" for n in ("surprise", "residual", "intensity")))
    return report, (xl, masks, s)


def _stamp(path):
    """A file's inode and modification time (None if it is gone): a rewrite, atomic or not, changes them."""
    try:
        s = path.stat()
    except OSError:
        return None
    return s.st_ino, s.st_mtime_ns


def evaluate(args):
    model = Path(args.out) / "model.pt"
    stamp = _stamp(model)  # the report describes the model.pt read now: saved only if it is still the one there
    ckpt, vqvae, prior, device = _load(args, need_prior=True)
    judge = _judge(args, ckpt, prior, device) if args.judge else None
    data = _own_data(ckpt)
    if not (writable := os.access(args.out, os.W_OK)):  # said now, not after the report's minutes
        print(f"{args.out} is read-only to you: the report will be printed, not saved in its summary.json")
    report = realism_report(vqvae, prior, data["test"], data["train"], args.seed, device, rot90=ckpt["data"]["rot90"],
                            temperature=args.temperature, position=data["positions"]["test"], repeats=args.repeats,
                            judge=judge)
    report.update(lesion_report(vqvae, prior, data["test"], data["positions"]["test"], _surprise_settings(ckpt, vqvae, prior, data),
                                args.seed)[0])
    path = Path(args.out) / "summary.json"
    summary = read_summary(path)
    if not writable:
        print(f"not saved: {args.out} is read-only to you; the report is above")
    elif _stamp(model) != stamp:
        print(f"not saved: {model} changed while the report ran (a train.py writing there?); the report is above")
    elif summary and summary.get("vqvae_fingerprint") == ckpt.get("vqvae_fingerprint"):  # it describes this model.pt
        # the report's figures, whole: a run without --judge leaves no judge figures of an earlier one
        summary = {k: v for k, v in summary.items() if not k.startswith(("two_sample_", "judge_"))}
        vq.save_json(path, {**summary, **report})
        print(f"added to {path}")
    else:
        print(f"not saved: {path} {'describes another model' if summary else 'is missing or unreadable'}; "
              "the report is above")
    return report


def read_summary(path):
    """The figures of a summary.json; {} when it is missing or unreadable (half written by a version
    without atomic writes: its figures are lost, which is not fatal)."""
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}


def main(argv=None):
    """Parse flags and run; user errors print one line and exit with code 2."""
    args = parse_args(argv)
    try:
        if args.reconstruct:
            return reconstruct(args)
        if args.surprise:
            return surprise(args)
        if args.evaluate:
            return evaluate(args)
        if args.blind:
            return blind(args)
        return bench(args) if args.bench else generate(args)
    except (UsageError, vq.CheckpointError, vq.DataError) as e:
        fail(str(e))
    except OSError as e:  # a full disk mid-write
        fail(f"{e.filename or 'a file'}: {e.strerror or e}")
    except (MemoryError, RuntimeError) as e:
        if not (why := out_of_memory(e)):
            raise
        fail(why + (": a smaller --n" if not (args.evaluate or args.reconstruct or args.surprise) else ""))
    except KeyboardInterrupt:  # Ctrl-C: one line; what was written stays, the model is only ever read
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        while _HELD:
            _HELD.pop().unlink(missing_ok=True)


def _terminated(signum, frame):  # SIGTERM (kill, a scheduler's stop) as Ctrl-C: what was written is said
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminated)
    main()
