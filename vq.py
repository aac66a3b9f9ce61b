"""VQ-VAE with a gated PixelCNN prior for 2D MRI slices, in one file.

Sections, top to bottom: data, metrics, building blocks, quantizer, VQ-VAE, prior, checkpoints.
Copy this file alone into another project: at top level it needs only torch and numpy
(nibabel is imported by the NIfTI reader, the Triton kernel is optional).
"""

import concurrent.futures
import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import warnings
import zlib
from dataclasses import dataclass, fields
from functools import lru_cache, partialmethod
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

try:  # the fused Triton search lives beside this file; without it the torch path below is used
    from kernels import nearest_code as _kernel_nearest_code
except ImportError:
    _kernel_nearest_code = None

# ----------------------------------------------------------------------------- data

SPLITS = ("train", "validate", "test")
PHANTOM_RECORD = ("seed", "n_train", "n_val", "n_test")  # a data record's "phantom" list: what draws the phantom set
SLICE_SUFFIXES = (".nii", ".nii.gz", ".png")
PERCENTILES = (0.5, 99.5)  # robust range per slice: a few hot pixels must not squash the contrast
CACHE_VERSION = 5  # part of the cache key: bump it whenever decoding or the cached metadata changes
CASE_ID = r"(?<![a-z])((case|patient|subject|pat)[-_]?\d+|sub-[a-z0-9]+)"  # in a file name: its patient
SLICE_Z = r"(.*slice_?)(\d+)(\.nii|\.nii\.gz|\.png|\.nii\.png)?"  # a file name: its volume, and Z, its slice's place
SERIAL_BELOW = 64  # fewer files than this decode in-process: a pool costs more than it saves


class DataError(ValueError):
    """A data problem the user can fix: bad path, nothing readable, a bad file under strict."""


class SkippedFileWarning(UserWarning):
    """A slice file that could not be read and was left out."""


class SplitWarning(UserWarning):
    """A plain folder was split file by file (its names carry no patient id), or is one split of a layout."""


class _IOFailure(Exception):
    """Reading a file failed (permissions, I/O, open files): says nothing about its content, so never cached."""


# A warm cache load repeats the same message from the same line, which the default
# once-per-location filter would hide; appended, so the user's own filters still win.
warnings.filterwarnings("always", category=SkippedFileWarning, append=True)


def _is_label_dir(name):
    return "_seg_" in f"_{name.lower()}_"  # keras_slices_seg_train, seg_test, ...


def _natural_key(name):
    # slice_2 before slice_10, so a volume's slices come out in anatomical order
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _slice_files(folder):
    """The slice files in folder, naturally sorted; label (seg_), dot files and PNGs beside NIfTI ones left out."""
    with os.scandir(folder) as entries:  # scandir: no extra stat per file on 11k-file folders
        names = [e.name for e in entries if e.name.lower().endswith(SLICE_SUFFIXES)  # the name first: is_dir()
                 and not e.name.lower().startswith(("seg_", ".")) and not e.is_dir()]  # fails on a symlink loop
    pngs = sorted((n for n in names if n.lower().endswith(".png")), key=_natural_key)
    if 0 < len(pngs) < len(names):  # pictures beside NIfTI slices (a samples folder's grid.png): one kind is read
        warnings.warn(f"skipped {len(pngs)} PNG file(s) beside the NIfTI slices in {folder} ({', '.join(pngs[:3])}"
                      f"{', ...' * (len(pngs) > 3)}): a folder is read as one kind", SkippedFileWarning, stacklevel=3)
        names = list(set(names) - set(pngs))
    return [folder / n for n in sorted(names, key=_natural_key)]


def _split_dirs(root):
    """Image sub-folders of root named like a split: keras_slices_train, ..._validate, test, ..."""
    names = {"train": ("train",), "validate": ("validate", "validation", "val"), "test": ("test",)}
    dirs = _subdirs(root)
    return {s: [d for d in dirs if d.name.lower().rsplit("_", 1)[-1] in names[s]] for s in SPLITS}


def _subdirs(root):
    return sorted(d for d in root.iterdir() if d.is_dir() and not _is_label_dir(d.name)
                  and not d.name.startswith((".", "__")))  # __MACOSX


def _case_id(name):
    """The patient a slice belongs to: its first CASE_ID, else the name less its last number (p07_s012 -> p07_s)."""
    m = re.search(CASE_ID, name, re.I)
    stem = re.sub(r"(\.nii)?(\.gz|\.png)?$", "", name, count=1, flags=re.I)
    return m.group().lower() if m else re.sub(r"\d+(?=\D*$)", "", stem)  # the last number is the slice's


def find_splits(root):
    """Map a data root to {"train", "validate", "test"}: sorted lists of slice paths, labels never included."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{'not a folder' if root.exists() else 'no such folder'}: {root}")
    dirs = _split_dirs(root)
    if not any(dirs.values()):  # maybe the zip's own top folder (X/keras_slices_data/keras_slices_*)
        nested = [d for d in _subdirs(root) if any(_split_dirs(d).values())]
        if len(nested) > 1:
            raise DataError(f"{root} holds several data sets ({', '.join(d.name for d in nested)}): pass one")
        if nested:
            root, dirs = nested[0], _split_dirs(nested[0])
    if any(dirs.values()):
        for s, ds in dirs.items():
            if len(ds) != 1:
                raise DataError(f"{root} has no {s} folder (a name ending in _{s}, beside "
                                f"{', '.join(d[0].name for d in dirs.values() if d)})" if not ds else
                                f"{root} has several {s} folders: {', '.join(d.name for d in ds)}")
        return {s: _resolve(ds[0])[0] for s, ds in dirs.items()}  # an empty one: named
    if all((up := _split_dirs(root.parent)).values()) and any(root in ds for ds in up.values()):  # one scan
        warnings.warn(f"{root} is one split of the layout in {root.parent}, so it is split again on its own (--data "
                      f"{root.parent} reads the layout's train / validate / test)", SplitWarning, stacklevel=2)
    return _split_by_case(root)


def _split_by_case(root):
    """A plain folder: whole cases go to one split, ranked by a salt-free hash (reproducible, ~80/10/10). A case is a
    sub-folder where root holds folders of slices and no slice of its own (root/patient_7/*.nii), else as named."""
    files, cases = _slice_files(root), {d.name: fs for d in _subdirs(root) if (fs := _slice_files(d))}
    if files and cases:  # one kind is read: the loose files, grouped by name
        warnings.warn(f"{root} holds slice files and folders of slices ({', '.join(sorted(cases)[:3])}, ...): the "
                      "folders are not read (move the loose files into one)", SplitWarning, stacklevel=3)
    if files or not cases:
        files, cases = files or _resolve(root)[0], {}  # none: a label folder, or one without slices: said so
        for f in files:
            cases.setdefault(_case_id(f.name), []).append(f)
        if len(cases) < 3 <= len(files) and not any(re.fullmatch(CASE_ID, c) for c in cases):  # img_7, scan7
            warnings.warn(f"{root}: the file names carry no patient id (such as case_XXX), so the folder is split "
                          "file by file (a volume file stays whole, a patient's slice files may not); give it train / "
                          "validate / test sub-folders to split by patient", SplitWarning, stacklevel=3)
            cases = {f.name: [f] for f in files}
    if len(cases) < 3:
        raise DataError(f"{root} needs train/validate/test sub-folders or slices from at least 3 cases "
                        f"(found {len(cases)}: {', '.join(sorted(cases))})")
    # ranking (not bucketing) the hashes guarantees every split at least one case
    order = sorted(cases, key=lambda c: hashlib.sha1(c.encode()).hexdigest())
    k = max(1, round(0.1 * len(order)))
    groups = {"validate": order[:k], "test": order[k:2 * k], "train": order[2 * k:]}
    return {s: sorted((f for c in groups[s] for f in cases[c]), key=lambda f: _natural_key(str(f))) for s in SPLITS}


def _read(path):
    """One file's raw array as float32, singleton axes squeezed."""
    try:  # the only I/O: what fails after this is about the file's content
        raw = path.read_bytes()
    except OSError as e:
        raise _IOFailure(f"{type(e).__name__}: {e}") from None
    if path.name.lower().endswith(".png"):
        try:
            from PIL import Image
        except ImportError:
            raise DataError("reading PNG slices needs Pillow: pip install pillow") from None
        try:
            with Image.open(io.BytesIO(raw)) as im:
                a = np.asarray(im if im.mode in ("L", "I", "I;16", "F") else im.convert("L"))
        except Image.UnidentifiedImageError:  # its message names a buffer object, not the file
            raise ValueError("not an image Pillow can read") from None
    else:
        import nibabel as nib
        if not raw:
            raise ValueError("empty file")
        if raw[:2] == b"\x1f\x8b":  # one zlib call (it releases the GIL); gzip's loop for multi-member files
            z, packed = zlib.decompressobj(31), raw
            raw = z.decompress(packed)  # corrupt: a zlib.error, said as such in _decode_chunk
            raw = gzip.decompress(packed) if z.unused_data else raw
            if not z.eof:
                raise ValueError("cut short: its gzip data end early (a copy stopped part way?)")
        sizeof_hdr = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
        if not sizeof_hdr & {348, 540}:
            raise ValueError("not a NIfTI file (no NIfTI-1/2 header)")
        # header + data_from_fileobj: what img.dataobj reads (stored dtype, scl_slope applied, never
        # float64 by default), without building an image: 3x less time than nib.load on a small slice
        kind = nib.Nifti2Header if 540 in sizeof_hdr else nib.Nifti1Header
        a = kind.from_fileobj(io.BytesIO(raw), check=False).data_from_fileobj(io.BytesIO(raw))
    a = np.abs(a) if np.iscomplexobj(a) else a  # complex MR data: its magnitude, as scanners display it
    with np.errstate(over="ignore"):  # beyond float32: inf, zeroed and counted with NaN as non-finite
        return np.array(np.squeeze(a), dtype=np.float32)  # a writable copy: non-finite values are zeroed in place


def _normalise(x):
    """(k, h, w) -> (k, h, w) in [0, 1] per slice, percentile range; constant slices become zeros."""
    flat = x.reshape(len(x), -1)
    ks = [round(q / 100 * (flat.shape[1] - 1)) for q in PERCENTILES]
    lo, hi = np.partition(flat, ks, axis=1)[:, ks].T
    sparse = hi <= lo  # e.g. > 99.5% background: keep what little there is via the full range
    lo[sparse], hi[sparse] = flat[sparse].min(1), flat[sparse].max(1)
    scale = np.divide(1, hi - lo, out=np.zeros_like(lo), where=hi > lo)
    return np.clip((x - lo[:, None, None]) * scale[:, None, None], 0, 1)


@lru_cache(maxsize=64)
def _resample_matrix(n_in, n_out, n_pad):
    """(n_pad, n_in): antialiased linear resampling to n_out samples, centred between zero rows."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # widening the triangle when shrinking is the antialiasing
    centre = (np.arange(n_out) + 0.5) * scale - 0.5
    w = np.maximum(0, 1 - np.abs(np.arange(n_in)[None, :] - centre[:, None]) / support)
    m = np.zeros((n_pad, n_in), np.float32)
    top = (n_pad - n_out) // 2
    m[top:top + n_out] = w / w.sum(1, keepdims=True)
    return m


def _fit(x, size):
    """(k, h, w) -> (k, H, W): scale by min(H/h, W/w), then zero-pad, centred."""
    (H, W), (h, w) = size, x.shape[1:]
    if (h, w) == (H, W):
        return x
    s = min(H / h, W / w)
    nh, nw = min(H, max(1, round(h * s))), min(W, max(1, round(w * s)))
    return _resample_matrix(h, nh, H) @ x @ _resample_matrix(w, nw, W).T  # (k, H, W)


def _decode_file(path, size):
    """One file -> ((k, H, W) float16 in [0, 1], count of NaN/inf zeroed)."""
    a = _read(path)
    if a.ndim not in (2, 3):
        raise ValueError(f"{a.ndim}-D array {a.shape} after squeezing, expected a 2-D slice or a 3-D stack")
    x = a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)  # (k, h, w): one image per slice on the last axis
    bad = ~np.isfinite(x)
    x[bad] = 0
    return _fit(_normalise(x), size).astype(np.float16), int(bad.sum())


def _decode_chunk(files, size):
    """Decode files -> ([(k, H, W) or None when skipped], [(path, reason)], [(path, NaN count) where not 0],
    whether a failure was about reading rather than content)."""
    done, skipped, nonfinite, transient = [], [], [], False
    for f in files:
        try:
            x, nf = _decode_file(f, size)
        except DataError:
            raise
        except Exception as e:  # nibabel, gzip and numpy raise many kinds; each is "this file is bad", unless
            retry = isinstance(e, (_IOFailure, ImportError, MemoryError))  # it may be fixed without touching the file
            name = "corrupt gzip data" if isinstance(e, zlib.error) else type(e).__name__  # zlib's is "error"
            why = str(e) if type(e) is ValueError or retry and str(e) else f"{name}: {e}"
            skipped.append((str(f), why.splitlines()[0] + (" (not cached: read again next time)" if retry else "")))
            x, nf, transient = None, 0, transient or retry
        nonfinite += [(str(f), nf)] * (nf > 0)
        done.append(x)
    return done, skipped, nonfinite, transient


def _cpu_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_all(files, size, strict, workers):
    """Decode files in order on a thread pool (zlib, nibabel's reads, numpy free the GIL): (N, H, W) float16, info."""
    workers = max(1, workers or _cpu_count())
    chunk = min(256, max(16, len(files) // (workers * 4) + 1))  # a few tasks per worker balance the load
    chunks = [files[i:i + chunk] for i in range(0, len(files), chunk)]
    parts, skipped, nonfinite, transient, counts = [], [], [], False, []
    with concurrent.futures.ThreadPoolExecutor(1 if len(files) < SERIAL_BELOW else min(workers, len(chunks))) as pool:
        try:
            for got, bad, nf, tr in pool.map(_decode_chunk, chunks, [size] * len(chunks)):  # in order
                if strict and bad:
                    raise DataError(f"unreadable slice file {bad[0][0]} ({bad[0][1]})")
                parts += [x for x in got if x is not None]
                counts += [0 if x is None else len(x) for x in got]
                skipped, nonfinite, transient = skipped + bad, nonfinite + nf, transient or tr
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the chunks not yet started are dropped
            raise
    info = {"skipped": skipped, "nonfinite": nonfinite, "files": len(files), "transient": transient, "counts": counts}
    return np.concatenate(parts or [np.zeros((0, *size), np.float16)]), info


def _cache_file(files, size, cache_dir):
    """Where this exact file list decoded at size is cached; None when off (ctime too: cp -p and tar keep mtimes)."""
    if cache_dir is False:
        return None
    root = Path(cache_dir or os.environ.get("VQ_CACHE_DIR") or "~/.cache/vq_slices").expanduser()  # ~ set in a script
    prints = []
    for f in files:
        try:
            st = f.stat()
            prints.append((os.path.abspath(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        except OSError:
            prints.append((os.path.abspath(f), -1))
    key = json.dumps([CACHE_VERSION, list(size), PERCENTILES, prints])
    return root / f"slices_{hashlib.sha1(key.encode()).hexdigest()}.npy"


def _atomic_write(path, write):
    """Write via a temporary file and os.replace, so a reader never sees half a file."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        mask = os.umask(0)  # the only way to read the umask is to set it
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 would hide the file from colleagues
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:  # gone already when a signal came after os.replace
            Path(tmp).unlink(missing_ok=True)
        why = e if isinstance(e, OSError) else e.__context__  # torch.save wraps a failed write in a RuntimeError
        if isinstance(why, OSError):  # a full disk: one OSError naming the file, whoever wrote it
            raise OSError(why.errno, why.strerror or f"write cut short ({why or 'no reason given'}): a full disk?",
                          str(path)) from None  # NumPy's short write has no errno
        raise


def _write_cache(path, arr, meta):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda f: np.save(f, arr))
        _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))  # last: marks complete
    except OSError as e:
        why = "it is a file, not a folder" if path.parent.is_file() else e.strerror
        warnings.warn(f"could not write the slice cache in {path.parent}: {why}", stacklevel=3)


def _read_cache(path):
    try:
        meta = json.loads(path.with_suffix(".json").read_text())  # written last, so its presence means complete
        if not {"skipped", "nonfinite", "files", "transient", "counts"} <= set(meta):
            return None  # written by another version: decode again
        return np.load(path, mmap_mode="c"), meta  # copy-on-write: writable for torch, pages read once
    except (OSError, ValueError):
        return None


def _resolve(src):
    """files_or_folder -> (list of paths, how to name it in messages)."""
    if isinstance(src, (str, os.PathLike)):
        src = Path(src)
        if src.is_file():
            return [src], str(src)
        if not src.is_dir():
            raise DataError(f"no such file or folder: {src}")
        if _is_label_dir(src.name):
            raise DataError(f"{src} is a label folder (*_seg_*), not images")
        files = _slice_files(src)
        if not files:
            raise DataError(f"no slice files (.nii, .nii.gz, .png) in {src}")
        return files, str(src)
    files = [Path(f) for f in src]
    if not files:
        raise DataError("no slice files given")
    return files, f"{len(files)} files from {files[0].parent}"


def load_slices(files_or_folder, size=(256, 128), strict=False, cache_dir=None, workers=None, info=None):
    """Read 2D MR slices into one float tensor (N, 1, H, W) in [0, 1].

    files_or_folder: a folder (its .nii / .nii.gz / .png slice files, naturally sorted; label files named seg_* and
    *_seg_* folders are never read, nor PNG files beside NIfTI ones), a single file, or a list of files (kept in order).
    Each file: singleton axes squeezed; a 2-D array is one image, a 3-D array one per index of its last axis; NaN/inf
    set to 0; each image mapped to [0, 1] by its 0.5 / 99.5 percentiles (a constant one to zeros), scaled by min(H/h,
    W/w) (antialiased linear, aspect kept, untouched when already H x W) and zero-padded, centred, to size (H, W). Array
    axis 0 stays H, as stored.

    Unreadable files (corrupt, empty, not NIfTI, not 2-D/3-D) are each named in a SkippedFileWarning and left out;
    strict=True raises DataError on the first one. DataError for a missing folder or nothing readable. PNG needs Pillow.
    Decoding runs on `workers` threads (default: all cores; serial under 64 files); the result is cached as float16
    (float16-exact either way) in cache_dir (default $VQ_CACHE_DIR, else ~/.cache/vq_slices; False: off), keyed by each
    file's path, size, mtime, ctime and inode, size and the preprocessing version; a warm load repeats the warnings.

    info: if a dict, filled with {"skipped": [(path, reason), ...], "nonfinite": NaN/inf zeroed, "files", "cached",
    "positions": each image's position in its volume in [0, 1] (Z / the largest Z of its volume for names like
    case_004_week_0_slice_Z; k / (n - 1) for image k of an n-slice file), or None without slice numbers}.
    """
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and min(size) >= 1):
        raise ValueError(f"size must be (H, W), each at least 1, got {size}")
    files, where, size = *_resolve(files_or_folder), (int(size[0]), int(size[1]))
    path = _cache_file(files, size, cache_dir)
    hit = _read_cache(path) if path else None
    arr, meta = hit if hit else _decode_all(files, size, strict, workers)
    skipped, zeroed = [tuple(s) for s in meta["skipped"]], sum(n for _, n in meta["nonfinite"])
    if info is not None:
        info.update(skipped=skipped, nonfinite=zeroed, files=meta["files"], cached=hit is not None,
                    positions=_positions(files, meta["counts"]))
    if strict and skipped:
        raise DataError(f"unreadable slice file {skipped[0][0]} ({skipped[0][1]})")
    for p, why in skipped:
        warnings.warn(f"skipped {p}: {why}", SkippedFileWarning, stacklevel=2)
    if zeroed:  # named by the first file holding any
        (first, _), more = meta["nonfinite"][0], len(meta["nonfinite"]) - 1
        warnings.warn(f"{zeroed} NaN/inf values set to 0 in {first}" + f" and {more} more" * (more > 0)
                      + f", of {where}" * (where != first), stacklevel=2)
    if len(arr) == 0:
        raise DataError(f"no readable slices in {where} ({len(skipped)} skipped: {skipped[0][0]}: {skipped[0][1]}"
                        + ", ..." * (len(skipped) > 1) + ")")
    if path and not hit and not meta["transient"]:  # only verdicts about content are kept
        _write_cache(path, arr, meta)
    return torch.from_numpy(arr).to(torch.float32).unsqueeze(1)  # (N, 1, H, W)


def _positions(files, counts, scan=True):
    """Each decoded image's position in its volume, from slice_Z in the names; None if a name has none."""
    z = lambda f: re.fullmatch(SLICE_Z, f.name.lower())  # noqa: E731
    top, folders = {}, {f.parent for f in files} if scan else ()  # scan=False: files are their folders' every slice
    with warnings.catch_warnings():  # each volume's (name less Z) largest Z in its whole folder: one scale a split
        warnings.simplefilter("ignore", SkippedFileWarning)
        for f in [*files, *(g for d in folders for g in _slice_files(d))]:
            if m := z(f):
                top[f.parent, m[1]] = max(top.get((f.parent, m[1]), 0), int(m[2]))
    found, pos = map(z, files), []
    for f, m, n in zip(files, found, counts):
        if n > 1:  # a volume in one file: its own slice order
            pos += (np.arange(n) / (n - 1)).tolist()
        elif n == 1:
            if not m:
                return None
            pos.append(int(m[2]) / max(1, top[f.parent, m[1]]))
    return pos


def _phantom_params(rng, aspect, level=None):
    """One slice's anatomy: centres and half-axes in units of half the image height, grey values."""
    u = rng.uniform
    drawn = u(0, 1)  # 0: femoral heads and a full bladder ... 1: prostate apex, pubic bones, no bladder
    level = drawn if level is None else level  # drawn all the same, so the other draws stay in step
    mid = math.sin(math.pi * level) ** 0.5  # the prostate is widest mid-gland
    full = (1 - level) * u(0.3, 1.0) * (level < 0.75)  # bladder filling
    p = dict(A=0.88 * aspect * u(0.92, 1.04), B=0.88 * u(0.92, 1.04),
             cx=u(-0.04, 0.04) * aspect, cy=u(-0.05, 0.05), fat=u(0.68, 0.82), muscle=u(0.18, 0.28),
             rim=u(0.10, 0.20), rim_back=u(0.1, 0.4), plane=u(0.4, 0.6),
             cav_w=u(0.42, 0.52), cav_h=u(0.62, 0.72), cav=u(0.45, 0.6), marrow=u(0.4, 0.6),
             head_r=(0.33 - 0.12 * level) * u(0.9, 1.1), head_y=u(-0.05, 0.15), bone_w=u(0.12, 0.18),
             bl_x=u(-0.05, 0.05), bl_w=0.08 + 0.42 * full, bl_h=(0.06 + 0.3 * full) * u(0.8, 1.1),
             bl=u(0.88, 1.0) * (full > 0.05), pr_x=u(-0.03, 0.03), pr_y=u(0.05, 0.18),
             pr_w=(0.1 + 0.18 * mid) * u(0.9, 1.1), pr_h=(0.08 + 0.14 * mid) * u(0.9, 1.1),
             pz=u(0.55, 0.7) * (level > 0.15), tz=u(0.3, 0.42), rect_r=u(0.11, 0.17), gap=u(0.02, 0.06),
             lumen=u(0.02, 0.08) if u() < 0.6 else u(0.35, 0.5), pubis=float(level > 0.45))
    p.update({f"bias{k}": b for k, b in enumerate(rng.normal(0, 0.06, 5))})
    return p


@lru_cache(maxsize=16)
def _taps(n_in, n_out):
    """Linear up-sampling n_in -> n_out samples: lower index, upper index, upper weight."""
    c = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(c).astype(int)
    return i0, np.minimum(i0 + 1, n_in - 1), (c - i0).astype(np.float32)


def _stretch(a, n):
    """(b, r, c) -> (b, n, c): linear up-sampling along axis 1, whole rows at a time (cheap)."""
    i0, i1, w = _taps(a.shape[1], n)
    lo = a[:, i0]
    return lo + (a[:, i1] - lo) * w[:, None]


def _draw_phantoms(indices, size, seed, labels=False, levels=None):
    """Phantom slices for these indices (at these levels, else drawn) -> (n, H, W) float32 in [0, 1]
    and (n, H, W) uint8 labels or None."""
    H, W = size
    R, C = W, H  # drawn in display orientation (rows x cols = W x H), rotated back at the end
    R2, C2 = max(4, -(-R // 2)), max(4, -(-C // 2))  # drawn at half size; upsampling is the ~1 px blur
    aspect, px = C / R, 2 / R2
    xs = ((np.arange(C2) + 0.5) / C2 * 2 - 1) * aspect
    ys = (np.arange(R2) + 0.5) / R2 * 2 - 1
    X, Y = xs.astype(np.float32)[None, None, :], ys.astype(np.float32)[None, :, None]  # (1, 1, C2), (1, R2, 1)
    rngs = [np.random.default_rng([seed, i]) for i in indices]
    ps = [_phantom_params(r, aspect, None if levels is None else levels[k]) for k, r in enumerate(rngs)]
    v = {k: np.array([p[k] for p in ps], np.float32)[:, None, None] for k in ps[0]}  # each (n, 1, 1)
    img = np.zeros((len(ps), R2, C2), np.float32)
    lab = np.zeros(img.shape, np.uint8) if labels else None

    # Each shape works on the box holding every slice's copy of it (outside, its mask is exactly 0),
    # and uses only +, -, *, /, sqrt on pixels (exactly rounded), so no slice depends on its batch.
    def ellipse(cx, cy, ax, ay, reach=0.0):  # -> (~signed distance in low-res px, box)
        m = reach + 3 * px * np.sqrt(np.maximum(ax / ay, ay / ax))  # beyond this the mask is 0
        box = (slice(np.searchsorted(ys, (cy - ay - m).min()), np.searchsorted(ys, (cy + ay + m).max())),
               slice(np.searchsorted(xs, (cx - ax - m).min()), np.searchsorted(xs, (cx + ax + m).max())))
        q = np.sqrt(((X[..., box[1]] - cx) / ax) ** 2 + ((Y[:, box[0]] - cy) / ay) ** 2)  # (n, r, c)
        return (q - 1) * (np.sqrt(ax * ay) / px), box

    def rounded_box(cx, cy, ax, ay):  # between an ellipse and a rectangle, like a pelvis outline
        x2, y2 = ((X - cx) / ax) ** 2, ((Y - cy) / ay) ** 2
        d = (0.6 * (x2 + y2) + 0.4 * (x2 * x2 + y2 * y2) - 1) * (np.sqrt(ax * ay) / (2.2 * px))
        return d, (slice(None), slice(None))

    def paint(shape, value, inset=0.0, width=None, on=1.0, label=None):  # fill d < -inset, or ring |d| < width
        d, box = shape
        mask = np.clip((0.5 - inset / px) - d if width is None else (0.5 + width / px) - np.abs(d), 0, 1) * on
        view = img[(slice(None), *box)]
        view += mask * (value - view)
        if labels and label is not None:
            lab[(slice(None), *box)][mask > 0.5] = label

    def walled(g, inner, inset, wall=0.05, label=2, on=1.0):  # a wall (bone cortex, rectal wall), inner inset within
        paint(g, wall, on=on, label=label)
        paint(g, inner, inset=inset, on=on)

    A, B, cx, cy = v["A"], v["B"], v["cx"], v["cy"]
    paint(rounded_box(cx, cy, A, B), v["fat"], label=1)
    rim = v["rim"] * B
    paint(rounded_box(cx, cy + v["rim_back"] * rim, A - rim, B - rim * (1 + v["rim_back"])), v["muscle"])
    for side in (-1, 1):  # fat planes between the gluteal muscles, posterior arcs only
        g = ellipse(cx + side * 0.6 * A, cy + 0.45 * B, 0.45 * B, 0.35 * B, reach=0.012)
        back = np.clip((Y[:, g[1][0]] - cy - 0.3 * B) / (0.2 * B), 0, 1)
        paint(g, v["plane"] * v["fat"], width=0.012, on=back)
    cw, ch, cyc = v["cav_w"] * B, v["cav_h"] * B, cy + 0.05 * B
    paint(ellipse(cx, cyc, cw, ch), v["cav"])
    bw, hr = v["bone_w"] * B, v["head_r"] * B
    for side in (-1, 1):  # ischium / acetabulum, the femoral head in its cup, pubic bones on low slices
        walled(ellipse(cx + side * (cw + 0.7 * bw), cyc, bw, 0.75 * ch), v["marrow"], 0.05)
        walled(ellipse(cx + side * (cw + 1.3 * bw + 0.7 * hr), cy + v["head_y"] * B, hr, hr), v["marrow"] + 0.05, 0.06)
        walled(ellipse(cx + side * 0.13 * B, cyc - ch, 0.1 * B, 0.15 * B), v["marrow"], 0.04, on=v["pubis"])
    g = ellipse(cx + v["bl_x"] * B, cyc - 0.75 * ch + v["bl_h"] * B, v["bl_w"] * B, v["bl_h"] * B, reach=0.015)
    on = (v["bl"] > 0).astype(np.float32)
    paint(g, v["bl"], on=on, label=3)
    paint(g, 0.2, width=0.015, on=on)  # bladder wall
    qx, qy, qw, qh = cx + v["pr_x"] * B, cy + v["pr_y"] * B, v["pr_w"] * B, v["pr_h"] * B
    rr = v["rect_r"] * B
    walled(ellipse(qx, qy + qh + v["gap"] * B + rr, rr, rr), v["lumen"], 0.05, wall=0.15, label=4)
    on = (v["pz"] > 0).astype(np.float32)
    g = ellipse(qx, qy, qw, qh, reach=0.012)
    paint(g, v["pz"], on=on, label=5)  # peripheral zone: brighter, posterior
    paint(ellipse(qx, qy - 0.25 * qh, 0.8 * qw, 0.7 * qh), v["tz"], on=on)
    paint(g, 0.2, width=0.012, on=on)  # capsule

    b = [v[f"bias{k}"] for k in range(5)]  # smooth multiplicative coil field
    img *= 1 + b[0] * X + b[1] * Y + b[2] * X * Y + b[3] * X * X + b[4] * Y * Y
    # coarse tissue texture: learnable at 4x down-sampling, unlike white noise
    tex = np.stack([r.random((max(2, R2 // 6), max(2, C2 // 6)), dtype=np.float32) for r in rngs])
    img *= 1 + 0.2 * (_stretch(_stretch(tex, R2).transpose(0, 2, 1), C2).transpose(0, 2, 1) - 0.5)
    img = np.ascontiguousarray(np.rot90(_stretch(img, R), -1, axes=(1, 2)))  # (n, C2, R): np.rot90 shows it upright
    img = _stretch(img, C)  # (n, H, W)
    noise = np.stack([r.random((H, W), dtype=np.float32) for r in rngs]) - 0.5  # uniform: 4x cheaper than normal
    # std 0.004: a perfect denoiser scores SSIM 0.97 against these; at std 0.01 it would be capped near 0.88
    img = np.clip(np.abs(img + 0.014 * noise), 0, 1)  # abs: magnitude images, Rician-like background
    if labels:
        rows, cols = (np.arange(R) * R2 // R), (np.arange(C) * C2 // C)  # nearest neighbour
        lab = np.ascontiguousarray(np.rot90(lab[:, rows][:, :, cols], -1, axes=(1, 2)))
    return img, lab


def phantom_positions(n, seed=0):
    """The level of each of phantom_slices(n, seed=seed), in [0, 1]: the slice's position in its volume."""
    return torch.tensor([np.random.default_rng([seed, i]).uniform(0, 1) for i in range(n)], dtype=torch.float32)


def phantom_slices(n, size=(256, 128), seed=0):
    """Synthetic pelvis-like axial T2 MR slices (n, 1, H, W) in [0, 1]; slice i depends only on (seed, i)."""
    out = np.empty((n, *size), np.float32)
    for i in range(0, n, 32):  # batches small enough to stay in cache
        out[i:i + 32] = _draw_phantoms(range(i, min(n, i + 32)), size, seed)[0]
    return torch.from_numpy(out).unsqueeze(1)  # (N, 1, H, W)


def files_digest(files, root):  # which files (names under root, the folder they were found in; sizes) sit where
    return hashlib.sha1(json.dumps([[k, os.path.relpath(f, root), f.stat().st_size if f.exists() else -1]
                                    for k in SPLITS for f in files[k]]).encode()).hexdigest()


def load_splits(settings, strict=False, files=None):
    """The train / validate / test slices that settings describe: {"source": a data root, or None for
    the phantom set, "size": [H, W], "phantom": [seed, n_train, n_val, n_test] (phantom only)}, as
    stored in a checkpoint's "data". files: find_splits(source), if already found.

    Returns a dict: "train", "validate", "test" (N, 1, H, W); "positions": split -> (N,) slice
    positions, or None for every split when some names carry none; "settings": what loads the same
    slices again (source resolved, plus "rot90": the np.rot90 that shows them upright, and "files": their
    files_digest); "skipped": [{"file", "reason"}] of the files left out (each also a SkippedFileWarning)."""
    size = [int(s) for s in settings["size"]]
    if settings.get("phantom"):  # one seed per split, so the splits share no slice; a level is a position
        seed, *counts = settings["phantom"]
        data = {k: phantom_slices(n, size, seed=1000 * seed + i) for i, (k, n) in enumerate(zip(SPLITS, counts))}
        positions = {k: phantom_positions(n, seed=1000 * seed + i) for i, (k, n) in enumerate(zip(SPLITS, counts))}
        source = f"phantom seed {seed}: {' / '.join(map(str, counts))} slices"
        return dict(data, positions=positions, skipped=[],
                    settings={"source": source, "size": size, "rot90": 1, "phantom": [seed, *counts]})
    files = files or find_splits(settings["source"])
    kinds = {k: "/".join(sorted({("NIfTI", "PNG")[f.name.lower().endswith(".png")] for f in files[k]})) for k in SPLITS}
    if len(set(kinds.values())) > 1:  # one rot90 for all
        raise DataError(f"the splits of {settings['source']} mix PNG and NIfTI slices "
                        f"({', '.join(f'{k} {v}' for k, v in kinds.items())}): give one kind")
    infos = {k: {} for k in SPLITS}
    data = {k: load_slices(files[k], size, strict=strict, info=infos[k]) for k in SPLITS}
    skipped = [{"file": str(p), "reason": r} for info in infos.values() for p, r in info["skipped"]]
    found = [info["positions"] for info in infos.values()]  # a prior conditioned on positions needs them everywhere
    positions = dict.fromkeys(SPLITS) if None in found else {k: torch.tensor(p) for k, p in zip(SPLITS, found)}
    settings = {"source": str(Path(settings["source"]).resolve()), "size": size, "rot90": int(kinds["train"] != "PNG"),
                "files": files_digest(files, settings["source"])}  # as found: under a symlinked folder, say
    return dict(data, positions=positions, skipped=skipped, settings=settings)


# ----------------------------------------------------------------------------- metrics


def _blur(t, sigma=1.5, valid=False):
    """Gaussian blur of t's last two axes (sigma 0: none), the 'valid' outputs only or all with zero padding, by two
    banded matmuls: on a CPU 5 to 20 times faster than one-channel convolutions, forward and backward."""
    if not sigma:
        return t
    radius = int(3.5 * sigma + 0.5)  # scikit-image's rule (truncate 3.5): radius 5, window 11 for sigma 1.5
    g = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=t.device, dtype=t.dtype) / sigma) ** 2)
    g, k = g / g.sum(), len(g)

    def band(n):  # (m, n): output i weighs input j by g[j - i (+ k // 2 with padding)], 0 off the window
        m = n - k + 1 if valid else n
        d = torch.arange(n, device=t.device) - torch.arange(m, device=t.device)[:, None] + (0 if valid else k // 2)
        return g[d.clamp(0, k - 1)].where((d >= 0) & (d < k), 0)

    return band(t.shape[-2]) @ t @ band(t.shape[-1]).mT


def _ssim_terms(x, y, data_range=1.0):
    """x, y (B, 1, H, W) -> (SSIM per pixel of the valid region (B, H-10, W-10), local mean of x), in x's dtype."""
    # the local moments over the 'valid' region only, the border scikit-image crops away: (B, H-10, W-10) each
    ux, uy, uxx, uyy, uxy = _blur(torch.stack([x, y, x * x, y * y, x * y], 1)[:, :, 0], valid=True).unbind(1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2)), ux


def ssim(x, y, data_range=1.0, foreground=None):
    """Structural similarity per image (B,) float32, equal to scikit-image's `structural_similarity(
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range)` (window 11, K1 0.01, K2 0.03,
    averaged over the pixels at least 5 from the border). x, y: (B, C, H, W) (C > 1: the mean over channels, as its
    channel_axis), (B, H, W) or (H, W), H and W at least 11; x is the original. foreground: None, or a fraction of
    data_range: average only over the body, where the Gaussian-weighted local mean of x exceeds it (0.1 leaves out the
    black background, whose easy SSIM would flatter a blurry reconstruction); NaN for an image with no such pixel."""
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, c = (len(x), math.prod(x.shape[1:-2])) if x.dim() > 2 else (1, 1)  # images, and channels averaged
    x, y = (t.reshape(-1, 1, *t.shape[-2:]) for t in (x, y))  # (B C, 1, H, W) each
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11 x 11, got {tuple(x.shape[-2:])}")
    # float64 on every device: float32 loses digits in E[x^2] - E[x]^2, and a GPU may run float32 in TF32
    s, ux = _ssim_terms(x.double(), y.double(), data_range)
    body = torch.ones_like(s) if foreground is None else (ux > foreground * data_range).double()  # where it counts
    return ((s * body).sum((-2, -1)) / body.sum((-2, -1))).view(n, c).mean(1).float()


def psnr(x, y, data_range=1.0):
    """Peak signal-to-noise ratio in dB per image, (B,) float32, of its mean squared error; x, y as for ssim."""
    if x.shape != y.shape or x.dim() < 2:
        raise ValueError(f"psnr needs equal shapes of images, got {tuple(x.shape)} and {tuple(y.shape)}")
    d = (x.float() - y.float()).pow(2)
    mse = (d.flatten(1) if x.dim() > 2 else d.flatten()[None]).mean(1)  # per image
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10 * data_range**2))  # identical: 100 dB at any range


# ----------------------------------------------------------------------------- building blocks


class ResBlock(nn.Module):
    """Pre-activation residual block: 3x3 then 1x1 convolution."""

    def __init__(self, channels):
        super().__init__()
        C = channels
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 1))

    def forward(self, x):
        return x + self.net(x)


class Encoder(nn.Module):
    """Strided 4x4 convolutions halve the image log2(downsample) times, then residual blocks."""

    def __init__(self, in_channels, channels, code_dim, downsample, n_res_blocks):
        super().__init__()
        n = int(math.log2(downsample))  # 4 or 8 (VQVAEConfig), 2 for a top level
        widths = [channels // 2 ** (n - 1 - i) for i in range(n)]  # widen as resolution drops
        layers = []
        for i, (c, w) in enumerate(zip([in_channels, *widths], widths)):
            layers += [nn.Conv2d(c, w, 4, stride=2, padding=1)] + ([nn.ReLU()] if i < n - 1 else [])
        layers += [nn.Conv2d(widths[-1], channels, 3, padding=1), *(ResBlock(channels) for _ in range(n_res_blocks)),
                   nn.ReLU(), nn.Conv2d(channels, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        h = self.net[:-1](x)
        with torch.autocast(x.device.type, enabled=False):  # bf16 would round the vectors the quantizer sees
            return self.net[-1](h.float())


class Decoder(nn.Module):
    """Mirror of the encoder: residual blocks, then 4x4 transposed convolutions back to full size."""

    def __init__(self, out_channels, channels, code_dim, downsample, n_res_blocks):
        super().__init__()
        n = int(math.log2(downsample))  # 4 or 8 (VQVAEConfig), 2 for a top level
        layers = [nn.Conv2d(code_dim, channels, 3, padding=1), *(ResBlock(channels) for _ in range(n_res_blocks))]
        for i in range(n):  # halve the width as the resolution doubles, to out_channels at the end
            w = out_channels if i == n - 1 else channels // 2 ** (i + 1)
            layers += [nn.ReLU(), nn.ConvTranspose2d(channels // 2 ** i, w, 4, stride=2, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


# ----------------------------------------------------------------------------- quantizer


def _nearest_code_torch(z, codebook, chunk=8192):
    # Used only when vq.py is copied without kernels/: chunked so memory stays bounded for any N;
    # float64 on a GPU, where float32 matmuls may run in TF32.
    z, codebook = (z.double(), codebook.double()) if z.is_cuda else (z.float(), codebook.float())
    c_sq = codebook.pow(2).sum(1)
    # kernels.nearest_code's policy: a code with a NaN or an infinity scores inf, so it never wins while a
    # finite one exists (argmin would pick its NaN score for every row)
    finite = c_sq.isfinite()
    search, c_sq = codebook.where(finite[:, None], 0), c_sq.where(finite, math.inf)
    codes = torch.cat([torch.addmm(c_sq, zc, search.t(), alpha=-2).argmin(1) for zc in z.split(chunk)])
    return codes, (z - codebook[codes]).pow(2).sum(1).float()


def nearest_code(z, codebook):
    """Index of the nearest codebook row for every row of z, and its squared distance.

    z (N, D) and codebook (K, D), float. Returns int64 codes (N,) and float32 distances (N,). Uses
    `kernels.nearest_code` (fused Triton kernel on a GPU, chunked torch elsewhere) when the kernels package is
    importable, else a chunked torch search. N may be 0."""
    return (_kernel_nearest_code or _nearest_code_torch)(z, codebook)


def _histogram(codes, n_codes):
    """(N,) codes -> (K,) float counts; unlike bincount on a GPU, no host sync to size the output."""
    return torch.zeros(n_codes, device=codes.device).index_add_(0, codes, torch.ones(len(codes), device=codes.device))


def _all_reduce(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """EMA codebook with Laplace smoothing, commitment loss, dead-code restart, k-means init."""

    def __init__(self, n_codes, code_dim, beta=0.25, decay=0.99, dead_threshold=0.01, kmeans_init=True,
                 eps=1e-5):
        super().__init__()
        self.n_codes, self.code_dim, self.beta, self.decay = n_codes, code_dim, beta, decay
        self.dead_threshold, self.kmeans_init, self.eps = dead_threshold, kmeans_init, eps
        codebook = torch.randn(n_codes, code_dim) / math.sqrt(code_dim)
        self.register_buffer("codebook", codebook)  # (K, D)
        # Counts start at 1 with the matching sums, so codebook = embed_sum / count starts as the
        # initial codebook and an unused code decays toward it rather than dividing ~0 by ~0.
        self.register_buffer("cluster_size", torch.ones(n_codes))  # (K,) EMA of assignments
        self.register_buffer("embed_sum", codebook.clone())  # (K, D) EMA of assigned vectors
        self.register_buffer("initialised", torch.tensor(not kmeans_init))
        self._seeded = False  # a host copy of initialised, once it is True
        self.generator = None  # a torch.Generator for restarts; train.py sets and checkpoints it

    def forward(self, z, cost=None):
        """z (B, D, h, w) -> (z_q straight-through, codes (B, h, w), loss, stats). cost: None, or a function
        of the nearest codes (B, h, w) and their squared distances (N,) giving what each code would add to
        its squared distance (B, h, w, K): the code of least distance plus cost is chosen (entropy-constrained)."""
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA need float32
            z = z.float()
            B, D, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
            if self.training and not self._seeded:
                if not self.initialised:  # read once (a host sync), then known
                    self._kmeans(flat.detach())
                self._seeded = True
            if cost is None:
                codes, dist = nearest_code(flat.detach(), self.codebook)
            else:  # one N x K matrix gives the nearest codes, then the choice with their cost
                full = torch.cdist(flat.detach(), self.codebook).pow(2)  # (N, K)
                full = full.where(self.codebook.isfinite().all(1), math.inf)  # as nearest_code: never a NaN code
                least, nearest = full.min(1)
                codes = (full.view(B, h, w, self.n_codes) + cost(nearest.view(B, h, w), least)).argmin(-1).flatten()
                dist = full.gather(1, codes[:, None])[:, 0]
            counts = _histogram(codes, self.n_codes)  # (K,) no N x K one-hot
            if self.training:
                self._ema_update(flat.detach(), codes, counts, dist)
            z_q = self.codebook[codes].view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
            loss = self.beta * F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient reaches the encoder
            p = counts / counts.sum().clamp_min(1)
            stats = {"perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()),
                     "usage": (counts > 0).float().mean()}
        return z_q, codes.view(B, h, w), loss, stats

    @torch.no_grad()
    def _ema_update(self, flat, codes, counts, dist):
        counts = _all_reduce(counts.clone())  # every rank sees every rank's vectors
        embed_sum = _all_reduce(torch.zeros_like(self.embed_sum).index_add_(0, codes, flat))  # (K, D)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.n_codes * self.eps) * n  # Laplace
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        self._restart_dead(flat, dist, counts)

    @torch.no_grad()
    def _restart_dead(self, flat, dist, counts):
        # Dead: fewer assignments in this step than dead_threshold of an even share. Early in training the encoder's
        # outputs drift faster than the EMA codebook follows and leave codes behind; a test on the EMA counts would
        # notice only hundreds of steps later. counts are all-reduced, so every rank agrees on `dead`.
        dead = counts < self.dead_threshold * counts.sum() / self.n_codes
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        # Restart at vectors drawn in proportion to their squared distance from their code, as
        # k-means++ seeds: the worst-served data (often the anatomy, not the dominant background).
        w = dist.detach().double().cpu().nan_to_num(0.0, 0.0, 0.0).clamp_min(0) + 1e-12  # a diverged run: uniform
        pick = torch.multinomial(w, n_dead, replacement=n_dead > len(w), generator=self.generator).to(flat.device)
        self.codebook[dead] = flat[pick]
        share = self.cluster_size.sum() / self.n_codes
        self.cluster_size[dead] = share  # an even share of the EMA statistics, so it moves like the others
        self.embed_sum[dead] = flat[pick] * share
        self._broadcast()

    @torch.no_grad()
    def _kmeans(self, flat, iters=10):
        # Seed the codebook from the data so no code starts far from every encoder output.
        pick = torch.randint(len(flat), (self.n_codes,), generator=self.generator, device="cpu")
        centres = flat[pick.to(flat.device)].clone()  # (K, D)
        for _ in range(iters):
            codes, _ = nearest_code(flat, centres)
            counts = _histogram(codes, self.n_codes)
            sums = torch.zeros_like(centres).index_add_(0, codes, flat)
            used = counts > 0
            centres[used] = sums[used] / counts[used].unsqueeze(1)
        # the seeding batch stands in for the history of the EMA statistics; empty clusters are dead
        self.codebook.copy_(centres)
        self.cluster_size.copy_(_histogram(nearest_code(flat, centres)[0], self.n_codes))
        self.embed_sum.copy_(centres * self.cluster_size.unsqueeze(1))
        self.initialised.fill_(True)
        self._broadcast()

    def _broadcast(self):
        # Rank 0's random choices win, so the codebooks of all ranks stay identical.
        if dist.is_available() and dist.is_initialized():
            for t in (self.codebook, self.cluster_size, self.embed_sum):
                dist.broadcast(t, 0)


# ----------------------------------------------------------------------------- VQ-VAE


@dataclass
class VQVAEConfig:
    in_channels: int = 1  # image channels
    channels: int = 128  # hidden width at the code resolution
    n_res_blocks: int = 2  # residual blocks in encoder and decoder each
    downsample: int = 4  # image side / code map side: 4 or 8
    code_dim: int = 64  # D, dimension of a code vector
    n_codes: int = 512  # K, codebook size
    beta: float = 0.25  # commitment loss weight
    decay: float = 0.99  # EMA decay of the codebook statistics
    dead_threshold: float = 0.01  # restart a code with fewer hits in a step than this fraction of an even share
    kmeans_init: bool = True  # seed the codebook by k-means on the first batch
    ssim_weight: float = 0.1  # weight of 1 - SSIM beside the MSE in the reconstruction loss (0.1: see README)
    levels: int = 1  # 1: one code map; 2: VQ-VAE-2, plus a top map at twice the down-sampling for the layout
    rate: float = 0.0  # nats a code costs under a causal model of the codes, weighed against its squared distance

    def __post_init__(self):
        _require(self, ("in_channels", "channels", "n_res_blocks", "code_dim", "beta"),
                 (self.channels >= 8, f"channels must be at least 8, got {self.channels}"),  # halved per extra stride
                 (0 <= self.dead_threshold < 1, f"dead_threshold must be in [0, 1) (0: no restarts), got "
                                                 f"{self.dead_threshold}"),
                 (self.downsample in (4, 8), f"downsample must be 4 or 8, got {self.downsample}"),
                 (self.n_codes >= 2, f"n_codes must be at least 2, got {self.n_codes}"),
                 (0 <= self.ssim_weight < math.inf, f"ssim_weight must be 0 or more, got {self.ssim_weight}"),
                 (0 < self.decay < 1, f"decay must be between 0 and 1, got {self.decay}"),
                 (self.levels in (1, 2), f"levels must be 1 or 2, got {self.levels}"),
                 (0 <= self.rate < math.inf and (not self.rate or self.levels == 1),
                  f"rate must be finite and >= 0, and 0 with two levels, got {self.rate} with levels {self.levels}"))


def _require(config, positive, *checks):
    """ValueError with the message of the first failing check: the fields in positive > 0, then each (ok, message)."""
    positive = [(0 < getattr(config, n) < math.inf, f"{n} must be positive and finite, got {getattr(config, n)}")
                for n in positive]
    for ok, message in positive + list(checks):
        if not ok:
            raise ValueError(message)


def _batched(fn, x, model, batch_size):
    """fn over x (a tensor, or a tuple of tensors split alike) in batches on the model's device, in float32 (no
    autocast), under _evaluating(model) (eval mode, then as it was); its results (a tensor or a tuple) on x's device."""
    xs = x if isinstance(x, tuple) else (x,)
    device, home = next(model.parameters()).device, xs[0].device
    outs = []
    with _evaluating(model), torch.autocast(device.type, enabled=False):
        for part in zip(*(t.split(batch_size) for t in xs)):
            o = fn(*(t.to(device) for t in part))
            outs.append(tuple(t.to(home) for t in o) if isinstance(o, tuple) else o.to(home))  # frees the device
    return tuple(map(torch.cat, zip(*outs))) if isinstance(outs[0], tuple) else torch.cat(outs)


class VQVAE(nn.Module):
    """Encoder, vector quantizer and decoder; with levels=2 also a top encoder, quantizer and decoder (VQ-VAE-2)."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = c = config
        D = c.code_dim
        self.encoder = Encoder(c.in_channels, c.channels, D, c.downsample, c.n_res_blocks)
        self.quantizer = VectorQuantizer(c.n_codes, D, c.beta, c.decay, c.dead_threshold, c.kmeans_init)
        if c.levels == 2:  # the top map sees the bottom features, halved once more: room for the layout only
            self.encoder_top = Encoder(D, c.channels, D, 2, c.n_res_blocks)
            self.quantizer_top = VectorQuantizer(c.n_codes, D, c.beta, c.decay, c.dead_threshold, c.kmeans_init)
            self.decoder_top = Decoder(D, c.channels, D, 2, c.n_res_blocks)  # top codes -> bottom resolution
            self.merge = nn.Conv2d(2 * D, D, 1)  # bottom features and decoded top -> the bottom quantizer's input
        self.decoder = Decoder(c.in_channels, c.channels, c.levels * D, c.downsample, c.n_res_blocks)
        if c.rate:
            self.rate_model = CodeModel(c.n_codes)

    def _quantize(self, x):
        """x (B, C, H, W) -> (the decoder's input, codes, commitment loss, stats); codes are (B, h, w), or
        (top (B, h/2, w/2), bottom (B, h, w)) with two levels."""
        c, f = self.config, self.config.downsample * self.config.levels  # the top map halves once more
        if x.dim() != 4 or x.shape[1] != c.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x must be (B, {c.in_channels}, H, W), H and W multiples of {f}, got {tuple(x.shape)}")
        z = self.encoder(x)  # (B, D, h, w)
        if self.config.rate:
            # entropy-constrained codes: each chosen for its squared distance plus rate x its nats under the
            # rate model given the nearest codes before it (one pass), in units of the mean squared distance
            # to the nearest code; the rate model learns the codes so chosen. Codes then carry what a causal
            # prior can predict, at some cost in distance.
            m, seen = self.rate_model, []

            def cost(nearest, dist):  # (B, h, w), (N,) -> (B, h, w, K)
                if self.training:  # the first batch sets the scale, later ones move it slowly
                    mean = dist.mean().detach()
                    m.scale.copy_(torch.where(m.scale > 0, m.scale.lerp(mean, 0.01), mean))
                seen.append(F.log_softmax(m(nearest).float(), 1))  # (B, K, h, w) log-probabilities
                return -self.config.rate * m.scale * seen[0].detach().permute(0, 2, 3, 1)

            with _no_tf32():  # on a GPU, the codes training chose are the codes encode() chooses
                z_q, codes, commit, stats = self.quantizer(z, cost)
            nats = -seen[0].gather(1, codes[:, None]).mean()  # as code_nats, from the log-probabilities
            stats["rate_bits"] = nats.detach() / math.log(2)
            return z_q, codes, commit + nats * self.training, stats
        if self.config.levels == 1:
            return self.quantizer(z)
        top_q, top, top_commit, top_stats = self.quantizer_top(self.encoder_top(z))  # (B, D, h/2, w/2)
        t = self.decoder_top(top_q)  # (B, D, h, w)
        with torch.autocast(x.device.type, enabled=False):  # float32 vectors for the bottom quantizer too
            z_q, codes, commit, stats = self.quantizer(self.merge(torch.cat([z, t.float()], 1)))
        stats.update({f"{k}_top": s for k, s in top_stats.items()})
        return torch.cat([z_q, t], 1), (top, codes), commit + top_commit, stats  # (B, 2D, h, w)

    def forward(self, x):
        """x (B, C, H, W) -> (recon, loss, stats); loss = MSE (+ weighted 1 - SSIM) + commitment."""
        z_q, codes, commit, stats = self._quantize(x)
        recon = self.decoder(z_q)  # (B, C, H, W)
        with torch.autocast(x.device.type, enabled=False):  # SSIM's variances need float32
            r, x = recon.float(), x.float()
            mse = F.mse_loss(r, x)
            loss = mse + commit
            if self.config.ssim_weight:  # its blurs are matmuls: in TF32, E[x^2] - E[x]^2 would cancel
                with _no_tf32():
                    loss = loss + self.config.ssim_weight * (1 - _ssim_terms(x, r)[0].mean())
        stats.update(recon=mse.detach(), commit=commit.detach())
        return recon, loss, stats

    @torch.no_grad()
    def encode(self, x, batch_size=64):
        """x (B, C, H, W) -> codes (B, h, w) int64, or (top (B, h/2, w/2), bottom (B, h, w)) with two
        levels, on x's device; in batches on the model's device, in float32 (no autocast)."""
        if x.dim() != 4 or not x.is_floating_point():  # 0-255 pixels would pass as float, far outside [0, 1]
            raise ValueError(f"x must be (B, C, H, W) float images in [0, 1], got {tuple(x.shape)} {x.dtype}")
        return _batched(lambda xb: self._quantize(xb.float())[1], x, self, batch_size)

    @torch.no_grad()
    def decode(self, codes, batch_size=64):
        """codes as encode gives them -> images (B, C, H, W) in float32, clamped to [0, 1], on codes' device."""
        def run(*c):
            z_q = self.quantizer.codebook[c[-1]].permute(0, 3, 1, 2)  # (B, D, h, w)
            if self.config.levels == 2:
                z_q = torch.cat([z_q, self.decoder_top(self.quantizer_top.codebook[c[0]].permute(0, 3, 1, 2))], 1)
            return self.decoder(z_q).float().clamp(0, 1)
        return _batched(run, _as_codes(as_levels(codes), self.config.n_codes), self, batch_size)

    def reconstruct(self, x, batch_size=64):
        """x (B, C, H, W) -> decode(encode(x)): what the model makes of each slice."""
        return self.decode(self.encode(x, batch_size), batch_size)

    @classmethod
    def from_checkpoint(cls, path_or_ckpt, map_location="cpu"):
        return _build(lambda c: cls(_config_of(VQVAEConfig, c)), load_checkpoint(path_or_ckpt, map_location), "vqvae")


# ----------------------------------------------------------------------------- prior


@dataclass
class PriorConfig:
    n_codes: int = 512  # K, codebook size of the VQ-VAE
    height: int = 32  # h, code map rows (the position embedding is learned for this size)
    width: int = 16  # w, code map columns
    prior_channels: int = 64  # C, hidden width: ~1M weights, about one per code of a 2000-map data set
    prior_layers: int = 10  # gated layers; with the dilations below every earlier code is in reach
    prior_dilations: tuple = (1, 2, 4, 8, 16)  # cycled over layers: two reach 63 rows up, 62 aside (blind_spot)
    prior_dropout: float = 0.1  # on the gated outputs, because small data sets overfit without it
    positional: bool = False  # conditioned on the slice's position in its volume (set from the data)
    cond_codes: int = 0  # K of a map of half the size that conditions this one (a top level's codes); 0: none
    prior_transpose: bool = False  # scan the map column by column, so a scanned row runs along array axis 0
    code_dim: int = 0  # D of the VQ-VAE codebook the prior is tied to (PixelCNN.tie); 0: untied

    def __post_init__(self):
        self.prior_dilations = tuple(self.prior_dilations)  # JSON and argparse hand back lists
        _require(self, ("n_codes", "height", "width", "prior_channels", "prior_layers"),
                 (self.prior_dilations and min(self.prior_dilations) >= 1,
                  f"prior_dilations must be integers >= 1, got {self.prior_dilations}"),
                 (self.prior_dropout == 0 or 1 / 512 < self.prior_dropout < 255.5 / 256,  # byte_dropout's 1/256 steps
                  f"prior_dropout must be 0 or in [1/256, 255/256], got {self.prior_dropout}"),
                 (self.code_dim >= 0, f"code_dim must be >= 0 (0: untied), got {self.code_dim}"))

    def blind_spot(self):
        """None when every logit sees every code before it; else why not, in a line. Each gated layer
        reaches its dilation aside and up; the reach is gap-free when every dilation is at most one more
        than the sum of those before it, and then its sum must span a scanned row, less one. (Sufficient:
        dilations with gaps are refused even where the map is too small for a gap to matter.)"""
        rows, cols = (self.width, self.height) if self.prior_transpose else (self.height, self.width)
        need, L, cycle = max(cols - 1, rows - 2), self.prior_layers, self.prior_dilations
        d = [cycle[k % len(cycle)] for k in range(max(L, need))]  # need layers always suffice: each reaches 1
        reach = np.cumsum(d).tolist()  # after 1, 2, ... layers
        if any(dk > 1 + (reach[k - 1] if k else 0) for k, dk in enumerate(d[:L])):
            return (f"prior_dilations {list(cycle)} over {L} layers leave gaps in the prior's reach (each must "
                    f"be at most one more than the sum of those before it): start with 1")
        if reach[L - 1] >= need:
            return None
        layers = next(n + 1 for n, r in enumerate(reach) if r >= need)
        return (f"prior_layers {L} with prior_dilations {list(cycle)} reach {reach[L - 1]} "
                f"codes aside, but the scanned map is {rows} rows of {cols} codes: some codes would never see some "
                f"before them (a blind spot); use prior_layers {layers} or larger dilations")


def _as_positions(position, n):
    """Slice positions, a number or (n,) in [0, 1], as (n,) float32; else a ValueError."""
    t = torch.as_tensor(position, dtype=torch.float32)
    if t.dim() > 1 or t.numel() not in (1, n) or not ((t >= 0) & (t <= 1)).all():
        extent = f", {t.min().item():g} to {t.max().item():g}" if t.numel() else ""
        raise ValueError(f"positions must be in [0, 1], a number or ({n},): got shape {tuple(t.shape)}{extent}")
    return t.expand(n)


def _rand(shape, generator, device, dtype=torch.float32):
    """Uniform numbers from generator, or from a list of one a row (a row's numbers then depend on its own alone)."""
    if not isinstance(generator, list):
        return torch.rand(shape, generator=generator, dtype=dtype, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"{shape[0]} maps need one generator each, got {len(generator)}")
    return torch.cat([torch.rand((1, *shape[1:]), generator=g, dtype=dtype, device=device) for g in generator])


def _gumbel(shape, generator, device, dtype=torch.float32):
    """Gumbel noise -log(-log(u)), u uniform kept off 0 and 1: argmax(logits + noise) samples softmax(logits)."""
    u, eps = _rand(shape, generator, device, dtype), torch.finfo(dtype).eps
    return -torch.log(-torch.log(u.clamp_(eps, 1 - eps)))


def _draw(logits, temperature, g):
    """argmax(logits / temperature + g), in a form that neither overflows at a tiny temperature nor loses inf."""
    return (logits + temperature * g if temperature <= 1 else logits / temperature + g).argmax(-1)


def gated_tanh(x, dim=1):
    """tanh of the first half of the channels times sigmoid of the second half."""
    a, b = x.chunk(2, dim=dim)
    return torch.tanh(a) * torch.sigmoid(b)


def byte_dropout(x, p, training=True):
    """Dropout keeping where a random byte >= round(256 p) (p in steps of 1/256), four bytes per random int32: a
    fifth of torch's CPU Bernoulli mask (a phantom prior step in bf16 130 ms against 146, kernels.bench --steps)."""
    if not training or p == 0:
        return x
    n, cut = x.numel(), round(256 * p)
    r = torch.randint(-2 ** 31, 2 ** 31 - 1, ((n + 3) // 4,), dtype=torch.int32, device=x.device)
    return x * ((r.view(torch.uint8)[:n].view(x.shape) >= cut).to(x.dtype) * (256 / (256 - cut)))


class GatedLayer(nn.Module):
    """One layer of both stacks: vertical sees rows <= i, horizontal sees columns <= j of row i."""

    def __init__(self, channels, dilation, dropout):
        super().__init__()
        C, self.dilation, self.dropout = channels, dilation, dropout
        self.vconv = nn.Conv2d(C, 2 * C, (2, 3), dilation=dilation)  # taps: rows i-d, i x columns j-d, j, j+d
        self.hconv = nn.Conv2d(C, 2 * C, (1, 2), dilation=dilation)  # taps: columns j-d, j of row i
        self.v2h = nn.Conv2d(2 * C, 2 * C, 1)  # hands the horizontal stack everything above its row
        self.hout = nn.Conv2d(C, C, 1)

    def forward(self, v, h):
        d = self.dilation
        v_pre = self.vconv(F.pad(v, (d, d, d, 0)))  # (B, 2C, h, w), from rows <= i
        above = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # shifted down a row: from rows < i only
        h_pre = self.hconv(F.pad(h, (d, 0))) + self.v2h(above)  # (B, 2C, h, w)
        v = v + byte_dropout(gated_tanh(v_pre), self.dropout, self.training)
        h = h + self.hout(byte_dropout(gated_tanh(h_pre), self.dropout, self.training))  # residual: it goes deep
        return v, h


def _stacks(x, layers, pos=0):
    """Embedded codes (B, C, h, w) -> the horizontal stack's output: the vertical stack starts at the codes, the
    horizontal one shifted right a column (codes left of j only); pos is added to both."""
    v, h = x + pos, F.pad(x, (1, 0))[..., :-1] + pos
    for layer in layers:
        v, h = layer(v, h)
    return h


class CodeModel(nn.Module):
    """A small causal model of code maps of any size (gated layers, no position embedding): the rate
    model a VQ-VAE with rate > 0 trains beside its codebook."""

    def __init__(self, n_codes, channels=32, dilations=(1, 2, 4, 8, 16)):
        super().__init__()
        self.embed = nn.Embedding(n_codes, channels)
        self.layers = nn.ModuleList(GatedLayer(channels, d, 0.0) for d in dilations)
        self.head = nn.Conv2d(channels, n_codes, 1)
        self.register_buffer("scale", torch.zeros(()))  # the running mean squared distance to the nearest code

    def forward(self, codes):
        """codes (B, h, w) -> logits (B, K, h, w), each from the codes before it in row order."""
        return self.head(F.relu(_stacks(self.embed(codes).permute(0, 3, 1, 2), self.layers)))


N_FREQ = 8  # sin / cos pairs that describe a slice position to the prior
N_MAPS = 4  # position-dependent maps mixed into the position embedding (the anatomy moves with the position)


class PixelCNN(nn.Module):
    """Gated PixelCNN prior over VQ-VAE code maps, with a learned position embedding, an optional
    condition on the slice's position in its volume and an optional condition on a coarser code map."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = c = config
        C, L = c.prior_channels, c.prior_layers
        # the map as scanned: rows of the scan run along array axis 0 when transposed
        self.shape = (c.width, c.height) if c.prior_transpose else (c.height, c.width)
        self.embed = nn.Embedding(c.n_codes, C)
        self.pos = nn.Parameter(torch.randn(1, C, *self.shape))  # where a code sits, so anatomy is placed consistently
        self.layers = nn.ModuleList(GatedLayer(C, c.prior_dilations[k % len(c.prior_dilations)], c.prior_dropout)
                                    for k in range(L))
        if c.positional:  # a mix of N_MAPS maps added to the position embedding: where anatomy sits at
            # this slice position; it depends on no code, so causality is untouched
            self.cond_mix = nn.Linear(2 * N_FREQ, N_MAPS)
            self.cond_maps = nn.Parameter(torch.zeros(N_MAPS, C, *self.shape))
            # quantiles of the training positions, to draw positions as the data has them
            self.register_buffer("position_quantiles", torch.linspace(0, 1, 101))
        if c.cond_codes:  # a map of half the size (the top codes), seen whole: it holds no code of this map
            self.cond_embed = nn.Embedding(c.cond_codes, C)
            self.cond_net = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), ResBlock(C), ResBlock(C), nn.ReLU(),
                                          nn.ConvTranspose2d(C, C, 4, stride=2, padding=1))
        # channel-last, so the cached sampler calls the same modules on (n, C) rows
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(C, C), nn.ReLU(), nn.Linear(C, c.n_codes))
        if c.code_dim:  # tied to the codebook: the free table and last layer start at 0, the codebook decides
            self.register_buffer("codebook", torch.zeros(c.n_codes, c.code_dim))
            self.code_in, self.code_out = nn.Linear(c.code_dim, C, bias=False), nn.Linear(C, c.code_dim, bias=False)
            for w in (self.embed.weight, *self.head[-1].parameters()):
                nn.init.zeros_(w)

    def tie(self, codebook):
        """Before training: keep the VQ-VAE's codebook (K, D) at unit RMS. A code's input vector gains a map of
        its codebook vector, its logit the head's features against it: codes near in the codebook start near
        here, so the prior learns from few maps and a wrong draw tends to be a near code (README)."""
        self.codebook.copy_(codebook / codebook.pow(2).mean().sqrt())
        return self

    def _embed(self, codes):  # codes (...) -> input vectors (..., C)
        x = self.embed(codes)
        return x + self.code_in(self.codebook[codes]) if self.config.code_dim else x

    def _logits(self, x):  # features (..., C) -> logits (..., K)
        if not self.config.code_dim:
            return self.head(x)
        f = self.head[:-1](x)
        return self.head[-1](f) + self.code_out(f) @ self.codebook.T.to(f.dtype)

    def _scan(self, t, dims=(-2, -1)):
        """A map in array order to scan order, or back (the same swap)."""
        return t.transpose(*dims) if self.config.prior_transpose else t

    def _condition(self, n, position, cond):
        """What n maps add at each position, from no code of theirs (n, C, *shape): the position
        embedding, mixed with the slice position, plus the coarser map's codes."""
        c = self.config
        if c.positional != (position is not None):
            raise ValueError("this prior is conditioned on the slice position: pass position (B,) in [0, 1]"
                             if c.positional else "this prior was trained without slice positions: position must be None")
        if bool(c.cond_codes) != (cond is not None):
            raise ValueError(f"this prior is conditioned on top codes: pass cond (B, {c.height // 2}, {c.width // 2})"
                             if c.cond_codes else "this prior takes no top codes: cond must be None")
        out = self.pos.expand(n, -1, -1, -1)
        if c.positional:
            position = torch.as_tensor(position, dtype=self.pos.dtype, device=self.pos.device).expand(n)
            k = torch.arange(1, N_FREQ + 1, device=position.device, dtype=position.dtype)  # made there: no sync
            angles = math.pi * position[:, None] * k  # (n, N_FREQ)
            features = torch.cat([angles.sin(), angles.cos()], 1)  # (n, 2 N_FREQ)
            out = out + torch.einsum("nm,mchw->nchw", self.cond_mix(features), self.cond_maps)
        if c.cond_codes:
            if tuple(cond.shape) != (n, c.height // 2, c.width // 2):
                raise ValueError(f"cond must be ({n}, {c.height // 2}, {c.width // 2}), got {tuple(cond.shape)}")
            out = out + self._scan(self.cond_net(self.cond_embed(cond).permute(0, 3, 1, 2)))  # (n, C, h, w) scanned
        return out

    def forward(self, codes, position=None, cond=None):
        """codes (B, h, w) int64, position (B,) in [0, 1] for a positional prior, cond: the top codes
        (B, h/2, w/2) for a conditioned one -> logits (B, K, h, w); logits at a code see only the codes
        before it in scan order (rows of the map, or of its transpose with prior_transpose)."""
        c = self.config
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (c.height, c.width):
            raise ValueError(f"codes must be (B, {c.height}, {c.width}), got {tuple(codes.shape)}")
        pos = self._condition(len(codes), position, cond)
        h = _stacks(self._embed(self._scan(codes, (1, 2))).permute(0, 3, 1, 2), self.layers, pos)  # (B, C, *shape)
        return self._scan(self._logits(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))  # (B, K, h, w)

    def loss(self, codes, *conditions):
        """Mean cross-entropy per code as (nats, bits); conditions (position, ...) as forward takes them."""
        nats = code_nats(self(codes, *conditions), codes)
        return nats, nats / math.log(2)

    def draw_positions(self, n, generator=None):
        """n slice positions drawn as the training data has them (inverse CDF of its quantiles)."""
        if not self.config.positional:
            raise ValueError("this prior was trained without slice positions: it has none to draw")
        u = _rand((n,), generator, self.pos.device) * 100
        q, lo = self.position_quantiles, u.floor().long().clamp(max=99)
        return q[lo] + (q[lo + 1] - q[lo]) * (u - lo)

    def _noise(self, n, temperature, generator, position, keep=None):
        """Positions (drawn as in the training data when None), and in scan order: Gumbel noise (n, *shape, K), drawn
        up front from generator so both samplers use the same numbers, and keep (None: draw every code)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r} ({type(n).__name__})")
        if self.config.positional and position is None:
            position = self.draw_positions(n, generator)
        elif position is not None:
            position = _as_positions(position, n)
        g = _gumbel((n, *self.shape, self.config.n_codes), generator, self.pos.device, self.pos.dtype)
        if keep is not None:  # (codes, redo) in scan order on g's device
            shape = (n, self.config.height, self.config.width)
            if tuple(keep[0].shape) != shape or tuple(keep[1].shape) != shape:
                raise ValueError(f"keep must be two maps of {shape}, got {tuple(keep[0].shape)}, "
                                 f"{tuple(keep[1].shape)}")
            keep = tuple(self._scan(t.to(g.device), (1, 2)).contiguous() for t in keep)
        return position, g, keep

    @torch.no_grad()
    def generate(self, n, temperature=1.0, generator=None, position=None, cond=None, keep=None):
        """Sample n code maps in scan order: returns codes (n, h, w) int64. Incremental (_SamplerState: a few (n, 2C)
        matmuls per position and layer); code (i, j) is argmax(logits / temperature + Gumbel noise drawn up front from
        `generator`, a torch.Generator on the model's device or a list of one a map), so `generate_naive` gives the same
        codes (up to rounding at near-ties). n >= 1; temperature > 0 (below 1 sharpens). position: for a positional
        prior, the slices' position in their volume in [0, 1], a number or (n,); None draws positions as the training
        data has them. cond: the top codes (n, h/2, w/2) of a conditioned prior. keep: None, or (codes (n, h, w), redo
        (n, h, w) bool): codes with redo False kept, the others drawn given all before."""
        position, g, keep = self._noise(n, temperature, generator, position, keep)
        with _no_tf32():
            return self._scan(self._generate_cached(g, temperature, self._condition(n, position, cond), keep)[0])

    def _generate_cached(self, g, temperature, pos, keep=None, keep_logits=False):
        """The cached sampler on noise g (n, *shape, K) and the condition pos (n, C, *shape), keeping the codes of
        keep where it says: codes (n, *shape) and, if asked, logits (n, *shape, K), all in scan order."""
        state = _SamplerState(self, g, temperature, pos, keep, keep_logits)
        if g.is_cuda:  # one graph per row: thousands of small launches become one
            try:
                side = torch.cuda.Stream(g.device)  # warm-up on a side stream, as capture wants
                side.wait_stream(torch.cuda.current_stream(g.device))
                with torch.cuda.stream(side):
                    state.row()
                torch.cuda.current_stream(g.device).wait_stream(side)
                state.reset()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    state.row()
                for _ in range(self.shape[0]):
                    graph.replay()
                return state.codes, state.logits
            except RuntimeError as e:  # a driver or build without graph capture: the same rows, eagerly
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}); sampling without graphs")
                state.reset()
        for _ in range(self.shape[0]):
            state.row()
        return state.codes, state.logits

    @torch.no_grad()
    def generate_naive(self, n, temperature=1.0, generator=None, position=None, cond=None, keep=None):
        """Reference sampler: a full forward per position, same noise and codes as `generate`."""
        position, g, keep = self._noise(n, temperature, generator, position, keep)
        codes = torch.zeros(n, self.config.height, self.config.width, dtype=torch.long, device=g.device)
        scanned = self._scan(codes, (1, 2))  # a view: writing it writes codes
        with _evaluating(self), _no_tf32():  # no dropout, as in the cached sampler
            for i in range(self.shape[0]):
                for j in range(self.shape[1]):
                    logits = self._scan(self(codes, position, cond))[:, :, i, j]  # (n, K)
                    drawn = _draw(logits, temperature, g[:, i, j])
                    scanned[:, i, j] = drawn if keep is None else torch.where(keep[1][:, i, j], drawn, keep[0][:, i, j])
        return codes

    @classmethod
    def from_checkpoint(cls, path_or_ckpt, map_location="cpu"):
        ckpt = load_checkpoint(path_or_ckpt, map_location)
        if "top" in ckpt.get("prior_config", {}):
            raise CheckpointError("the checkpoint holds a two-level prior: load it with vq.load_prior")
        return _build(lambda cfg: cls(_config_of(PriorConfig, cfg)), ckpt, "prior")


class TwoLevelPrior(nn.Module):
    """The prior of a two-level VQ-VAE: a PixelCNN over the top map, then one over the bottom map
    conditioned on the top codes. Codes are (top (B, h/2, w/2), bottom (B, h, w)) pairs."""

    def __init__(self, top: PriorConfig, bottom: PriorConfig):
        super().__init__()
        if bottom.cond_codes != top.n_codes or (bottom.height, bottom.width) != (2 * top.height, 2 * top.width):
            raise ValueError("the bottom prior must be conditioned on the top codes, at twice the top map's size")
        self.top, self.bottom = PixelCNN(top), PixelCNN(bottom)
        self.config = top  # what both share: positional, widths; bottom.config has the rest

    def forward(self, codes, position=None):
        """(top, bottom) codes -> (top logits (B, K, h/2, w/2), bottom logits (B, K, h, w))."""
        return self.top(codes[0], position), self.bottom(codes[1], position, cond=codes[0])

    loss = PixelCNN.loss  # over the codes of both maps

    @torch.no_grad()
    def generate(self, n, temperature=1.0, generator=None, position=None, keep=None, naive=False):
        """Sample n (top, bottom) code pairs: the top map, then the bottom map given it; see PixelCNN.generate.
        keep: None or ((top, bottom) codes, (top, bottom) redo maps). naive: the reference sampler (same codes)."""
        if self.config.positional and position is None:  # one position per slice, for both levels
            position = self.top.draw_positions(n, generator)
        sample = "generate_naive" if naive else "generate"
        keeps = (None, None) if keep is None else tuple(zip(*keep))
        top = getattr(self.top, sample)(n, temperature, generator, position, keep=keeps[0])
        return top, getattr(self.bottom, sample)(n, temperature, generator, position, cond=top, keep=keeps[1])

    generate_naive = partialmethod(generate, naive=True)


def load_prior(path_or_ckpt, map_location="cpu"):
    """The prior a checkpoint holds: a PixelCNN, or a TwoLevelPrior for a two-level VQ-VAE."""
    ckpt = load_checkpoint(path_or_ckpt, map_location)
    if "top" not in ckpt.get("prior_config", {}):
        return PixelCNN.from_checkpoint(ckpt)
    return _build(lambda c: TwoLevelPrior(*(_config_of(PriorConfig, c[k]) for k in ("top", "bottom"))), ckpt, "prior")


def as_levels(codes):
    """Code maps as a tuple of levels: (codes,) for one level, (top, bottom) for two."""
    return codes if isinstance(codes, tuple) else (codes,)


def _as_codes(levels, n_codes):
    """Levels of code maps as int64, refused unless integers in [0, n_codes) (a negative one would wrap around)."""
    for c in levels:
        if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {c.dtype}")
        if c.numel() and not (0 <= c.min().item() and c.max().item() < n_codes):
            raise ValueError(f"codes must be in [0, {n_codes}), got {c.min().item()} to {c.max().item()}")
    return tuple(c.long() for c in levels)


def code_nats(logits, codes):
    """Mean cross-entropy per code, in nats, of logits (B, K, h, w) for codes (B, h, w), or of
    tuples of them (one per level), averaged over all codes of all levels."""
    pairs = list(zip(as_levels(logits), as_levels(codes)))
    return sum(F.cross_entropy(lg.float(), c, reduction="sum") for lg, c in pairs) / sum(c.numel() for _, c in pairs)


@torch.no_grad()
def _per_code(prior, codes, position, fn, batch_size=128):
    """fn(logits, codes) of each level, through one forward of prior without dropout (in _batched's batches):
    a (N, h, w) tensor per level on the codes' device, as a tuple for two levels. position: (N,), a number or None."""
    levels = _as_codes(as_levels(codes), prior.config.n_codes)
    position = None if position is None else _as_positions(position, len(levels[0]))

    def run(*part):  # the levels' codes, then the positions if given
        given, at = part[:len(levels)], part[len(levels)] if position is not None else None
        logits = as_levels(prior(given if isinstance(codes, tuple) else given[0], at))
        return tuple(fn(lg.float(), c) for lg, c in zip(logits, given))
    out = _batched(run, levels + (() if position is None else (position,)), prior, batch_size)
    return out if isinstance(codes, tuple) else out[0]


def code_bits(prior, codes, position=None, batch_size=128):
    """Each code's bits given the codes before it, -log2 p(code | earlier codes): (N, h, w) float32 for
    code maps (N, h, w), a (top, bottom) pair for pairs; one forward pass, without dropout."""
    nll = lambda lg, c: F.cross_entropy(lg, c, reduction="none") / math.log(2)  # noqa: E731
    return _per_code(prior, codes, position, nll, batch_size)


def prior_bits(prior, codes, position=None, batch_size=128):
    """How well prior predicts code maps (N, h, w), or (top, bottom) pairs, with positions (N,) (or one
    number) for a positional prior: {"per_code": mean bits per code over all levels, "per_slice": bits per
    slice, and with two levels "per_code_top", "per_code_bottom"}; in batches, without dropout."""
    bits = as_levels(code_bits(prior, codes, position, batch_size))
    sums = [b.double().sum().item() for b in bits]
    out = {"per_code": sum(sums) / sum(b.numel() for b in bits), "per_slice": sum(sums) / len(bits[0])}
    if len(bits) == 2:
        out.update(per_code_top=sums[0] / bits[0].numel(), per_code_bottom=sums[1] / bits[1].numel())
    return out


def teacher_forced(vqvae, prior, x, position=None, generator=None):
    """How much of a slice's codes the prior can predict: encode x (N, C, H, W), redraw every code from
    the prior given the true codes before it (one forward pass, so no error compounds), sampled and at
    the argmax, and decode. Returns {"changed", "changed_argmax": the share of codes redrawn otherwise,
    "ssim", "ssim_argmax": mean SSIM of those decodes against the reconstruction}: high SSIM means the
    decoder turns the prior's plausible substitutes into intact anatomy."""
    codes, out = vqvae.encode(x), {}
    recon = vqvae.decode(codes)
    draws = as_levels(_per_code(prior, codes, position, lambda lg, c: torch.stack(  # both from one pass
        [(lg + _gumbel(lg.shape, generator, lg.device)).argmax(1), lg.argmax(1)], 1)))  # (N, 2, h, w) per level
    for k, name in enumerate(("", "_argmax")):
        redrawn = tuple(d[:, k] for d in draws) if isinstance(codes, tuple) else draws[0][:, k]
        same = sum((a == b).sum().item() for a, b in zip(as_levels(redrawn), as_levels(codes)))
        out[f"changed{name}"] = 1 - same / sum(c.numel() for c in as_levels(codes))
        out[f"ssim{name}"] = ssim(recon, vqvae.decode(redrawn)).mean().item()
    return out


SURPRISE_QUANTILE = 0.995  # a code is surprising above this quantile of the bits of normal (validation) codes
SURPRISE_SIGMA = 2.0  # pixels: the light Gaussian smoothing of a surprise map


def surprise_threshold(prior, codes, position=None, quantile=SURPRISE_QUANTILE):
    """The bits above which a code counts as surprising: a quantile of the bits of normal code maps
    (validation codes, all levels pooled), as saved with the prior in a checkpoint's "surprise"."""
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must be in [0, 1] (a fraction, not a percentage), got {quantile}")
    bits = torch.cat([b.flatten() for b in as_levels(code_bits(prior, codes, position))])
    k = min(len(bits) - 1, max(0, round(quantile * (len(bits) - 1))))
    return bits.double().sort().values[k].item()  # torch.quantile refuses more than 16M values


@torch.no_grad()
def surprise(vqvae, prior, x, threshold, position=None, sigma=SURPRISE_SIGMA, temperature=1.0, generator=None,
             batch_size=64):
    """Where slices are unusual for the prior: a per-pixel surprise map, a "healed" slice, a score.

    Each code's bits given the codes before it (one forward pass of the prior); the codes above
    `threshold` bits (see surprise_threshold) are redrawn by the cached sampler in scan order, each given
    the codes before it (not the kept ones after), every other code kept, and decoded: the healed
    slice. The map is the absolute difference between the slice and its healed decode, inside the
    redrawn codes' cells, Gaussian-smoothed by sigma pixels; the score is the map's mean (higher: more unusual).

    x: (B, C, H, W) in [0, 1], at the VQ-VAE's size; position: (B,) slice positions for a positional prior.
    generator: a torch.Generator on the prior's device (None: seeded from torch's); every slice's redraws start
    from its state, so a slice's results do not depend on the slices beside it. Returns a dict of "map"
    (B, 1, H, W), "healed" (B, C, H, W), "score" (B,), and per code "bits", "redo" (which were redrawn), "codes"
    and "healed_codes" ((B, h, w) each, or (top, bottom) pairs), all on the CPU.
    """
    if not len(x):
        raise ValueError("surprise needs at least one slice, got none")
    names, parts = ("map", "healed", "score", "bits", "redo", "codes", "healed_codes"), []
    where = None if position is None else _as_positions(position, len(x))  # checked once, not per batch
    g = generator or torch.Generator(next(prior.parameters()).device).manual_seed(int(torch.randint(2 ** 62, ())))
    for k in range(0, len(x), batch_size):
        xb = x[k:k + batch_size].float().cpu()
        pb = None if where is None else where[k:k + batch_size]
        codes = vqvae.encode(xb)
        bits = code_bits(prior, codes, pb)
        redo = tuple(b > threshold for b in bits) if isinstance(bits, tuple) else bits > threshold
        gs = [torch.Generator(g.device).set_state(g.get_state()) for _ in xb]  # one stream each, from g's state
        healed_codes = prior.generate(len(xb), temperature, gs, pb, keep=(codes, redo))
        healed = vqvae.decode(healed_codes).cpu()
        cells = torch.stack([F.interpolate(r[:, None].float(), size=xb.shape[-2:]) for r in as_levels(redo)]).amax(0)
        m = _blur((xb - healed).abs().mean(1, keepdim=True) * cells, sigma)  # (b, 1, H, W)
        healed_codes = tuple(c.cpu() for c in healed_codes) if isinstance(codes, tuple) else healed_codes.cpu()
        parts.append((m, healed, m.flatten(1).mean(1), bits, redo, codes, healed_codes))  # in the order of names
    cat = lambda vs: tuple(map(torch.cat, zip(*vs))) if isinstance(vs[0], tuple) else torch.cat(vs)  # noqa: E731
    return {k: cat(v) for k, v in zip(names, zip(*parts))}


@torch.no_grad()
def sample_codes(prior, n, temperature=1.0, generator=None, position=None, batch_size=64):
    """n code maps (n, h, w), or (top, bottom) pairs, drawn by prior batch_size at a time (so the noise of a big
    n never sits in memory at once), on position's device (the CPU). position: None, a number, or (n,) positions.
    The noise and positions are drawn batch by batch, so the samples of a seed depend on batch_size too."""
    where = torch.full((n,), math.nan) if position is None else _as_positions(position, n)
    return _batched(lambda p: prior.generate(len(p), temperature, generator, None if position is None else p),
                    where, prior, batch_size)


def sample_slices(vqvae, prior, n, temperature=1.0, generator=None, position=None, batch_size=64):
    """n new slices (n, C, H, W) in [0, 1] on the CPU: sample_codes decoded by vqvae."""
    return vqvae.decode(sample_codes(prior, n, temperature, generator, position, batch_size), batch_size).cpu()


def set_tf32(on):
    """TF32 for float32 matmuls and convolutions on, off, or as a list it returned; returns the previous list.
    Through torch's fp32_precision API where it exists (torch >= 2.9; a program that set it may not read the
    legacy flags), else the allow_tf32 flags: (object, attribute, on, off) each."""
    knobs = ([(torch.backends.cuda.matmul, "fp32_precision", "tf32", "ieee"), (torch.backends.cudnn.conv,
              "fp32_precision", "tf32", "ieee")] if hasattr(torch.backends, "fp32_precision") else
             [(torch.backends.cuda.matmul, "allow_tf32", True, False), (torch.backends.cudnn, "allow_tf32", True, False)])
    saved = [getattr(obj, name) for obj, name, _, _ in knobs]
    for k, (obj, name, yes, no) in enumerate(knobs):
        setattr(obj, name, on[k] if isinstance(on, list) else yes if on else no)
    return saved


@contextlib.contextmanager
def _evaluating(model):
    """model in eval mode for the block (inference: no dropout, no codebook update), then each of its modules in
    the mode it was in (a part the caller froze stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model.eval()
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _no_tf32():
    """Full float32 matmuls and convolutions on a GPU, so both samplers (and the SSIM loss) round alike."""
    saved = set_tf32(False)
    try:
        yield
    finally:
        set_tf32(saved)


class _SamplerState:
    """The cached sampler's buffers: every row is the same operations on the same memory, as a CUDA graph replays."""

    def __init__(self, model, g, temperature, pos, keep, keep_logits):
        (H, W), n, C = model.shape, g.shape[0], model.config.prior_channels
        self.m, self.g, self.temperature, self.n, self.keep = model, g, temperature, n, keep
        self.pos = pos.contiguous()  # (n, C, h, w): the position embedding of each map
        self.i = torch.zeros((), dtype=torch.long, device=g.device)  # the row being sampled, read on the device
        self.codes = torch.zeros(n, H, W, dtype=torch.long, device=g.device)
        self.logits = torch.zeros_like(g) if keep_logits else None
        self.row_codes = torch.zeros(n, W, dtype=torch.long, device=g.device)
        # per layer: vertical-stack inputs of rows i-d .. i, zero-padded as forward pads them
        self.vwin = [g.new_zeros(n, C, L.dilation + 1, W + 2 * L.dilation) for L in model.layers]
        # per layer: horizontal-stack inputs along the row, channel-last, left-padded by d zeros
        self.hbuf = [g.new_zeros(n, L.dilation + W, C) for L in model.layers]
        self.vh = [g.new_zeros(n, W, 2 * C) for _ in model.layers]  # per layer: the row above's share of h_pre
        # hconv's two taps as one (2C, 2C) matrix for the (n, 2, C) window [j - d, j]
        self.wh = [L.hconv.weight[:, :, 0].permute(0, 2, 1).reshape(2 * C, 2 * C).t() for L in model.layers]
        self.wo = [L.hout.weight.flatten(1).t() for L in model.layers]
        self.reset()

    def reset(self):
        for t in (self.i, *self.vwin, *self.hbuf):
            t.zero_()
        for L, vh in zip(self.m.layers, self.vh):  # nothing above row 0: biases only
            vh.copy_((L.v2h.bias + L.hconv.bias).expand_as(vh))

    def row(self):
        """Sample row i and advance i: the horizontal stack position by position, then the vertical stack."""
        m, n, W, C = self.m, self.n, self.m.shape[1], self.m.config.prior_channels
        pos = self.pos.index_select(2, self.i)[:, :, 0]  # (n, C, w)
        g = self.g.index_select(1, self.i)[:, 0]  # (n, w, K)
        if self.keep is not None:
            given, redo = (t.index_select(1, self.i)[:, 0] for t in self.keep)  # (n, w) each
        for j in range(W):
            x = pos[:, :, j] + m._embed(self.row_codes[:, j - 1]) if j else pos[:, :, j]  # (n, C)
            for k, L in enumerate(m.layers):
                d, hb = L.dilation, self.hbuf[k]
                hb[:, d + j] = x
                pre = torch.addmm(self.vh[k][:, j], hb[:, j:j + d + 1:d].reshape(n, 2 * C), self.wh[k])  # (n, 2C)
                x = x + torch.addmm(L.hout.bias, gated_tanh(pre), self.wo[k])
            logits = m._logits(x)  # (n, K)
            if self.logits is not None:
                self.logits[:, :, j].index_copy_(1, self.i, logits[:, None])
            drawn = _draw(logits, self.temperature, g[:, j])
            self.row_codes[:, j] = drawn if self.keep is None else torch.where(redo[:, j], drawn, given[:, j])
        self.codes.index_copy_(1, self.i, self.row_codes[:, None])
        v = pos + m._embed(self.row_codes).transpose(1, 2)  # (n, C, w)
        for k, L in enumerate(m.layers):
            d, win = L.dilation, self.vwin[k]
            win.copy_(torch.cat([win[:, :, 1:], F.pad(v, (d, d))[:, :, None]], 2))  # roll in row i
            v_pre = F.conv2d(win, L.vconv.weight, L.vconv.bias, dilation=d)[:, :, 0]  # (n, 2C, w)
            self.vh[k].copy_((L.v2h(v_pre[..., None])[..., 0] + L.hconv.bias[:, None]).transpose(1, 2))
            v = v + gated_tanh(v_pre)
        self.i += 1


# ----------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, unsafe or lacks a part."""


def save_json(path, obj=None, lines=None):
    """Write obj as indented JSON, or each of lines as one JSON line (.jsonl), atomically."""
    text = json.dumps(obj, indent=2) + "\n" if lines is None else "".join(json.dumps(r) + "\n" for r in lines)
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_checkpoint(obj, path):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location="cpu"):
    """Load with weights_only=True, so a checkpoint can hold tensors and plain data, never code (a dict: as it is)."""
    if isinstance(path, dict):  # already loaded: from_checkpoint and load_prior take either
        return path
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types; the user needs one line either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path} is not a safe checkpoint (it asks to run code): refused") from None
        why = "" if "device" in first else " (truncated or corrupt?)"  # map_location="cuda" on a machine without
        raise CheckpointError(f"{path} is not a readable checkpoint{why}: {first}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint (a dict of models and data)")
    return ckpt


def _config_of(config_cls, values):
    known = {f.name for f in fields(config_cls)}  # fields a later version dropped are left out
    return config_cls(**{k: v for k, v in values.items() if k in known})


def _build(make, ckpt, name):
    if name not in ckpt or f"{name}_config" not in ckpt:
        raise CheckpointError(f"the checkpoint has no {name}")
    try:
        model = make(ckpt[f"{name}_config"])
        model.load_state_dict(ckpt[name])
    except (ValueError, RuntimeError) as e:  # a checkpoint from another version of this file
        why = " ".join(str(e).split())[:240]  # load_state_dict's first line names no key: its second does
        raise CheckpointError(f"the checkpoint's {name} does not fit this vq.py ({why}): train it again with this "
                              "version") from None
    return model.eval()
