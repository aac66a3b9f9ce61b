"""Contract tests, CPU only, minutes: data, metrics, quantizer, VQ-VAE, prior, checkpoints, scripts.

Run with `TRITON_INTERPRET=1 python -m pytest -q test_vq.py kernels` (the kernel tests need the flag).
"""

import errno
import gzip
import importlib.util
import itertools
import json
import math
import os
import re
import shutil
import shlex
import signal
import socket
import subprocess
import sys
import time
import types
import warnings
import zlib
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sample
import train
import vq
from kernels.bench import write_phantom_tree
from vq import DataError, PixelCNN, PriorConfig, SkippedFileWarning, find_splits, load_slices, phantom_slices


@pytest.fixture(autouse=True)
def _quick_critics(monkeypatch):
    """The realism report's critics train 1,000 steps: 3 of the suite's minutes in tests of its wiring. Tests
    of what a critic learns give two_sample_score their own steps."""
    monkeypatch.setattr(sample, "CRITIC_STEPS", 50)


# ----------------------------------------------------------------------------- data


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), path)
    return path


def skipped_paths(records):
    """How often each path was named in a SkippedFileWarning."""
    counts = {}
    for r in records:
        if issubclass(r.category, SkippedFileWarning):
            path = str(r.message).split("skipped ", 1)[1].split(": ", 1)[0]
            counts[path] = counts.get(path, 0) + 1
    return counts


def test_hipmri_tree_mixed_shapes_dtypes_and_labels_never_read(tmp_path):
    rng, root, cache = np.random.default_rng(0), tmp_path / "data", tmp_path / "cache"
    train = root / "keras_slices_train"
    for z in range(4):
        save(train / f"case_004_week_0_slice_{z}.nii.gz", rng.uniform(0, 900, (256, 128)))  # float64
    for z in range(2):  # the odd 256 x 144 volume
        save(train / f"case_019_week_1_slice_{z}.nii.gz", rng.uniform(100, 200, (256, 144)).astype(np.float32))
    save(train / "case_020_week_0_slice_0.nii.gz", rng.integers(0, 4000, (256, 128, 1)).astype(np.uint16))
    save(train / "case_021_week_0_slice_0.nii.gz", rng.uniform(0, 1, (197, 233)).astype(np.float32))
    save(train / "seg_004_week_0_slice_0.nii.gz", np.ones((64, 64), np.uint8))  # a stray label file
    for z in range(2):
        save(root / "keras_slices_validate" / f"case_036_week_0_slice_{z}.nii.gz", rng.uniform(0, 5, (256, 128)))
    save(root / "keras_slices_test" / "case_040_week_0_slice_0.nii.gz", rng.uniform(0, 5, (256, 128)))
    for z in range(5):  # more labels than images, all integers: would show in the counts if read
        save(root / "keras_slices_seg_train" / f"seg_004_week_0_slice_{z}.nii.gz", np.full((256, 128), z % 6, np.uint8))

    splits = find_splits(root)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "validate": 2, "test": 1}
    assert not any("seg" in p.name or "seg" in p.parent.name for v in splits.values() for p in v)
    x = load_slices(splits["train"], cache_dir=cache)
    assert x.shape == (8, 1, 256, 128) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9
    assert load_slices(train, cache_dir=cache).shape == (8, 1, 256, 128)  # folder: seg_ skipped
    assert load_slices(splits["validate"], cache_dir=cache).shape == (2, 1, 256, 128)

    wide = x[4, 0]  # 256 x 144 -> scaled by 128/144 to 228 x 128, padded with 14 zero rows each side
    assert (wide[:14] == 0).all() and (wide[242:] == 0).all()
    assert (wide[14:242].mean(1) > 0.2).all()
    odd = x[7, 0]  # 197 x 233 -> scaled by 128/233 to 108 x 128, padded with 74 zero rows each side
    assert (odd[:74] == 0).all() and (odd[182:] == 0).all() and (odd[74:182].mean(1) > 0.2).all()


def salted_folder(root):
    rng = np.random.default_rng(1)
    good = save(root / "a_good.nii.gz", rng.uniform(0, 100, (256, 128)).astype(np.float32))
    save(root / "b_const.nii.gz", np.full((256, 128), 7.0, np.float32))
    nan = rng.uniform(0, 100, (256, 128)).astype(np.float32)
    nan[:10, :10], nan[20, 20], nan[30, 30] = np.nan, np.inf, -np.inf
    save(root / "c_nan.nii.gz", nan)
    vol = np.zeros((256, 128, 5), np.float32)
    for k in range(5):  # slice k: a bright band at rows 40k..40k+20, to check the order
        vol[40 * k:40 * k + 20, :, k] = 100
    save(root / "d_volume.nii.gz", vol)
    bad = [root / "e_truncated.nii.gz", root / "f_empty.nii.gz", root / "g_text.nii.gz", root / "h_4d.nii.gz",
           root / "i_flipped.nii.gz"]
    bad[0].write_bytes(good.read_bytes()[:2000])
    bad[1].write_bytes(b"")
    bad[2].write_text("this is not a NIfTI file\n")
    save(bad[3], rng.uniform(0, 1, (8, 8, 3, 2)).astype(np.float32))
    flipped = bytearray(good.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # one byte changed in the gzip stream: its CRC no longer matches
    bad[4].write_bytes(flipped)
    return bad


def test_salted_folder_skips_each_bad_file_once(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    bad = salted_folder(data)
    info = {}
    with pytest.warns(UserWarning) as rec:  # SkippedFileWarnings, and the NaN/inf summary
        x = load_slices(data, cache_dir=cache, info=info)
    assert skipped_paths(rec) == {str(p): 1 for p in bad}
    assert any("NaN/inf" in str(r.message) for r in rec)
    assert x.shape == (8, 1, 256, 128)  # good, const, nan, 5 from the volume
    assert not torch.isnan(x).any() and 0 <= x.min() and x.max() <= 1
    assert (x[1] == 0).all()  # the constant slice
    assert info["nonfinite"] == 102 and info["files"] == 9 and not info["cached"]
    said = [str(r.message) for r in rec if "NaN/inf" in str(r.message)]  # the file holding them, not all 8
    assert said == [f"102 NaN/inf values set to 0 in {data / 'c_nan.nii.gz'}, of {data}"]
    save(data / "c_nan_2.nii.gz", np.where(np.arange(128) == 3, np.nan, 1 + np.eye(256, 128)).astype(np.float32))
    with pytest.warns(UserWarning) as rec:  # two holders, cold then warm (from the cache): the same line
        for _ in range(2):
            load_slices(data, cache_dir=cache)
    said = [str(r.message) for r in rec if "NaN/inf" in str(r.message)]
    assert said == [f"358 NaN/inf values set to 0 in {data / 'c_nan.nii.gz'} and 1 more, of {data}"] * 2
    assert [p for p, _ in info["skipped"]] == [str(p) for p in bad]
    why = dict(info["skipped"])
    assert "4-D" in why[str(bad[3])] and why[str(bad[0])].startswith("cut short: its gzip data end early")
    assert why[str(bad[4])].startswith("corrupt gzip data: Error -3")
    for k in range(5):  # the volume, one image per slice, in order
        assert x[3 + k, 0, 40 * k + 5:40 * k + 15].mean() > 0.9
    for cache_dir in (False, cache):  # cold and warm
        with pytest.raises(DataError, match="e_truncated"):
            load_slices(data, strict=True, cache_dir=cache_dir)


def test_each_slice_scaled_by_its_own_percentiles_so_hot_pixels_clip(tmp_path):
    # 0.5 / 99.5 percentiles, nearest rank over the slice's pixels: a few hot pixels clip at 1, not squash the rest
    rng = np.random.default_rng(3)
    a = (300 + 200 * rng.random((48, 40))).astype(np.float32)
    a[rng.integers(0, 48, 5), rng.integers(0, 40, 5)] = 1e5  # hot pixels, under 0.5% of 1920
    nib.save(nib.Nifti1Image(np.stack([a, 2 * a + 7], -1), np.eye(4)), tmp_path / "two.nii")  # a stack of two
    got = load_slices(tmp_path / "two.nii", (48, 40), cache_dir=False)
    for k, img in enumerate((a, 2 * a + 7)):
        ranked = np.sort(img.ravel())
        lo, hi = ranked[round(0.005 * (img.size - 1))], ranked[round(0.995 * (img.size - 1))]
        want = np.clip((img - lo) / (hi - lo), 0, 1)
        assert np.abs(got[k, 0].numpy() - want).max() < 1e-3, k  # float16 storage
        assert 0.3 < got[k, 0].numpy().mean() < 0.7  # min-max scaling would crush it near 0
    sparse = np.zeros((1, 48, 40), np.float32)  # 10 bright pixels in 1920: both percentiles are background
    sparse[0, 3, :10] = 5 + np.arange(10)
    lo, hi = np.percentile(a, [0.5, 99.5], method="nearest")  # float32, not stored as float16: exactly
    assert np.abs(vq._normalise(a[None].copy()) - np.clip((a - lo) / (hi - lo), 0, 1)).max() < 1e-6
    got = vq._normalise(sparse)
    assert got.max() == 1 and got[0, 3, 0] == pytest.approx(5 / 14) and (got[0, 4:] == 0).all()  # the full range


def test_a_broken_link_named_like_a_slice_is_named_as_skipped(tmp_path):
    save(tmp_path / "case_1_slice_0.nii.gz", np.random.default_rng(5).uniform(0, 9, (16, 12)).astype(np.float32))
    os.symlink(tmp_path / "gone.nii.gz", tmp_path / "case_1_slice_1.nii.gz")  # not passed over without a word
    (tmp_path / "case_1_slice_2.nii.gz").mkdir()  # a folder so named is no slice file
    with pytest.warns(vq.SkippedFileWarning, match=r"case_1_slice_1.nii.gz: FileNotFoundError") as rec:
        assert len(load_slices(tmp_path, (16, 12), cache_dir=False)) == 1
    assert len(rec) == 1
    with pytest.raises(DataError, match="case_1_slice_1"):
        load_slices(tmp_path, (16, 12), strict=True, cache_dir=False)


def test_complex_slices_read_as_magnitude_and_float64_overflow_counts_as_non_finite(tmp_path):
    rng = np.random.default_rng(4)
    mag, phase = 50 + 100 * rng.random((40, 24)), rng.uniform(-np.pi, np.pi, (40, 24))
    save(tmp_path / "a" / "c.nii", (mag * np.exp(1j * phase)).astype(np.complex64))  # real part: noise of sign
    save(tmp_path / "b" / "c.nii", mag.astype(np.float32))
    big = 1 + rng.random((40, 24))
    big[:2, :3] = 1e300  # float64 only: inf once float32
    save(tmp_path / "d" / "c.nii", big)
    info = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", np.exceptions.ComplexWarning)
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "overflow encountered in cast"
        got, want = (load_slices(tmp_path / k, (40, 24), cache_dir=False) for k in "ab")
        with pytest.warns(UserWarning, match="6 NaN/inf values set to 0"):
            load_slices(tmp_path / "d", (40, 24), cache_dir=False, info=info)
    assert (got - want).abs().max() < 2e-3 and info["nonfinite"] == 6  # float16 storage

def test_shrinking_is_antialiased(tmp_path):
    # stripes one pixel on, two off, shrunk 4x: an antialiased filter sees a third everywhere; sampling between
    # two pixels would alias them into bands of 0, 0.5 and 1
    a = np.tile((np.arange(96) % 3 == 0).astype(np.float32), (96, 1))
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "stripes.nii")
    got = load_slices(tmp_path / "stripes.nii", (24, 24), cache_dir=False)[0, 0, 2:-2, 2:-2]  # edges: zero-padded
    assert abs(got.mean().item() - 1 / 3) < 0.03 and got.std().item() < 0.05


def test_nothing_readable_and_missing_folder(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.nii.gz").write_bytes(b"")
    (tmp_path / "junk" / "b.nii").write_text("hello")
    with pytest.warns(SkippedFileWarning), pytest.raises(DataError, match=r"no readable slices in \S*junk \(2 skipped: "
                                                                   r"\S*a.nii.gz: empty file, ...\)$"):
        load_slices(tmp_path / "junk", cache_dir=False)
    with pytest.raises(DataError, match="missing"):
        load_slices(tmp_path / "missing", cache_dir=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no slice files"):
        load_slices(tmp_path / "empty", cache_dir=False)
    with pytest.raises(DataError, match="missing"):
        find_splits(tmp_path / "missing")
    (tmp_path / "keras_slices_seg_train").mkdir()
    with pytest.raises(DataError, match="label folder"):
        load_slices(tmp_path / "keras_slices_seg_train", cache_dir=False)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((7, 9), dtype=np.float32), np.eye(4)), tmp_path / "a.nii")
    for bad in (64, (0, 64), (64,), (64, -3)):  # the size named, not each file skipped for a ZeroDivisionError
        with pytest.raises(ValueError, match=r"size must be \(H, W\), each at least 1"):
            load_slices(tmp_path / "a.nii", bad, cache_dir=False)


def test_png_slices(tmp_path, monkeypatch):
    Image = pytest.importorskip("PIL.Image")
    images = (phantom_slices(3, size=(256, 256))[:, 0].numpy() * 255).astype(np.uint8)
    for i, im in enumerate(images):  # OASIS-style 8-bit greyscale
        Image.fromarray(im).save(tmp_path / f"case_001_slice_{i}.nii.png")
    x = load_slices(tmp_path, size=(128, 128), cache_dir=False)
    assert x.shape == (3, 1, 128, 128) and 0 <= x.min() and x.max() <= 1 and x.std() > 0.1
    (tmp_path / "case_001_slice_9.nii.png").write_bytes(b"\x89PNG not an image")
    with pytest.warns(vq.SkippedFileWarning) as rec:  # said in words, not with a buffer object's address
        assert torch.equal(load_slices(tmp_path, size=(128, 128), cache_dir=False), x)
    assert [str(r.message).split(": ", 1)[1] for r in rec] == ["not an image Pillow can read"]
    monkeypatch.setitem(sys.modules, "PIL", None)  # as if Pillow were not installed
    with pytest.raises(DataError, match="pip install pillow"):
        load_slices(tmp_path, cache_dir=False)


def test_sample_turns_inputs_of_the_other_kind_to_the_models_orientation(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    stored = phantom_slices(1, size=(48, 32), seed=4)[0, 0].numpy()  # a NIfTI slice as stored, upright after rot90
    save(tmp_path / "a.nii.gz", stored * 100)
    Image.fromarray((np.rot90(stored) * 255).round().astype(np.uint8)).save(tmp_path / "a.png")  # as shown: upright
    for rot, size in ((1, (24, 16)), (0, (16, 24))):  # a NIfTI-trained model, then a PNG-trained one
        (_, png), (_, nii) = sample._read_inputs([tmp_path / "a.png", tmp_path / "a.nii.gz"], size, rot)
        assert png.shape == nii.shape == (1, 1, *size)
        assert (png - nii).abs().max() < 0.02  # the same anatomy, the same way up (8-bit rounding apart)
        assert (png - nii.flip(2, 3)).abs().max() > 0.2  # which a turn the wrong way would not give
        sample._write_slices(tmp_path / "out.nii.gz", nii, rot)  # an output: stored as NIfTI slices are
        assert nib.load(tmp_path / "out.nii.gz").shape == (24, 16)  # as a.nii.gz, whichever the model's way
        back = sample._read_inputs([tmp_path / "out.nii.gz"], size, rot)[0][1]  # read back the same way up
        assert back.shape == nii.shape and torch.corrcoef(torch.stack([back.flatten(), nii.flatten()]))[0, 1] > 0.99
    out = capsys.readouterr().out
    assert out.count("turned the model's way up") == 3 and "trained on NIfTI" in out and "on PNG" in out  # + out


def test_png_pictures_beside_nifti_slices_are_left_out(tmp_path):
    rng = np.random.default_rng(5)
    for z in (10, 2):
        save(tmp_path / f"case_003_slice_{z}.nii.gz", rng.uniform(0, 70, (48, 24)).astype(np.float32))
    for name in ("grid.png", "case_003_slice_4.png"):  # pictures: not even read, so any bytes will do
        (tmp_path / name).write_bytes(rng.bytes(64))
    with pytest.warns(SkippedFileWarning, match=r"skipped 2 PNG .*case_003_slice_4.png, grid.png") as rec:
        x = load_slices(tmp_path, size=(48, 24), cache_dir=False)
    assert len(rec) == 1 and x.shape == (2, 1, 48, 24)
    files = [tmp_path / f"case_003_slice_{z}.nii.gz" for z in (2, 10)]
    assert torch.equal(x, load_slices(files, size=(48, 24), cache_dir=False))  # slice_2 before slice_10


def test_cache_hit_invalidation_and_location(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    rng = np.random.default_rng(2)
    # uncompressed .nii: a rewrite keeps the file size, so only the mtime can invalidate the cache
    files = [save(data / f"case_001_slice_{z}.nii", rng.uniform(0, 50, (64, 32)).astype(np.float32)) for z in range(5)]
    (data / "zz_bad.nii.gz").write_bytes(b"")
    before = sorted(os.listdir(data))
    infos = [{}, {}]
    for info in infos:
        with pytest.warns(SkippedFileWarning) as rec:  # again on the warm load
            out = load_slices(data, size=(64, 32), cache_dir=cache, info=info)
        assert skipped_paths(rec) == {str(data / "zz_bad.nii.gz"): 1}
        if info is infos[0]:
            first = out
    assert not infos[0]["cached"] and infos[1]["cached"] and torch.equal(first, out)
    assert sorted(os.listdir(data)) == before and any(cache.glob("*.npy"))  # cache beside, never inside, the data

    new = rng.uniform(0, 50, (64, 32)).astype(np.float32)
    new[:32] = 0  # different content, and a later mtime
    size = files[2].stat().st_size
    save(files[2], new)
    st = files[2].stat()
    assert st.st_size == size
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    info = {}
    with pytest.warns(SkippedFileWarning):
        again = load_slices(data, size=(64, 32), cache_dir=cache, info=info)
    assert not info["cached"] and (again[2, 0, :32] == 0).all() and not torch.equal(again[2], first[2])
    assert torch.equal(again[[0, 1, 3, 4]], first[[0, 1, 3, 4]])
    old = files[3].stat()  # rewritten with its size and mtime kept, as cp -p, rsync -t or tar leave a file
    save(files[3], new)
    os.utime(files[3], ns=(old.st_atime_ns, old.st_mtime_ns))
    with pytest.warns(SkippedFileWarning):
        third = load_slices(data, size=(64, 32), cache_dir=cache, info=info)
    assert not info["cached"] and torch.equal(third[3], again[2]) and not torch.equal(third[3], again[3])

    monkeypatch.setenv("VQ_CACHE_DIR", str(tmp_path / "env_cache"))
    load_slices(files[:2], size=(64, 32))
    assert any((tmp_path / "env_cache").glob("*.npy"))
    (tmp_path / "not_a_dir").write_text("")
    with pytest.warns(UserWarning, match="could not write the slice cache"):
        assert len(load_slices(files[:2], size=(64, 32), cache_dir=tmp_path / "not_a_dir" / "c")) == 2

    def short(f, arr):  # NumPy's write to a full disk: an OSError without errno or strerror
        raise OSError("1000 requested and 131 written")
    monkeypatch.setattr(np, "save", short)
    with pytest.warns(UserWarning, match=r"slice cache in \S+full: write cut short \(1000 requested and 131 written\): "
                      r"a full disk\?$"):  # it read "[Errno None] None: '...npy'"
        assert len(load_slices(files[:2], size=(64, 32), cache_dir=tmp_path / "full")) == 2
    assert not list((tmp_path / "full").iterdir())  # no half cache
    monkeypatch.undo()
    (tmp_path / "cfile").write_text("")  # VQ_CACHE_DIR set to a file: said so (was "File exists"), once a run
    said = []
    with sample.warnings_as_lines(said.append):
        for _ in range(3):  # as train.py loads its three splits
            load_slices(files[:2], size=(64, 32), cache_dir=tmp_path / "cfile")
    assert said == [f"could not write the slice cache in {tmp_path / 'cfile'}: it is a file, not a folder"]


def test_cache_from_an_older_version_is_read_again(tmp_path):
    # the previous version wrote no "counts" into the cache's metadata: a traceback on the next run
    rng = np.random.default_rng(5)
    for z in range(3):
        save(tmp_path / "d" / f"case_001_slice_{z}.nii.gz", rng.uniform(0, 9, (32, 16)).astype(np.float32))
    first = load_slices(tmp_path / "d", size=(32, 16), cache_dir=tmp_path / "c")
    meta_file = next((tmp_path / "c").glob("*.json"))
    meta = json.loads(meta_file.read_text())
    del meta["counts"]
    meta_file.write_text(json.dumps(meta))
    info = {}
    again = load_slices(tmp_path / "d", size=(32, 16), cache_dir=tmp_path / "c", info=info)
    assert not info["cached"] and torch.equal(again, first) and info["positions"] == [0.0, 0.5, 1.0]


def test_cache_keyed_by_size_so_the_same_files_at_another_size_are_decoded_again(tmp_path):
    rng = np.random.default_rng(6)
    for z in range(2):
        save(tmp_path / "d" / f"case_001_slice_{z}.nii.gz", rng.uniform(0, 9, (32, 16)).astype(np.float32))
    small = load_slices(tmp_path / "d", size=(32, 16), cache_dir=tmp_path / "c")
    info = {}
    big = load_slices(tmp_path / "d", size=(48, 24), cache_dir=tmp_path / "c", info=info)
    assert not info["cached"] and big.shape == (2, 1, 48, 24)
    assert torch.equal(big, load_slices(tmp_path / "d", size=(48, 24), cache_dir=False))
    assert torch.equal(small, load_slices(tmp_path / "d", size=(32, 16), cache_dir=tmp_path / "c", info=info))
    assert info["cached"]


def test_cache_keeps_no_reading_failure(tmp_path, monkeypatch):
    files = [save(tmp_path / "d" / f"case_001_slice_{z}.nii.gz", np.random.default_rng(z).uniform(0, 9, (32, 16)))
             for z in range(3)]
    real = Path.read_bytes

    def denied(self):  # as a file without read permission would (root ignores chmod, so simulated)
        if self == files[1]:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    info = {}
    with pytest.warns(SkippedFileWarning, match="Permission denied"):
        assert len(load_slices(tmp_path / "d", size=(32, 16), cache_dir=tmp_path / "c", info=info)) == 2
    monkeypatch.setattr(Path, "read_bytes", real)  # the permission is fixed; the file did not change
    info = {}
    assert len(load_slices(tmp_path / "d", size=(32, 16), cache_dir=tmp_path / "c", info=info)) == 3
    assert info["skipped"] == [] and not info["cached"]
    assert len(load_slices(tmp_path / "d", size=(32, 16), cache_dir=tmp_path / "c", info=info)) == 3
    assert info["cached"]  # a clean read is cached as usual


def test_parallel_equals_serial(tmp_path):
    rng = np.random.default_rng(3)
    files = [save(tmp_path / f"s_{i}.nii.gz", rng.uniform(0, 9, (40, 24)).astype(np.float32)) for i in range(70)]
    (tmp_path / "s_70.nii.gz").write_text("bad")
    save(tmp_path / "s_35b.nii.gz", rng.uniform(0, 9, (40, 24, 3)).astype(np.float32))  # a volume: 3 images after s_35
    infos = [{}, {}]
    with pytest.warns(SkippedFileWarning):
        serial = load_slices(tmp_path, size=(32, 16), cache_dir=False, workers=1, info=infos[0])
    with pytest.warns(SkippedFileWarning):
        parallel = load_slices(tmp_path, size=(32, 16), cache_dir=False, workers=2, info=infos[1])
    assert serial.shape == (73, 1, 32, 16) and torch.equal(serial, parallel)
    assert infos[0] == infos[1] and infos[0]["files"] == 72
    single = load_slices(files, size=(32, 16), cache_dir=False, workers=2)  # a list, kept in order
    assert torch.equal(single, torch.cat([serial[:36], serial[39:]]))
    raw = gzip.decompress(files[5].read_bytes())  # the same file as two gzip members (gzip -c a b > c)
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    assert torch.equal(load_slices([tmp_path / "two.nii.gz"], (32, 16), cache_dir=False), serial[5:6])


def test_find_splits_hipmri_oasis_nested(tmp_path):
    hip = write_phantom_tree(tmp_path / "hip", n_train=6, n_val=2, n_test=2, size=(32, 16), slices_per_volume=2)
    splits = find_splits(hip)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "validate": 2, "test": 2}
    assert [p.name for p in splits["train"][:2]] == ["case_004_week_0_slice_0.nii.gz", "case_004_week_0_slice_1.nii.gz"]
    cases = {k: {p.name[:8] for p in v} for k, v in splits.items()}
    assert not (cases["train"] & cases["validate"]) and not (cases["validate"] & cases["test"])
    seg = sorted((hip / "keras_slices_seg_train").iterdir())
    assert len(seg) == 6 and np.asanyarray(nib.load(seg[0]).dataobj).max() <= 5
    x = load_slices(splits["test"], size=(32, 16), cache_dir=False)
    assert x.shape == (2, 1, 32, 16) and x.max() > 0.9

    nested = tmp_path / "unzipped"
    write_phantom_tree(nested / "keras_slices_data", n_train=2, n_val=1, n_test=1, size=(16, 8))
    assert [len(v) for v in find_splits(nested).values()] == [2, 1, 1]

    oasis = tmp_path / "oasis"
    for split, n in (("train", 3), ("validate", 2), ("test", 1)):
        for folder, prefix in ((f"keras_png_slices_{split}", "case"), (f"keras_png_slices_seg_{split}", "seg")):
            (oasis / folder).mkdir(parents=True)
            for i in range(n):
                (oasis / folder / f"{prefix}_{i:03d}_slice_0.nii.png").write_bytes(b"\x89PNG")
    splits = find_splits(oasis)
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "validate": 2, "test": 1}
    assert all(p.parent.name == f"keras_png_slices_{k}" for k, v in splits.items() for p in v)
    with pytest.warns(vq.SplitWarning, match=r"one split of the layout in \S*oasis, .*--data \S*oasis reads"):
        assert sorted(map(len, find_splits(oasis / "keras_png_slices_train").values())) == [1, 1, 1]  # by case
    with pytest.raises(DataError, match="label folder"):
        find_splits(oasis / "keras_png_slices_seg_train")

    (tmp_path / "partial" / "keras_slices_train").mkdir(parents=True)
    (tmp_path / "partial" / "keras_slices_test").mkdir()
    with pytest.raises(DataError, match="no validate folder .a name ending in _validate, beside keras_slices_train, "
                                        "keras_slices_test"):
        find_splits(tmp_path / "partial")
    with warnings.catch_warnings():  # not a whole layout: no word of it
        warnings.simplefilter("error", vq.SplitWarning)
        with pytest.raises(DataError, match="no slice files"):
            find_splits(tmp_path / "partial" / "keras_slices_train")
    (tmp_path / "partial" / "keras_slices_validate").mkdir()  # there, but empty: named, not 'no slice files given'
    (tmp_path / "partial" / "keras_slices_train" / "case_001_slice_0.nii.gz").write_bytes(b"x")
    (tmp_path / "partial" / "keras_slices_test" / "case_002_slice_0.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"no slice files \(.nii, .nii.gz, .png\) in \S*partial.keras_slices_validate$"):
        find_splits(tmp_path / "partial")


def test_splits_of_two_kinds_are_refused_before_any_slice_is_read(tmp_path, monkeypatch):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    for split, c in itertools.product(("train", "validate"), range(2)):
        save(tmp_path / f"keras_slices_{split}" / f"case_{split[0]}{c}_slice_0.nii.gz", rng.uniform(0, 9, (16, 16)))
    (tmp_path / "keras_slices_test").mkdir()
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(tmp_path / "keras_slices_test" / "c_0.png")
    monkeypatch.setattr(vq, "load_slices", None)  # NIfTI and PNG slices lie turned to each other: one rot90 fails
    with pytest.raises(DataError, match=r"mix PNG and NIfTI slices \(train NIfTI, validate NIfTI, test PNG\)"):
        vq.load_splits({"source": str(tmp_path), "size": [16, 16]})


def test_sample_reads_a_split_folder_it_was_trained_on_without_a_warning(tmp_path):
    rng = np.random.default_rng(2)
    for split in ("train", "validate", "test"):
        for c in range(3):
            save(tmp_path / f"keras_slices_{split}" / f"case_{c}{split}_slice_0.nii.gz", rng.uniform(0, 9, (16, 16)))
    settings = {"source": str(tmp_path / "keras_slices_train"), "size": [16, 16]}
    with pytest.warns(vq.SplitWarning, match="one split of the layout"):  # train.py says it, once
        want = vq.load_splits(settings)
    with warnings.catch_warnings():  # sample.py reads the same slices, and says nothing of it
        warnings.simplefilter("error")
        got = sample._own_data({"data": want["settings"]})
    assert all(torch.equal(got[k], want[k]) and len(got[k]) == 1 for k in ("train", "validate", "test"))


def test_find_splits_plain_folder_by_case(tmp_path):
    for c in range(12):
        for z in range(3):
            (tmp_path / f"case_{c:03d}_week_0_slice_{z}.nii.gz").write_bytes(b"x")
            (tmp_path / f"seg_{c:03d}_week_0_slice_{z}.nii.gz").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a slice")
    splits = find_splits(tmp_path)
    assert splits == find_splits(tmp_path)
    cases = {k: {p.name[:8] for p in v} for k, v in splits.items()}
    assert all(cases.values()) and sum(len(c) for c in cases.values()) == 12
    train, val, test = cases.values()
    assert not (train & val or train & test or val & test)
    paths = [p for v in splits.values() for p in v]
    assert len(paths) == 36 and not any(p.name.startswith("seg_") for p in paths)
    assert len(cases["train"]) >= 8

    few = tmp_path / "few"
    few.mkdir()
    for name in ("case_001_slice_0.nii", "case_001_slice_1.nii", "case_002_slice_0.nii"):
        (few / name).write_bytes(b"x")
    with pytest.raises(DataError, match="at least 3 cases \\(found 2: case_001, case_002\\)"):
        find_splits(few)


def test_each_split_of_a_plain_folder_keeps_its_volumes_in_slice_order(tmp_path):
    zs = (10, 2, 1, 11)  # as text slice_10 < slice_2: a split sorted as text scrambles each volume
    for c in range(6):
        for z in zs:
            (tmp_path / f"case_{c:03d}_slice_{z}.nii").write_bytes(b"x")
    splits = find_splits(tmp_path)
    for s, files in splits.items():
        got = [(f.name.split("_slice_")[0], int(f.name.split("_slice_")[1].split(".")[0])) for f in files]
        assert got == sorted(got) and len(got) % len(zs) == 0, s


def test_a_zip_unpacked_on_a_mac_and_a_val_folder(tmp_path):
    # macOS zips add __MACOSX/<the same tree> of ._ resource files: never a second data set; _val names a split
    for top in ("keras_slices_data", "__MACOSX/keras_slices_data"):
        for split, n in (("train", 3), ("val", 2), ("test", 1)):
            d = tmp_path / top / f"keras_slices_{split}"
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{'._' * top.startswith('_')}case_{split}{i}_slice_0.nii.gz").write_bytes(b"x")
    splits = find_splits(tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "validate": 2, "test": 1}
    where = {p.parent.relative_to(tmp_path).as_posix() for p in splits["validate"]}
    assert where == {"keras_slices_data/keras_slices_val"}


def test_positions_need_a_slice_number_in_every_name():
    named = [Path(f"case_001_slice_{z}.nii.gz") for z in (0, 4)]
    assert vq._positions(named, [1, 1], scan=False) == [0.0, 1.0]
    assert vq._positions([*named, Path("case_001_extra.nii.gz")], [1, 1, 1], scan=False) is None  # not [0, 1]
    assert vq._positions([*named, Path("vol.nii.gz")], [1, 1, 3], scan=False) == [0.0, 1.0, 0.0, 0.5, 1.0]


def test_plain_folder_grouped_by_patient_prefix(tmp_path):
    for p in range(10):  # no case_XXX: patient 'p07', slice 's012'
        for z in range(4):
            (tmp_path / f"p{p:02d}_s{z:03d}.nii.gz").write_bytes(b"x")
    splits = find_splits(tmp_path)
    owners = {k: {f.name[:3] for f in v} for k, v in splits.items()}
    assert sum(len(o) for o in owners.values()) == 10  # every patient in exactly one split
    assert all(len(v) % 4 == 0 for v in splits.values())
    flair = tmp_path / "flair"  # the slice number is the last number, not the name's end
    flair.mkdir()
    for p, z in itertools.product(range(10), range(4)):
        (flair / f"p{p:02d}_s{z:03d}_flair.nii.gz").write_bytes(b"x")
    owners = {k: {f.name[:3] for f in v} for k, v in find_splits(flair).items()}
    assert sum(len(o) for o in owners.values()) == 10 and all(len(v) % 4 == 0 for v in find_splits(flair).values())
    for form in ("patient_{p:03d}_week_{w}_slice_{z}", "sub-{p:02d}_ses-{w}_T2w_{z}", "slice_{z}_Pat{p}_{w}"):
        named = tmp_path / form[:5]  # a patient's id, wherever it is in the name: two weeks, one split
        for p, w, z in itertools.product(range(10), range(2), range(3)):
            (named / form.format(p=p, w=w, z=z)).parent.mkdir(exist_ok=True)
            (named / f"{form.format(p=p, w=w, z=z)}.nii.gz").write_bytes(b"x")
        owners = {k: {re.search(r"(?i)(patient_|sub-|pat)(\d+)", f.name)[2] for f in v}
                  for k, v in find_splits(named).items()}
        assert sum(map(len, owners.values())) == 10, form
    ids = [vq._case_id(n) for n in ("breast3_sub2_slice_1.nii", "breast4_sub2_slice_1.nii", "sub-0A_ses-2_1.nii")]
    assert ids[0] != ids[1] and ids[2] == "sub-0a"  # sub2: a subtraction image, not a patient; BIDS's sub- is
    bare = tmp_path / "bare"
    bare.mkdir()
    for z in range(12):  # nothing names a patient
        (bare / f"img_{z:04d}.nii").write_bytes(b"x")
    with pytest.warns(vq.SplitWarning, match="split file by file"):
        splits = find_splits(bare)
    assert sorted(len(v) for v in splits.values()) == [1, 1, 10]
    two = tmp_path / "two"
    two.mkdir()
    for z in range(10):  # two unnumbered patterns (scan, vol_) are no more patients than one
        (two / f"scan{z}.nii").write_bytes(b"x")
        (two / f"vol_{z}.nii.gz").write_bytes(b"x")
    with pytest.warns(vq.SplitWarning, match="split file by file"):
        splits = find_splits(two)
    assert sorted(len(v) for v in splits.values()) == [2, 2, 16]

    folders = tmp_path / "by_patient"  # a folder per patient: each folder one case, whatever its files are named
    for p in range(10):
        (folders / f"patient{p}").mkdir(parents=True)
        for z in range(2 + p % 3):
            (folders / f"patient{p}" / f"slice_{z}.nii.gz").write_bytes(b"x")
    (folders / "patient9_seg").mkdir()  # a label folder: never a case
    (folders / "patient9_seg" / "slice_0.nii.gz").write_bytes(b"x")
    (folders / "seg_0_slice_0.nii.gz").write_bytes(b"x")  # a label file beside them: never read, nothing said
    with warnings.catch_warnings():
        warnings.simplefilter("error", vq.SplitWarning)
        splits = find_splits(folders)
    owners = {k: [f.parent.name for f in v] for k, v in splits.items()}
    assert sum(len(set(o)) for o in owners.values()) == 10 and sum(map(len, owners.values())) == 29
    for z in range(3):  # loose slices beside the patient folders: those are read, the folders named as left out
        (folders / f"case_{z}_slice_0.nii.gz").write_bytes(b"x")
    with pytest.warns(vq.SplitWarning, match=r"holds slice files and folders of slices \(patient0, patient1, "):
        assert sum(map(len, find_splits(folders).values())) == 3
    for z in range(3):
        (folders / f"case_{z}_slice_0.nii.gz").unlink()
    assert all(o == sorted(o, key=lambda n: int(n[7:])) for o in owners.values())  # a patient's slices together
    files = [folders / "patient0" / "slice_0.nii.gz", folders / "patient0" / "slice_1.nii.gz",
             folders / "patient2" / "slice_3.nii.gz", folders / "patient2" / "slice_1.nii.gz"]
    assert vq._positions(files, [1] * 4) == [0.0, 1.0, 1.0, 1 / 3]  # each folder its own volume
    (folders / "loose_0.nii.gz").write_bytes(b"x")  # a slice in the root: its files are the cases, as before
    with pytest.raises(DataError, match="found 1: loose_"), pytest.warns(vq.SplitWarning, match="are not read"):
        find_splits(folders)
    for p in range(1, 10):
        shutil.rmtree(folders / f"patient{p}")
    (folders / "loose_0.nii.gz").unlink()
    (folders / "patient5").mkdir()
    (folders / "patient5" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"at least 3 cases \(found 2: patient0, patient5\)"):
        find_splits(folders)


def test_phantom_slices():
    x = phantom_slices(8)
    assert x.shape == (8, 1, 256, 128) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.1
    assert torch.equal(phantom_slices(5)[3], x[3])  # slice i depends on (seed, i) only
    assert not torch.equal(phantom_slices(5, seed=1)[3], x[3])
    assert all((x[i] - x[j]).abs().mean() > 0.01 for i in range(8) for j in range(i))
    assert (x[:, 0, :, 0] < 0.1).all() and (x[:, 0, 128, 64] > 0.05).all()  # air at the edge, tissue in the middle
    small = phantom_slices(3, size=(128, 64), seed=4)
    assert small.shape == (3, 1, 128, 64) and 0 <= small.min() and small.max() <= 1 and small.std() > 0.1


# ----------------------------------------------------------------------------- metrics


def _ssim_reference(x, y, data_range=1.0, foreground=None):
    """Direct float64 SSIM: weighted statistics of every 11 x 11 window, no convolution; with foreground, only the
    windows whose weighted mean of x exceeds it (times data_range)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    r = np.arange(-5, 6)
    g = np.exp(-0.5 * (r / 1.5) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for i in range(5, x.shape[0] - 5):
        for j in range(5, x.shape[1] - 5):
            a, b = x[i - 5:i + 6, j - 5:j + 6], y[i - 5:i + 6, j - 5:j + 6]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            if foreground is None or ma > foreground * data_range:
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def _image_pairs():
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for h, w in [(11, 11), (23, 40), (64, 33)]:
        x = torch.rand(h, w, generator=gen)
        pairs.append((x, (x + 0.1 * torch.randn(h, w, generator=gen)).clamp(0, 1)))  # noisy copy
        pairs.append((x, torch.rand(h, w, generator=gen)))  # unrelated
    ph = vq.phantom_slices(2, (64, 32), seed=5)[:, 0]
    pairs.append((ph[0], ph[1]))  # structured, different anatomy
    pairs.append((ph[0], (ph[0] * 0.8 + 0.05).clamp(0, 1)))  # contrast change
    return pairs


def test_ssim_matches_independent_reference():
    for x, y in _image_pairs():
        got = vq.ssim(x[None, None], y[None, None]).item()
        assert abs(got - _ssim_reference(x, y)) < 1e-4
    for x, y in _image_pairs()[-2:]:  # the body SSIM of phantom slices: their black background left out
        body = vq.ssim(x[None, None], y[None, None], foreground=0.1).item()
        assert abs(body - _ssim_reference(x, y, foreground=0.1)) < 1e-4


def test_ssim_matches_scikit_image_when_installed():
    metrics = pytest.importorskip("skimage.metrics")
    for x, y in _image_pairs():
        want = metrics.structural_similarity(x.double().numpy(), y.double().numpy(), gaussian_weights=True,
                                             sigma=1.5, use_sample_covariance=False, data_range=1)
        assert abs(vq.ssim(x[None, None], y[None, None]).item() - want) < 1e-4


def test_ssim_batched_identity_and_errors():
    x = vq.phantom_slices(3, (64, 32), seed=1)
    y = x.flip(0)
    s = vq.ssim(x, y)
    assert s.shape == (3,)
    assert torch.allclose(vq.ssim(x, x), torch.ones(3), atol=1e-6)
    assert abs(s[1].item() - 1) < 1e-6 and s[0] < 0.99  # the middle image is paired with itself
    with pytest.raises(ValueError):
        vq.ssim(torch.rand(1, 1, 10, 30), torch.rand(1, 1, 10, 30))
    with pytest.raises(ValueError):
        vq.ssim(torch.rand(1, 1, 20, 30), torch.rand(1, 1, 30, 20))


def test_blur_matches_convolution():
    gen = torch.Generator().manual_seed(3)
    # sigma 1.0: 3.5 sigma + 0.5 rounds up to radius 4, where truncating 3.5 sigma alone would give 3
    for shape, sigma in [((2, 1, 13, 29), 1.5), ((3, 2, 40, 17), 2.0), ((1, 1, 11, 11), 0.7), ((2, 1, 12, 15), 1.0)]:
        x = torch.rand(shape, generator=gen, dtype=torch.float64)
        r = int(3.5 * sigma + 0.5)  # scipy's and scikit-image's window: truncate 3.5
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
        g, k = g / g.sum(), 2 * r + 1
        flat = x.reshape(-1, 1, *shape[-2:])
        for valid, pad in ((True, 0), (False, r)):
            if valid and min(shape[-2:]) < k:
                continue
            want = F.conv2d(F.conv2d(flat, g.view(1, 1, k, 1), padding=(pad, 0)), g.view(1, 1, 1, k), padding=(0, pad))
            got = vq._blur(x, sigma, valid=valid)
            assert got.shape == (*shape[:2], *want.shape[-2:])
            assert torch.allclose(got.reshape(want.shape), want, atol=1e-12)


def test_psnr():
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = x + 0.1
    assert torch.allclose(vq.psnr(x, y), torch.full((2,), 20.0), atol=1e-3)
    y = x + torch.tensor([0.1, 0.01])[:, None, None, None]  # per image: 20 and 40 dB, one value each for (H, W)
    assert torch.allclose(vq.psnr(x, y), torch.tensor([20.0, 40.0]), atol=1e-3)
    assert torch.allclose(vq.psnr(x[0, 0], y[0, 0]), torch.tensor([20.0]), atol=1e-3)  # one (H, W) image, as ssim
    with pytest.raises(ValueError, match="equal shapes"):
        vq.psnr(x, y[:, 0])  # would broadcast to the wrong figures
    g = torch.Generator().manual_seed(1)  # 8-bit images with data_range 255: the figures of [0, 1] images
    a, b = torch.rand(3, 1, 23, 17, generator=g), torch.rand(3, 1, 23, 17, generator=g)
    b = 0.7 * a + 0.3 * b
    b[1] = a[1]  # identical images: the MSE floor (1e-10 of the range squared) gives 100 dB, not inf, at any range
    assert torch.allclose(vq.psnr(255 * a, 255 * b, data_range=255), vq.psnr(a, b), atol=1e-4)
    assert torch.allclose(vq.ssim(255 * a, 255 * b, data_range=255), vq.ssim(a, b), atol=1e-5)
    assert vq.psnr(a, b)[1].item() == pytest.approx(100.0) and vq.psnr(a, b)[0] < 100


def test_ssim_foreground_is_a_fraction_of_data_range():
    # foreground is a fraction of data_range: 8-bit slices with data_range 255 keep the same body as [0, 1] ones
    ph = vq.phantom_slices(2, (128, 64), seed=7)  # a sixth to a tenth of the valid region is background
    g = torch.Generator().manual_seed(2)
    y = (0.8 * ph + 0.05 + 0.02 * torch.randn(ph.shape, generator=g)).clamp(0, 1)  # contrast change, some noise
    body = vq.ssim(ph, y, foreground=0.1)
    assert torch.allclose(vq.ssim(255 * ph, 255 * y, data_range=255, foreground=0.1), body, atol=1e-5)
    assert (body - vq.ssim(ph, y)).abs().min() > 1e-3  # the background counts: a body mask that covered it all fails
    for i in range(2):
        assert abs(body[i].item() - _ssim_reference(ph[i, 0], y[i, 0], foreground=0.1)) < 1e-4


# ----------------------------------------------------------------------------- quantizer and VQ-VAE


@pytest.mark.parametrize("levels", [1, 2])
def test_vqvae_shapes_and_gradient_reaches_encoder(levels):
    torch.manual_seed(0)  # not the global state earlier tests leave behind
    for down in (4, 8):
        model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32, downsample=down, levels=levels))
        x = vq.phantom_slices(3, (64, 32), seed=2)
        recon, loss, stats = model(x)
        assert recon.shape == x.shape and loss.ndim == 0
        F.mse_loss(recon, x).backward()  # the reconstruction alone, not the commitment term: it reaches the
        enc_grad = sum(p.grad.abs().sum() for p in model.encoder.parameters())  # encoder only straight through
        assert enc_grad > 0  # the straight-through estimator carries the decoder's gradient
        if levels == 2:  # the top level learns too, and reports its own codebook
            assert sum(p.grad.abs().sum() for p in model.encoder_top.parameters()) > 0
            assert {"usage_top", "perplexity_top"} <= set(stats)
        model.eval()
        codes = model.encode(x)
        h, w = 64 // down, 32 // down
        shapes = [(3, h // 2, w // 2), (3, h, w)] if levels == 2 else [(3, h, w)]
        assert [c.shape for c in vq.as_levels(codes)] == shapes and codes[0].dtype == torch.long
        out = model.decode(codes)
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
        assert torch.allclose(out, model(x)[0].clamp(0, 1), atol=1e-5)  # encode/decode == forward
        assert torch.allclose(model.reconstruct(x, batch_size=2), out, atol=1e-6)  # batches change nothing
        if levels == 2:  # both maps carry information into the picture
            with torch.no_grad():
                model.decoder.net[-1].bias.fill_(0.5)  # away from the clamp at 0, where untrained outputs sit
            top_book = model.quantizer_top.codebook  # each top code swapped for the entry farthest from it
            far = torch.cdist(top_book[codes[0]].flatten(0, -2), top_book).argmax(1).view_as(codes[0])
            other_top = (far, codes[1])
            assert (model.decode(other_top) - model.decode(codes)).abs().max() > 1e-5
        shapes = ((3, 1, 64 + down * levels // 2, 32), (3, 1, 64, 36 if down == 8 else 30), (1, 64, 32), (2, 3, 64, 32))
        for bad in shapes:
            with pytest.raises(ValueError, match=f"multiples of {down * levels}"):
                model(torch.rand(bad))  # a size the code maps cannot tile, or no channel axis: said, not a torch error


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_inference_leaves_a_training_vqvae_as_it_was(rate):
    torch.manual_seed(1)
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32, rate=rate))
    x = vq.phantom_slices(6, (32, 32), seed=4)
    codes = model.encode(x[:1])  # a fresh model: no k-means from one slice, no EMA step, no rate scale
    assert model.training and not model.quantizer.initialised and torch.equal(codes, model.encode(x[:1]))
    model(x)  # a training step's forward: initialised, EMA and scale moved
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes = model.encode(x)
    assert torch.equal(codes, model.encode(x)) and torch.equal(model.reconstruct(x), model.decode(codes))
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.encode(x[:0]).shape == (0, 8, 8) and model.reconstruct(x[:0]).shape == (0, 1, 32, 32)  # none in


def test_the_library_refuses_or_handles_plausible_misuse_as_its_docstrings_say():
    # found by using vq.py copied alone; each check failed before (a silent wrong result or a raw torch error)
    torch.manual_seed(2)
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=7, kmeans_init=False))
    x = vq.phantom_slices(3, (24, 20), seed=6)
    model.train()
    model.quantizer.eval()  # a part the caller froze stays frozen through inference
    codes = model.encode(x)
    assert model.training and model.encoder.training and not model.quantizer.training
    with pytest.raises(ValueError, match=r"float images in \[0, 1\], got \(3, 1, 24, 20\) torch.uint8"):
        model.encode((x * 255).round().byte())  # 0-255 pixels: codes of nonsense before
    with pytest.raises(ValueError, match=r"got \(24, 20\)"):  # the tensor given, not a batch of it
        model.encode(x[0, 0])
    for kind in (torch.int32, torch.int16, torch.uint8):  # any integer codes, as int64 (uint8: once a mask)
        assert torch.equal(model.decode(codes.to(kind)), model.decode(codes))
    for value, says in ((-1, r"codes must be in \[0, 7\), got -1 to "), (7, r"to 7$")):  # -1 was decoded as 6
        bad = codes.clone()
        bad[1, 2, 3] = value
        with pytest.raises(ValueError, match=says):
            model.decode(bad)
    with pytest.raises(ValueError, match="codes must be integers, got torch.float32"):
        model.decode(codes.float())
    prior = small_prior(**RICH)
    c = torch.randint(0, 7, (4, 6, 5))
    where = torch.rand(4)
    prior.train()
    prior.layers[0].eval()
    assert torch.equal(vq.code_bits(prior, c.int(), where), vq.code_bits(prior, c, where))  # int32: cross_entropy's
    assert prior.training and not prior.layers[0].training and prior.layers[1].training
    for call in (lambda w: vq.code_bits(prior, c, w), lambda w: vq.sample_codes(prior, 4, position=w),
                 lambda w: prior.generate(4, position=w),
                 lambda w: vq.surprise(model, prior, torch.cat([x, x[:1]]), 1.0, position=w)):
        for w, says in ((where * 40, r"in \[0, 1\], a number or \(4,\): got shape \(4,\), "),  # a slice index
                        (where[:3], r"got shape \(3,\)"), (where[:, None], r"got shape \(4, 1\)")):
            with pytest.raises(ValueError, match=says):
                call(w)
    with pytest.raises(ValueError, match="without slice positions"):
        small_prior().draw_positions(2)
    y = (x + 0.1 * torch.rand(3, 3, 24, 20)).clamp(0, 1)  # three channels: one figure an image, their mean
    x3 = x.expand(-1, 3, -1, -1)
    per = torch.stack([vq.ssim(x3[:, k], y[:, k]) for k in range(3)], 1)
    assert torch.allclose(vq.ssim(x3, y), per.mean(1)) and vq.ssim(x3, y).shape == (3,)
    mse = (x3 - y).pow(2).flatten(1).mean(1)
    assert torch.allclose(vq.psnr(x3, y), 10 * torch.log10(1 / mse))
    per_body = torch.stack([vq.ssim(x3[:, k], y[:, k], foreground=0.1) for k in range(3)], 1)
    assert torch.allclose(vq.ssim(x3, y, foreground=0.1), per_body.mean(1))
    assert vq.ssim(x3[:0], y[:0]).shape == vq.psnr(x3[:0], y[:0]).shape == (0,)  # an empty batch: none, no error


def test_losses_reach_what_they_should():
    torch.manual_seed(0)
    x = vq.phantom_slices(3, (64, 32), seed=2)
    plain = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32, ssim_weight=0, kmeans_init=False))
    torch.manual_seed(0)
    full = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32, ssim_weight=0.5, kmeans_init=False))
    recon, loss, stats = full(x)
    r = recon.detach().float()
    want = F.mse_loss(r, x) + stats["commit"] + 0.5 * (1 - vq.ssim(x, r).mean())
    assert abs(loss.item() - want.item()) < 1e-4  # every term, with its weight (SSIM: the metric's own)
    # the SSIM term's gradient: a finite difference along the gradient agrees with it
    y = x.clone().requires_grad_(True)
    loss_fn = lambda t: 1 - vq._ssim_terms(x.double(), t)[0].mean()  # noqa: E731
    loss_fn(y.double()).backward()
    step = 1e-3 * y.grad / y.grad.norm()
    with torch.no_grad():
        fd = (loss_fn(y.double() + step.double()) - loss_fn(y.double() - step.double())) / 2
    assert abs(fd.item() - (y.grad * step).sum().item()) < 1e-6
    recon_plain, plain_loss, _ = plain(x)  # the same weights without the SSIM term: the same decode, less that term
    assert torch.allclose(recon_plain, recon, atol=1e-6)
    assert abs(plain_loss.item() - (want - 0.5 * (1 - vq.ssim(x, r).mean())).item()) < 1e-5


def test_code_histogram_without_one_hot():
    q = vq.VectorQuantizer(37, 5, kmeans_init=False).eval()
    z = torch.randn(4, 5, 7, 9, generator=torch.Generator().manual_seed(3))
    _, codes, _, stats = q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 5).double()
    want = torch.cdist(flat, q.codebook.double()).argmin(1)
    assert torch.equal(codes.flatten(), want)
    one_hot = F.one_hot(want, 37).double().sum(0)  # the reference histogram, the way the test may build it
    p = one_hot / one_hot.sum()
    assert abs(stats["perplexity"].item() - torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()) < 1e-3
    assert abs(stats["usage"].item() - (one_hot > 0).double().mean().item()) < 1e-6


def test_fallback_search_never_picks_a_non_finite_code():
    # vq.py without kernels/ follows kernels.nearest_code's policy: NaNs of either sign and infinities
    # lose to every finite code (argmin once chose a NaN code for every row); with none finite, code 0
    g = torch.Generator().manual_seed(5)
    codebook, z = torch.randn(513, 40, generator=g), torch.randn(1000, 40, generator=g)
    z[:40] = codebook[:40] + 0.01 * torch.randn(40, 40, generator=g)  # rows beside codes 0..39
    nan, neg_nan = torch.tensor([0x7FC00000, -0x400000], dtype=torch.int32).view(torch.float32).tolist()
    codebook[0], codebook[1, 3], codebook[7, 39], codebook[20, 0], codebook[512] = \
        neg_nan, nan, neg_nan, float("inf"), -float("inf")
    finite = codebook.isfinite().all(1)
    codes, dist = vq._nearest_code_torch(z, codebook, chunk=64)
    want = torch.cdist(z.double(), codebook[finite].double()).argmin(1)
    assert torch.equal(codes, finite.nonzero()[:, 0][want])
    assert torch.allclose(dist, (z - codebook[codes]).pow(2).sum(1))
    assert (vq._nearest_code_torch(z, torch.full_like(codebook, nan))[0] == 0).all()


def test_nearest_code_of_no_rows_is_empty_and_still_checked(monkeypatch):
    codebook = torch.randn(9, 6, generator=torch.Generator().manual_seed(2))
    for search in (vq._nearest_code_torch, vq._kernel_nearest_code):  # vq.py copied alone, and with kernels/
        monkeypatch.setattr(vq, "_kernel_nearest_code", None if search is vq._nearest_code_torch else search)
        codes, dist = vq.nearest_code(torch.empty(0, 6), codebook)
        assert (codes.shape, codes.dtype, dist.shape, dist.dtype) == ((0,), torch.int64, (0,), torch.float32)
    with pytest.raises(ValueError, match="z has D=5 but codebook has D=6"):  # no rows: the shapes still count
        vq.nearest_code(torch.empty(0, 5), codebook)


def test_unused_codes_stay_finite_and_dead_codes_restart():
    torch.manual_seed(0)
    q = vq.VectorQuantizer(16, 4, dead_threshold=0.0, kmeans_init=False).train()  # restarts off
    q.generator = torch.Generator().manual_seed(0)
    q.codebook[8:] += 100.0  # codes 8..15 are far from every input: never chosen
    q.embed_sum.copy_(q.codebook)
    far = q.codebook[8:].clone()
    for _ in range(400):  # 0.99 ** 400 ~ 0.018: the unused codes' counts decay toward zero
        q(torch.randn(2, 4, 4, 4))
    assert torch.isfinite(q.codebook).all()
    assert torch.allclose(q.codebook[8:], far, rtol=1e-3)  # unused codes keep their place, no blow-up
    q.dead_threshold = 0.01
    q(torch.randn(2, 4, 4, 4))  # no hit in this step: restarted from the batch
    assert (q.codebook[8:] - far).abs().min() > 50
    assert q.codebook[8:].abs().max() < 10


def test_kmeans_seeding_reaches_lloyds_distortion():
    g = torch.Generator().manual_seed(2)  # 12 overlapping blobs in 3-D, 16 codes seeded at random data vectors
    flat = (torch.randn(12, 3, generator=g) * 2).repeat_interleave(50, 0) + torch.randn(600, 3, generator=g)
    q = vq.VectorQuantizer(16, 3).train()
    q.generator = torch.Generator().manual_seed(1)
    q._kmeans(flat)
    distortion = lambda c: torch.cdist(flat.double(), c.double()).min(1).values.pow(2).mean().item()  # noqa: E731
    c = flat[torch.randint(600, (16,), generator=torch.Generator().manual_seed(1))].double()  # the same seeds
    for _ in range(100):  # Lloyd's iterations to convergence, in float64
        a = torch.cdist(flat.double(), c).argmin(1)
        c = torch.stack([flat[a == k].double().mean(0) if (a == k).any() else c[k] for k in range(16)])
    assert distortion(q.codebook) <= 1.1 * distortion(c)  # 10 iterations: 2.8% above; 1 iteration: 39%


def test_dead_codes_restart_where_the_data_is_worst_served():
    # 4000 vectors in a tight background cluster that code 0 serves, 40 far apart, one dead code:
    # a uniform draw would restart it in the background 99 times in 100
    q = vq.VectorQuantizer(2, 3, kmeans_init=False).train()
    q.generator = torch.Generator().manual_seed(0)
    q.codebook.copy_(torch.tensor([[0.0, 0, 0], [-50.0, -50, -50]]))
    q.embed_sum.copy_(q.codebook)
    g = torch.Generator().manual_seed(1)
    flat = torch.cat([0.01 * torch.randn(4000, 3, generator=g), torch.tensor([8.0, 0, 0]) + torch.randn(40, 3, generator=g)])
    q(flat.T.reshape(1, 3, 4040, 1))
    assert q.codebook[1, 0] > 4  # restarted among the far vectors
    q = vq.VectorQuantizer(4, 2, kmeans_init=False).train()  # three dead codes, one vector far worse served
    q.generator = torch.Generator().manual_seed(0)
    flat = torch.randn(10, 2, generator=g)
    q._restart_dead(flat, torch.tensor([1000.0] + [1e-3] * 9), torch.tensor([10.0, 0, 0, 0]))
    assert len(q.codebook[1:].unique(dim=0)) == 3 and (q.codebook[1:] == flat[0]).all(1).sum() == 1  # each once


def test_restarts_keep_the_codebook_in_use_from_the_start():
    # The encoder's first outputs are nearly constant and drift by more than their spread each
    # step, which left k-means-seeded codes behind: 3 of 128 codes in use after 8 steps.
    with_restarts, without = _codes_in_use(0.01, 160, 30, schedule=True), _codes_in_use(0.0, 160, 30, schedule=True)
    assert min(with_restarts[10:]) >= 32, with_restarts
    assert min(without[10:]) < 16, without  # the collapse this guards against


def test_top_codebook_restarts_like_the_bottom_one():
    with_restarts, without = _codes_in_use(0.01, 96, 16, levels=2), _codes_in_use(0.0, 96, 16, levels=2)
    assert sum(with_restarts[6:]) > 3 * sum(without[6:]) and min(with_restarts[6:]) > 8, (with_restarts, without)


def _codes_in_use(dead_threshold, n, steps, levels=1, schedule=False):
    """Codes of the (top, with two levels) codebook in use at each of the first training steps on n phantom slices."""
    torch.manual_seed(0)
    x = vq.phantom_slices(n, (64, 32), seed=3)
    model = vq.VQVAE(vq.VQVAEConfig(channels=32, code_dim=16, n_codes=64, levels=levels, dead_threshold=dead_threshold))
    model.quantizer.generator = torch.Generator().manual_seed(1)
    if levels == 2:
        model.quantizer_top.generator = model.quantizer.generator
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    used = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = train._lr_at(step, 300, 1e-3) if schedule else 1e-3
        _, loss, stats = model(x[step * 16 % n:][:16])
        opt.zero_grad()
        loss.backward()
        opt.step()
        used.append(round(stats["usage_top" if levels == 2 else "usage"].item() * 64))
    return used


def test_ema_update_and_commitment_against_their_definitions():
    torch.manual_seed(3)
    q = vq.VectorQuantizer(5, 3, beta=0.3, decay=0.9, dead_threshold=0, kmeans_init=False).train()
    old = q.codebook.clone()
    z = torch.randn(2, 3, 4, 6, requires_grad=True)
    z_q, codes, loss, _ = q(z)
    loss.backward()  # the commitment term pulls z toward its code: 2 beta (z - code) / the number of entries
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    want = torch.cdist(flat.double(), old.double()).argmin(1)
    counts = torch.bincount(want, minlength=5).double()
    sums = torch.zeros(5, 3, dtype=torch.float64).index_add_(0, want, flat.double())
    size = 0.9 * 1 + 0.1 * counts  # counts start at 1, sums at the codebook
    total = size.sum()
    new = (0.9 * old.double() + 0.1 * sums) / ((size + 1e-5) / (total + 5 * 1e-5) * total)[:, None]
    assert torch.equal(codes.flatten(), want) and torch.allclose(q.codebook.double(), new, atol=1e-6)
    assert loss.item() == pytest.approx(0.3 * (flat.double() - new[want]).pow(2).mean().item(), rel=1e-5)
    assert torch.allclose(z_q.detach().permute(0, 2, 3, 1).reshape(-1, 3).double(), new[want], atol=1e-6)
    grad = 2 * 0.3 * (flat.detach().double() - new[want]) / flat.numel()
    assert torch.allclose(z.grad.permute(0, 2, 3, 1).reshape(-1, 3).double(), grad, atol=1e-7)


def test_kmeans_init_puts_codes_on_the_data():
    q = vq.VectorQuantizer(8, 3).train()
    q.generator = torch.Generator().manual_seed(1)
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, 0, 0]])
    z = (centres[torch.arange(64) % 4] + 0.01 * torch.randn(64, 3)).T.reshape(1, 3, 8, 8)
    q(z)
    assert bool(q.initialised)
    nearest = torch.cdist(centres, q.codebook).min(1).values
    assert nearest.max() < 0.1


def test_perplexity_and_usage_count_only_the_codes_in_use():
    # most codes far from every input: p = 0 for them must add 0 to the entropy (0 log 0), not NaN
    q = vq.VectorQuantizer(12, 3, kmeans_init=False).eval()
    q.codebook[4:] += 100.0
    z = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(8))
    _, codes, _, stats = q(z)
    counts = torch.bincount(codes.flatten(), minlength=12).double()
    p = counts[counts > 0] / counts.sum()
    assert (counts[4:] == 0).all() and (counts > 0).sum() >= 2
    assert stats["perplexity"].item() == pytest.approx(torch.exp(-(p * p.log()).sum()).item(), rel=1e-5)
    assert stats["usage"].item() == pytest.approx((counts > 0).double().mean().item())


def test_ema_update_smooths_counts_as_laplace_says():
    # eps large enough to see: smoothed counts (size + eps) / (n + K eps) n keep the total n; the unused code
    # divides its decayed sum by a smoothed count, not by the raw one
    torch.manual_seed(4)
    q = vq.VectorQuantizer(6, 3, decay=0.8, dead_threshold=0, kmeans_init=False, eps=0.5).train()
    q.codebook[5] += 50.0  # never chosen
    q.embed_sum.copy_(q.codebook)
    old = q.codebook.clone()
    z = torch.randn(3, 3, 4, 5)
    q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3).double()
    want = torch.cdist(flat, old.double()).argmin(1)
    counts = torch.bincount(want, minlength=6).double()
    assert counts[5] == 0
    size = 0.8 * 1 + 0.2 * counts
    embed = 0.8 * old.double() + 0.2 * torch.zeros(6, 3, dtype=torch.float64).index_add_(0, want, flat)
    n = size.sum()
    smoothed = (size + 0.5) / (n + 6 * 0.5) * n
    assert torch.allclose(q.cluster_size.double(), size, rtol=1e-6)
    assert torch.allclose(q.codebook.double(), embed / smoothed[:, None], rtol=1e-5, atol=1e-6)


def test_restarts_draw_uniformly_when_every_vector_sits_on_its_code():
    # all distances 0 (a black background on its code), or all NaN (a diverged run): still a draw, no error,
    # each dead code at a different vector of the batch
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(10, 2, generator=g)
    for dist in (torch.zeros(10), torch.full((10,), float("nan"))):
        q = vq.VectorQuantizer(4, 2, kmeans_init=False).train()
        q.generator = torch.Generator().manual_seed(0)
        q._restart_dead(flat, dist, torch.tensor([10.0, 0, 0, 0]))
        at = (q.codebook[1:, None] == flat[None]).all(-1)  # (3, 10): which vector each restarted code sits on
        assert (at.sum(1) == 1).all() and len(at.nonzero()[:, 1].unique()) == 3
        assert torch.isfinite(q.codebook).all() and torch.isfinite(q.embed_sum).all()


def test_kmeans_keeps_empty_clusters_on_the_data_and_seeds_the_ema_statistics():
    # 4 distinct vectors (far from the origin), 8 codes: seeds repeat, ties leave some clusters empty. An empty
    # cluster keeps its seed (a data vector), and the batch's assignments stand in for the EMA history
    base = torch.tensor([[50.0, 0, 0], [0, 50.0, 0], [0, 0, 50.0], [30.0, 30, 30]])
    flat = base.repeat(10, 1) + torch.tensor([[1.0, 2, 3]])
    q = vq.VectorQuantizer(8, 3).train()
    q.generator = torch.Generator().manual_seed(0)
    q._kmeans(flat)
    on = (q.codebook[:, None] == flat[None]).all(-1)  # (8, 40)
    assert on.any(1).all()  # every code sits on a data vector, empty or not
    size = q.cluster_size
    assert size.sum() == 40 and ((size == 0).sum() >= 4)  # 8 seeds among 4 vectors: at least 4 repeats
    for k in range(8):  # a used code counts every copy of its vector; an empty one none
        assert size[k] in (0, 10) and (size[k] == 0 or on[k].sum() == 10)
    assert {tuple(c) for c in q.codebook[size > 0].tolist()} == {tuple(c) for c in flat[:4].tolist()}
    assert torch.allclose(q.embed_sum, q.codebook * size[:, None])  # codebook = embed_sum / count


# ----------------------------------------------------------------------------- checkpoints


def test_rate_model_is_causal_on_any_map_size():
    model = vq.CodeModel(16, channels=8).double()  # float64: exact zeros where a logit must not move
    for h, w in [(5, 7), (9, 3)]:
        codes = torch.randint(0, 16, (2, h, w), generator=torch.Generator().manual_seed(h))
        order = torch.arange(h * w).view(h, w)
        with torch.no_grad():
            base = model(codes)
            for i, j in [(0, 0), (0, w - 1), (2, 1), (h - 1, 0)]:
                changed = codes.clone()
                changed[:, i, j] = (changed[:, i, j] + 3) % 16
                moved = (model(changed) - base).abs().amax(dim=(0, 1))  # (h, w)
                assert moved[order <= order[i, j]].max() == 0, f"logits at or before {(i, j)} moved"
                assert (moved[order > order[i, j]] > 1e-9).all(), f"some later logit missed {(i, j)}"


def test_rate_codes_are_chosen_without_tf32(monkeypatch):
    # train.py turns TF32 on for a GPU, sample.py does not: the codes training chose must be those encode() gives
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32, rate=0.5))
    flags, forward = [], model.quantizer.forward

    def spy(*args, **kwargs):
        flags.append(vq.set_tf32(False))  # the flags as the search runs (set back at once)
        vq.set_tf32(flags[-1])
        return forward(*args, **kwargs)
    monkeypatch.setattr(model.quantizer, "forward", spy)
    saved = vq.set_tf32(True)
    try:
        on = vq.set_tf32(True)
        model.train()(vq.phantom_slices(2, (32, 32)))
        model.eval().encode(vq.phantom_slices(2, (32, 32)))
        assert vq.set_tf32(True) == on  # and set back after
    finally:
        vq.set_tf32(saved)
    assert len(flags) == 2 and on not in flags, flags


def test_rate_chooses_the_code_of_least_distance_plus_cost_and_its_model_learns():
    torch.manual_seed(6)
    cfg = dict(channels=16, code_dim=8, n_codes=32)
    model = vq.VQVAE(vq.VQVAEConfig(**cfg, rate=0.7))
    x = vq.phantom_slices(8, (48, 32), seed=5)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(6):  # the first step seeds the codebook and the scale
        _, loss, stats = model.train()(x)
        opt.zero_grad()
        loss.backward()
        # the rate model learns from the loss (its cross-entropy on the chosen codes), as the encoder does
        assert all(p.grad.abs().sum() > 0 for p in [*model.rate_model.parameters(), *model.encoder.parameters()])
        opt.step()
    model.eval()
    with torch.no_grad():  # the choice, from its definition: squared distance + rate x scale x nats
        flat = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8)  # (N, D)
        d2 = ((flat[:, None] - model.quantizer.codebook[None]) ** 2).sum(-1)  # (N, K)
        nearest = d2.argmin(1).view(8, 12, 8)
        nats = -torch.log_softmax(model.rate_model(nearest), 1).permute(0, 2, 3, 1).reshape(-1, 32)
        want = (d2 + 0.7 * model.rate_model.scale * nats).argmin(1).view(8, 12, 8)
    got = model.encode(x)
    assert (got == want).float().mean() > 0.99  # ties and float rounding aside
    assert (got != nearest).any() and model.rate_model.scale > 0
    model.quantizer.codebook[got[0, 0, 0]] = float("nan")  # a broken code is never chosen, as on every path
    assert not (model.encode(x) == got[0, 0, 0]).any()
    with pytest.raises(ValueError, match="rate"):
        vq.VQVAEConfig(rate=0.5, levels=2)


def test_rate_search_never_picks_a_code_with_any_non_finite_entry():
    # one NaN or infinite entry makes a code's distance NaN or inf: it must lose to every finite code with
    # a cost too, as nearest_code does (one NaN column would win every argmin)
    g = torch.Generator().manual_seed(9)
    q = vq.VectorQuantizer(9, 4, kmeans_init=False).eval()
    z = torch.randn(2, 4, 5, 6, generator=g)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    q.codebook[3], q.codebook[6] = flat[0], flat[1]  # each the nearest code of some vector, before it broke
    q.codebook[3, 1], q.codebook[6, 0] = float("nan"), float("inf")
    table = 0.3 * torch.rand(9, 9, generator=g)  # the cost of each code, given the nearest one
    _, codes, _, _ = q(z, cost=lambda nearest, dist: table[nearest])
    finite = torch.tensor([k not in (3, 6) for k in range(9)])
    d2 = torch.cdist(flat.double(), q.codebook.double()).pow(2).where(finite, math.inf)
    want = (d2 + table.double()[d2.argmin(1)]).argmin(1)
    assert torch.equal(codes.flatten(), want) and not finite[codes].logical_not().any()


def test_rate_restarts_weigh_each_vector_by_its_chosen_codes_distance():
    # with a cost the chosen code need not be the nearest: the distances that weigh the restart draw are
    # to the code each vector got, the one it will be reconstructed from
    g = torch.Generator().manual_seed(10)
    q = vq.VectorQuantizer(8, 3, kmeans_init=False).train()
    seen = []
    q._restart_dead = lambda flat, dist, counts: seen.append(dist.clone())
    old = q.codebook.clone()
    z = torch.randn(2, 3, 4, 4, generator=g)
    table = torch.rand(8, 8, generator=g)  # of the order of the distances: often another code wins
    _, codes, _, _ = q(z, cost=lambda nearest, dist: table[nearest])
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    d2 = torch.cdist(flat.double(), old.double()).pow(2)
    assert (codes.flatten() != d2.argmin(1)).any()
    assert torch.allclose(seen[0].double(), d2.gather(1, codes.view(-1, 1))[:, 0], atol=1e-5)


def test_rate_bits_are_the_chosen_codes_cross_entropy_in_bits():
    # rate_bits: the mean over codes of -log2 p(chosen code | the nearest codes before it) under the rate model
    torch.manual_seed(5)
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=16, n_res_blocks=1, rate=0.5))
    x = vq.phantom_slices(3, (32, 32), seed=6)
    model.train()(x)  # k-means seeds the codebook, the rate model sets its scale
    with torch.no_grad():
        _, _, stats = model.eval()(x)
        flat = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8).double()
        nearest = torch.cdist(flat, model.quantizer.codebook.double()).argmin(1).view(3, 8, 8)
        logp = torch.log_softmax(model.rate_model(nearest).double(), 1)
        codes = model.encode(x)
    want = -logp.gather(1, codes[:, None]).mean() / math.log(2)
    assert stats["rate_bits"].item() == pytest.approx(want.item(), rel=1e-4)
    assert (codes != nearest).any()  # the rate moved some code: the nats are not just those of the nearest


def test_rate_scale_moves_a_hundredth_of_the_way_to_the_batch_mean_distance():
    # the scale that prices a nat: set by the first training batch, then 1% of the way toward each batch's
    # mean squared distance to the nearest code (under the codebook the batch is searched with)
    torch.manual_seed(7)
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=16, n_res_blocks=1, rate=0.3)).train()
    x = vq.phantom_slices(6, (32, 32), seed=8)
    with torch.no_grad():
        model(x[:3])  # k-means seeds the codebook, the first batch sets the scale
        before, book = model.rate_model.scale.clone(), model.quantizer.codebook.clone()
        flat = model.encoder(x[3:]).permute(0, 2, 3, 1).reshape(-1, 8).double()
        mean = torch.cdist(flat, book.double()).pow(2).min(1).values.mean()
        model(x[3:])
    assert abs(mean.item() / before.item() - 1) > 0.05  # far enough apart to tell the step's size
    want = before.double() + 0.01 * (mean - before.double())
    assert model.rate_model.scale.item() == pytest.approx(want.item(), rel=1e-5)


def test_vqvae_config_refuses_each_out_of_range_field():
    # each bound of VQVAEConfig: the value on it is taken, one just beyond it is refused with its field's name
    for ok in (dict(channels=8), dict(dead_threshold=0.0), dict(n_codes=2), dict(ssim_weight=0.0), dict(rate=0.0),
               dict(decay=0.999), dict(downsample=8), dict(levels=2), dict(beta=1e-6), dict(n_res_blocks=1)):
        vq.VQVAEConfig(**ok)
    bad = [("channels", 7), ("dead_threshold", 1.0), ("dead_threshold", -0.01), ("n_codes", 1),
           ("ssim_weight", -0.1), ("ssim_weight", math.inf), ("decay", 0.0), ("decay", 1.0), ("downsample", 2),
           ("downsample", 16), ("levels", 3), ("rate", -0.1), ("rate", math.inf), ("in_channels", 0),
           ("n_res_blocks", 0), ("code_dim", 0), ("beta", 0.0), ("beta", math.inf), ("beta", math.nan),
           ("decay", math.nan), ("dead_threshold", math.nan)]
    for field, value in bad:
        with pytest.raises(ValueError, match=field):
            vq.VQVAEConfig(**{field: value})


def test_the_decoder_sees_the_decoded_top_map_beside_the_bottom_codes():
    # with two levels the decoder's input is the bottom codes and the decoded top map side by side: the
    # reconstruction's gradient reaches the top decoder directly, not only through merge into the bottom quantizer
    torch.manual_seed(3)
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=16, n_res_blocks=1, levels=2)).eval()
    with torch.no_grad():
        model.merge.weight.zero_()  # the path through merge carries no gradient now
    x = vq.phantom_slices(2, (32, 32), seed=2)
    F.mse_loss(model(x)[0], x).backward()
    grads = [p.grad for p in model.decoder_top.parameters()]
    assert all(gr is not None for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("size", [(32, 32), (32, 16)], ids=["square", "8x4"])  # bottom maps 8 x 8 and 8 x 4
def test_checkpoint_round_trip(tmp_path, levels, size):
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32, levels=levels, rate=0.5 * (levels == 1)))
    model.train()(vq.phantom_slices(4, size, seed=1))  # k-means seeding and the rate model's scale
    model.eval()
    vq.save_checkpoint({"vqvae_config": asdict(model.config), "vqvae": model.state_dict()}, tmp_path / "m.pt")
    loaded = vq.VQVAE.from_checkpoint(tmp_path / "m.pt")
    x = vq.phantom_slices(2, size)
    assert loaded.config == model.config
    assert all(map(torch.equal, vq.as_levels(loaded.encode(x)), vq.as_levels(model.encode(x))))
    assert not list(tmp_path.glob("*.tmp*"))  # the temporary file was renamed into place


def test_checkpoint_of_the_one_level_format_still_loads(tmp_path):
    # a checkpoint written before levels existed: no "levels" key, the same module names
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32)).eval()
    old = {k: v for k, v in asdict(model.config).items() if k != "levels"}
    prior = vq.PixelCNN(vq.PriorConfig(**SMALL)).eval()
    old_prior = {k: v for k, v in asdict(prior.config).items() if k not in ("cond_codes", "prior_transpose", "code_dim")}
    vq.save_checkpoint({"vqvae_config": old, "vqvae": model.state_dict(), "prior_config": old_prior,
                        "prior": prior.state_dict()}, tmp_path / "m.pt")
    assert vq.VQVAE.from_checkpoint(tmp_path / "m.pt").config.levels == 1
    assert isinstance(vq.load_prior(tmp_path / "m.pt"), vq.PixelCNN)


@pytest.mark.parametrize("top", [(3, 3), (3, 5)], ids=["square", "3x5"])
def test_two_level_prior_checkpoint_round_trip(tmp_path, top):
    prior = two_level_prior(top=top, code_dim=4 * (top == (3, 5))).eval()  # 3 x 5: tied
    cfg = {"top": asdict(prior.top.config), "bottom": asdict(prior.bottom.config)}
    vq.save_checkpoint({"prior_config": cfg, "prior": prior.state_dict()}, tmp_path / "p.pt")
    loaded = vq.load_prior(tmp_path / "p.pt")
    assert isinstance(loaded, vq.TwoLevelPrior) and loaded.bottom.config == prior.bottom.config
    a = loaded.generate(2, generator=torch.Generator().manual_seed(0))
    b = prior.generate(2, generator=torch.Generator().manual_seed(0))
    assert all(map(torch.equal, a, b))
    with pytest.raises(vq.CheckpointError, match="load_prior"):
        vq.PixelCNN.from_checkpoint(tmp_path / "p.pt")


def _fill_disk(monkeypatch):
    """From now on every file vq._atomic_write writes fails as on a full disk (its writes go to /dev/full)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    real = vq.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return fd, name
    monkeypatch.setattr(vq.tempfile, "mkstemp", mkstemp)


def test_a_checkpoint_written_onto_a_full_disk_names_itself_and_keeps_the_last(tmp_path, monkeypatch):
    before, path = {"step": torch.randn(5, 3)}, tmp_path / "m.pt"
    vq.save_checkpoint(before, path)
    _fill_disk(monkeypatch)
    with pytest.raises(OSError) as e:  # torch.save raises a RuntimeError from the OSError
        vq.save_checkpoint({"step": torch.randn(300, 300)}, path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert torch.equal(vq.load_checkpoint(path)["step"], before["step"])
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left
    with pytest.raises(OSError) as e:
        vq.save_json(tmp_path / "s.json", {"a": 1})  # a plain write raises the OSError itself
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "s.json")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_an_interrupt_just_after_a_write_lands_stays_an_interrupt(tmp_path, monkeypatch):
    replace = os.replace

    def replaced_then_interrupted(a, b):  # Ctrl-C or SIGTERM between os.replace and the return
        replace(a, b)
        raise KeyboardInterrupt
    monkeypatch.setattr(vq.os, "replace", replaced_then_interrupted)
    with pytest.raises(KeyboardInterrupt):  # not a FileNotFoundError for the temporary file, gone by then
        vq.save_checkpoint({"w": torch.ones(3)}, tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"] and torch.load(tmp_path / "m.pt")["w"].sum() == 3


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    torch.save({"vqvae": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(vq.CheckpointError, match="not a safe checkpoint"):
        vq.load_checkpoint(tmp_path / "evil.pt")
    assert not _Evil.marker.exists()


def test_truncated_checkpoint_gives_clear_error(tmp_path):
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32))
    vq.save_checkpoint({"vqvae_config": asdict(model.config), "vqvae": model.state_dict()}, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(vq.CheckpointError, match="not a readable checkpoint"):
        vq.load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(vq.CheckpointError, match="no checkpoint"):
        vq.load_checkpoint(tmp_path / "missing.pt")
    if not torch.cuda.is_available():  # a GPU checkpoint path on a CPU machine: not called corrupt
        with pytest.raises(vq.CheckpointError, match="not a readable checkpoint: Attempting to deserialize"):
            vq.load_checkpoint(tmp_path / "m.pt", map_location="cuda")
    torch.save(torch.randn(3), tmp_path / "tensor.pt")  # torch.save of something else: said so, not an AttributeError
    for load in (vq.load_checkpoint, vq.load_prior, vq.VQVAE.from_checkpoint):
        with pytest.raises(vq.CheckpointError, match="holds a Tensor, not a checkpoint"):
            load(tmp_path / "tensor.pt")
    ckpt = {"vqvae_config": asdict(model.config), "vqvae": dict(model.state_dict(), extra=torch.ones(2))}
    with pytest.raises(vq.CheckpointError, match='does not fit .*Unexpected key.*"extra"'):  # the key named
        vq.VQVAE.from_checkpoint(ckpt)
    with pytest.raises(OSError) as e:  # a folder that is not there: the file named, not a temporary one
        vq.save_json(tmp_path / "gone" / "s.json", {"a": 1})
    assert e.value.errno == errno.ENOENT and e.value.filename == str(tmp_path / "gone" / "s.json")


# ----------------------------------------------------------------------------- prior


# 4 layers at dilations 1, 2 reach 7 rows up and 6 columns aside: the whole past of a 6x5 map
SMALL = dict(n_codes=7, height=6, width=5, prior_channels=16, prior_layers=4, prior_dilations=(1, 2))
# the same with a slice-position condition
RICH = dict(SMALL, positional=True)
# tied to a codebook of 5-dimensional vectors (small_prior ties it to a random one)
TIED = dict(RICH, code_dim=5)


def small_prior(seed=0, **overrides):
    torch.manual_seed(seed)
    model = PixelCNN(PriorConfig(**{**SMALL, **overrides})).eval()
    if model.config.positional:  # non-trivial weights for the condition (PyTorch's init is small)
        torch.nn.init.normal_(model.cond_maps, std=1.0)  # zero at init in vq.py
    if model.config.code_dim:
        _tie_at_random(model, scale=3)
    return model


def _tie_at_random(model, scale=1):
    """Tie to a random codebook, with free weights that are not zero as at init."""
    model.tie(torch.randn(model.config.n_codes, model.config.code_dim) * scale)
    torch.nn.init.normal_(model.embed.weight, std=0.3), torch.nn.init.normal_(model.head[-1].weight, std=0.3)


# the top map of a two-level model (3 x 3) and its bottom map (6 x 6), scanned transposed
TOP = dict(SMALL, height=3, width=3, positional=True, prior_transpose=True)
BOTTOM = dict(TOP, height=6, width=6, cond_codes=SMALL["n_codes"])


def two_level_prior(seed=0, top=(3, 3), code_dim=0):
    """A two-level prior with a top map of `top` (h, w) and a bottom map of twice that; code_dim > 0: tied
    to two random codebooks."""
    torch.manual_seed(seed)
    (h, w) = top
    model = vq.TwoLevelPrior(PriorConfig(**dict(TOP, height=h, width=w, code_dim=code_dim)),
                             PriorConfig(**dict(BOTTOM, height=2 * h, width=2 * w, code_dim=code_dim))).eval()
    for m in (model.top, model.bottom):
        torch.nn.init.normal_(m.cond_maps, std=1.0)
        if code_dim:
            _tie_at_random(m)
    return model


def _scan_order(config):
    """Each code's place in the prior's scan (h, w): row by row, or column by column when transposed."""
    h, w = config.height, config.width
    return torch.arange(h * w).view(w, h).t() if config.prior_transpose else torch.arange(h * w).view(h, w)


def _position(model, n, seed=9):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) if model.config.positional else None


TRANSPOSED = dict(RICH, prior_transpose=True)


@pytest.mark.parametrize("kind", [SMALL, RICH, TRANSPOSED, TIED], ids=["gated", "position", "transposed", "tied"])
def test_causal_and_no_blind_spot(kind):
    # float64: exact zeros where a logit must not move, whatever the conv algorithm
    model = small_prior(**kind).double()
    h, w = SMALL["height"], SMALL["width"]
    codes = torch.randint(0, SMALL["n_codes"], (2, h, w), generator=torch.Generator().manual_seed(1))
    pos = _position(model, 2)
    order = _scan_order(model.config)
    with torch.no_grad():
        base = model(codes, pos)
        for i, j in [(0, 0), (0, w - 1), (2, 2), (3, 0), (4, w - 1), (h - 1, 1)]:
            changed = codes.clone()
            changed[:, i, j] = (changed[:, i, j] + 1) % SMALL["n_codes"]
            moved = (model(changed, pos) - base).abs().amax(dim=(0, 1))  # (h, w)
            assert moved[order <= order[i, j]].max() == 0, f"logits at or before {(i, j)} moved"
            assert (moved[order > order[i, j]] > 1e-9).all(), f"some later logit missed {(i, j)}"
            if i + 1 < h and not model.config.prior_transpose:  # below and to the left: where a
                assert moved[i + 1, max(j - 1, 0)] > 1e-9 and moved[i + 1, 0] > 1e-9  # masked-conv PixelCNN is blind


def _reach(model):
    """Which codes each logit depends on, by gradients: (h*w, h*w) bool in scan order, [logit, code].
    The head acts on each position alone, so it is left out (its ReLU could zero a gradient)."""
    model.head = nn.Identity()
    h, w = model.shape
    codes = torch.randint(0, model.config.n_codes, (1, model.config.height, model.config.width),
                          generator=torch.Generator().manual_seed(0))
    seen = []
    def keep(module, inputs, out):
        out.retain_grad()
        seen.append(out)

    hook = model.embed.register_forward_hook(keep)
    rows = []
    for t in range(h * w):
        seen.clear()
        out = model._scan(model(codes))  # (1, K, h, w) scanned
        out[0, :, t // w, t % w].sum().backward()
        rows.append(seen[0].grad[0].abs().sum(-1).flatten() > 0)  # the embedding is taken in scan order
        model.zero_grad()
    hook.remove()
    return torch.stack(rows)


def test_blind_spot_says_exactly_when_some_earlier_code_is_out_of_reach():
    g = torch.Generator().manual_seed(5)
    verdicts = set()
    for trial in range(16):  # awkward shapes, few layers: both verdicts occur
        h, w, layers = (int(torch.randint(2, 9, (1,), generator=g)) for _ in range(3))
        dil = tuple(int(d) for d in torch.randint(1, 4, (int(torch.randint(1, 3, (1,), generator=g)),), generator=g))
        cfg = PriorConfig(n_codes=5, height=h, width=w, prior_channels=4, prior_layers=layers, prior_dilations=dil,
                          prior_dropout=0.0, prior_transpose=bool(trial % 2))
        model = PixelCNN(cfg).double().eval()
        sees = _reach(model)
        n = h * w
        earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)
        assert not (sees & ~earlier).any()  # causal
        full, verdict = bool((sees | ~earlier).all()), cfg.blind_spot()
        verdicts.add((verdict is None, full))
        assert full or verdict is not None, (h, w, layers, dil)  # every blind spot is refused
        if "gaps" not in (verdict or ""):  # and with gap-free dilations, only a blind spot is
            assert full == (verdict is None), (h, w, layers, dil, verdict)
    assert {(True, True), (False, False)} <= verdicts


@pytest.mark.parametrize("shape", [(32, 16), (64, 32)], ids=["phantom map", "data map"])
@pytest.mark.parametrize("transpose", [False, True], ids=["rows", "transposed"])
def test_default_layers_reach_across_the_default_maps(shape, transpose):
    cfg = PriorConfig(n_codes=5, height=shape[0], width=shape[1], prior_channels=4, prior_dropout=0.0,
                      prior_transpose=transpose)
    model = PixelCNN(cfg).double().eval()
    model.head = nn.Identity()  # per position: the stacks alone decide the reach
    rows, cols = model.shape
    codes = torch.randint(0, 5, (1, *shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model._scan(model(codes))
        hardest = model._scan(codes).clone()
        hardest[0, 0, cols - 1] = (hardest[0, 0, cols - 1] + 1) % 5  # the last code of the first scanned row
        moved = (model._scan(model(model._scan(hardest, (1, 2)))) - base).abs().amax(1)[0]  # (rows, cols)
    blind = shape == (64, 32) and transpose  # 32 rows of 64: ten layers reach 62 codes aside, 63 are needed
    assert (moved[1, 0] == 0) == blind and (cfg.blind_spot() is not None) == blind
    if blind:
        assert "prior_layers 11" in cfg.blind_spot()


def test_bottom_prior_sees_no_later_bottom_code_and_every_top_code():
    model = two_level_prior(seed=1).double()
    g = torch.Generator().manual_seed(2)
    top = torch.randint(0, SMALL["n_codes"], (2, 3, 3), generator=g)
    bottom = torch.randint(0, SMALL["n_codes"], (2, 6, 6), generator=g)
    pos = torch.rand(2, generator=g)
    order = _scan_order(model.bottom.config)
    with torch.no_grad():
        base_top, base = model((top, bottom), pos)
        for i, j in [(0, 0), (2, 3), (5, 1), (5, 5)]:  # a bottom code moves later bottom logits only
            changed = bottom.clone()
            changed[:, i, j] = (changed[:, i, j] + 1) % SMALL["n_codes"]
            moved_top, moved = model((top, changed), pos)
            assert torch.equal(moved_top, base_top)  # the top prior never sees the bottom map
            moved = (moved - base).abs().amax(dim=(0, 1))
            assert moved[order <= order[i, j]].max() == 0 and (moved[order > order[i, j]] > 1e-9).all()
        for i in range(3):  # every top code reaches the bottom logits, the first one's included
            for j in range(3):
                changed = top.clone()
                changed[:, i, j] = (changed[:, i, j] + 1) % SMALL["n_codes"]
                moved = (model((changed, bottom), pos)[1] - base).abs().amax(dim=(0, 1))
                assert moved[2 * i:2 * i + 2, 2 * j:2 * j + 2].min() > 1e-9, (i, j)  # the 2 x 2 it covers
        assert (model((top.flip(1), bottom), pos)[1] - base).abs().amax(dim=(0, 1))[0, 0] > 1e-9


@pytest.mark.parametrize("kind", [SMALL, RICH, TRANSPOSED, TIED], ids=["gated", "position", "transposed", "tied"])
def test_conditional_resampling_matches_naive_and_keeps_the_rest(kind):
    model = small_prior(seed=4, **kind).double()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, SMALL["n_codes"], (4, SMALL["height"], SMALL["width"]), generator=g)
    redo = torch.rand(codes.shape, generator=g) < 0.3
    pos = _position(model, 4)
    cached = model.generate(4, 1.0, torch.Generator().manual_seed(8), pos, keep=(codes, redo))
    assert torch.equal(cached, model.generate_naive(4, 1.0, torch.Generator().manual_seed(8), pos, keep=(codes, redo)))
    assert torch.equal(cached[~redo], codes[~redo]) and not torch.equal(cached[redo], codes[redo])
    every = torch.ones_like(redo)  # redrawing every code is plain sampling, with the same noise
    assert torch.equal(model.generate(4, 1.0, torch.Generator().manual_seed(8), pos, keep=(codes, every)),
                       model.generate(4, 1.0, torch.Generator().manual_seed(8), pos))
    # a redrawn code depends on the kept codes after it only through nothing: change one kept later code
    i, j = (~redo[0]).nonzero()[-1].tolist()
    later = codes.clone()
    later[0, i, j] = (later[0, i, j] + 1) % SMALL["n_codes"]
    again = model.generate(4, 1.0, torch.Generator().manual_seed(8), pos, keep=(later, redo))
    before = _scan_order(model.config) < _scan_order(model.config)[i, j]
    assert torch.equal(again[0][before], cached[0][before])
    with pytest.raises(ValueError, match="keep must be"):
        model.generate(4, keep=(codes[:, :-1], redo[:, :-1]), position=pos)


def test_two_level_conditional_resampling_matches_naive():
    model = two_level_prior(seed=5, top=(3, 5), code_dim=3).double()
    g = torch.Generator().manual_seed(4)
    codes = (torch.randint(0, SMALL["n_codes"], (3, 3, 5), generator=g),
             torch.randint(0, SMALL["n_codes"], (3, 6, 10), generator=g))
    redo = tuple(torch.rand(c.shape, generator=g) < 0.25 for c in codes)
    pos = torch.tensor([0.2, 0.5, 0.8])
    cached = model.generate(3, 1.0, torch.Generator().manual_seed(1), pos, keep=(codes, redo))
    naive = model.generate_naive(3, 1.0, torch.Generator().manual_seed(1), pos, keep=(codes, redo))
    assert all(map(torch.equal, cached, naive))
    assert all(torch.equal(c[~r], k[~r]) for c, k, r in zip(cached, codes, redo))


def test_code_bits_are_each_codes_cross_entropy():
    model = small_prior(seed=6, **RICH)
    codes = torch.randint(0, SMALL["n_codes"], (5, SMALL["height"], SMALL["width"]),
                          generator=torch.Generator().manual_seed(5))
    pos = torch.rand(5, generator=torch.Generator().manual_seed(6))
    bits = vq.code_bits(model, codes, pos, batch_size=2)
    with torch.no_grad():
        p = model(codes, pos).softmax(1)  # (B, K, h, w)
    reference = -torch.log2(p.gather(1, codes[:, None]))[:, 0]
    assert bits.shape == codes.shape and torch.allclose(bits, reference, atol=1e-4)
    assert vq.prior_bits(model, codes, pos)["per_code"] == pytest.approx(reference.mean().item(), rel=1e-5)
    th = vq.surprise_threshold(model, codes, pos, quantile=0.9)
    assert (bits > th).float().mean().item() == pytest.approx(0.1, abs=1 / bits.numel() + 1e-9)
    for q in (0.9, 0.37, 0.995):  # the nearest rank, as numpy's
        want = np.quantile(bits.double().numpy(), q, method="nearest")
        assert vq.surprise_threshold(model, codes, pos, quantile=q) == pytest.approx(want, rel=1e-6), q
    with pytest.raises(ValueError, match="a fraction, not a percentage"):
        vq.surprise_threshold(model, codes, pos, quantile=99.5)
    with torch.no_grad():  # one number stands for every slice's position, as in sample_codes and surprise
        at = -torch.log2(model(codes, torch.full((5,), 0.3)).softmax(1).gather(1, codes[:, None]))[:, 0]
    assert torch.allclose(vq.code_bits(model, codes, 0.3, batch_size=2), at, atol=1e-4) and not torch.allclose(at, bits)
    assert vq.prior_bits(model, codes, 0.3)["per_code"] == pytest.approx(at.mean().item(), rel=1e-5)


def test_position_reaches_every_logit_only_through_the_condition():
    model = small_prior(**RICH).double()
    codes = torch.randint(0, SMALL["n_codes"], (3, SMALL["height"], SMALL["width"]),
                          generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(codes, torch.full((3,), 0.2)), model(codes, torch.full((3,), 0.7))
        assert ((a - b).abs().amax(1) > 1e-6).all()  # every position's logits, (0, 0) included
        assert torch.equal(model(codes, torch.tensor(0.2)), a)  # a number stands for every map
    with pytest.raises(ValueError, match="conditioned on the slice position"):
        model(codes)
    with pytest.raises(ValueError, match="without slice positions"):
        small_prior()(codes, torch.full((3,), 0.5))
    # with no position given, positions are drawn from the training quantiles
    model.position_quantiles.copy_(torch.linspace(0.8, 0.9, 101))
    drawn, _, _ = model._noise(500, 1.0, torch.Generator().manual_seed(0), None)
    assert 0.8 <= drawn.min() and drawn.max() <= 0.9 and drawn.std() > 0.02
    assert len(drawn.unique()) > 400  # between the quantiles too, not 100 values


def test_drawn_positions_follow_the_training_quantiles():
    # inverse CDF of the quantiles: the CDF is piecewise linear through (q[k], k / 100), so it is checked
    # at every quantile and midway between them, on uneven quantile steps
    model = small_prior(**RICH)
    g = torch.Generator().manual_seed(3)
    q = torch.cat([torch.zeros(1), (torch.rand(100, generator=g) * 4 + 0.2).cumsum(0)])  # uneven steps
    model.position_quantiles.copy_(q / q[-1])
    q = model.position_quantiles.double()
    n = 200_000
    drawn = model.draw_positions(n, torch.Generator().manual_seed(4)).double().sort().values
    assert 0 <= drawn[0] and drawn[-1] <= 1
    at = torch.cat([q, (q[:-1] + q[1:]) / 2])
    want = torch.cat([torch.arange(101) / 100, (torch.arange(100) + 0.5) / 100]).double()
    got = torch.searchsorted(drawn, at, right=True).double() / n
    assert (got - want).abs().max() < 0.005  # about 4.5 standard errors at worst


def test_boolean_codes_are_refused_as_codes():
    prior = small_prior(**RICH)
    c = torch.randint(0, 2, (3, SMALL["height"], SMALL["width"]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(vq.code_bits(prior, c.int(), 0.5), vq.code_bits(prior, c, 0.5))  # integers are codes
    for call in (vq.code_bits, vq.prior_bits, vq.surprise_threshold):  # a mask is not
        with pytest.raises(ValueError, match="codes must be integers, got torch.bool"):
            call(prior, c.bool(), 0.5)


@pytest.mark.parametrize("kind", [SMALL, RICH, TRANSPOSED, TIED], ids=["gated", "position", "transposed", "tied"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_cached_sampler_matches_naive(kind, temperature):
    # float64, so rounding differences between the two paths cannot flip a near-tie
    model = small_prior(seed=2, **kind).double()
    pos = _position(model, 4)

    def sample(fn, seed):
        return fn(4, temperature, torch.Generator().manual_seed(seed), position=pos)

    cached = sample(model.generate, 5)
    assert cached.shape == (4, SMALL["height"], SMALL["width"]) and cached.dtype == torch.int64
    assert torch.equal(cached, sample(model.generate_naive, 5))
    assert not torch.equal(cached, sample(model.generate, 6))
    if model.config.positional:  # positions drawn from the training data: the same draws in both samplers
        drawn = model.generate(4, temperature, torch.Generator().manual_seed(7))
        assert torch.equal(drawn, model.generate_naive(4, temperature, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("top", [(3, 3), (3, 5)], ids=["square", "3x5"])  # the scan is transposed: h != w matters
def test_two_level_cached_sampler_matches_naive(temperature, top):
    model = two_level_prior(seed=3, top=top, code_dim=4 * (top == (3, 5))).double()  # 3 x 5: tied
    (h, w) = top
    for pos in (torch.tensor([0.1, 0.5, 0.9]), None):  # given, and drawn once for both levels
        cached = model.generate(3, temperature, torch.Generator().manual_seed(4), position=pos)
        naive = model.generate_naive(3, temperature, torch.Generator().manual_seed(4), position=pos)
        assert [c.shape for c in cached] == [(3, h, w), (3, 2 * h, 2 * w)]
        assert all(map(torch.equal, cached, naive))
    seen = []  # with none given, the levels get one position, drawn once
    for m in (model.top, model.bottom):
        m.generate = lambda *a, f=m.generate, **k: (seen.append(a[3]), f(*a, **k))[1]
    model.generate(3, temperature, torch.Generator().manual_seed(4))
    assert len(seen) == 2 and seen[0] is not None and torch.equal(seen[0], seen[1])
    bits = vq.prior_bits(model, cached, torch.rand(3), batch_size=2)
    assert bits["per_slice"] == pytest.approx(h * w * bits["per_code_top"] + 4 * h * w * bits["per_code_bottom"])
    assert bits["per_code"] == pytest.approx(bits["per_slice"] / (5 * h * w))
    nats = vq.code_nats(model(cached, torch.rand(3)), cached)
    assert nats.item() > 0 and torch.isfinite(nats)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_samplers_draw_the_first_code_from_softmax_of_logits_over_temperature(temperature):
    # the cached and naive samplers share the noise and the draw, so their agreement cannot check either:
    # the first code depends on no code, so its frequencies over many maps must be softmax(logits / T)
    model = small_prior(seed=4)
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.tensor([2.0, 0.0, -1.0, 1.0, 0.5, -2.0, 0.0]))  # far from uniform
        p = (model(torch.zeros(1, SMALL["height"], SMALL["width"], dtype=torch.long))[0, :, 0, 0]
             / temperature).softmax(0).double()
    for fn, n in ((model.generate, 4000), (model.generate_naive, 1500)):
        counts = torch.bincount(fn(n, temperature, torch.Generator().manual_seed(9))[:, 0, 0], minlength=7).double()
        assert ((counts - n * p) ** 2 / (n * p)).sum() < 25, (fn.__name__, counts / n, p)  # chi-square, 6 dof


def test_prior_dropout_acts_in_training_only():
    model = small_prior(seed=5, prior_dropout=0.3).train()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, SMALL["n_codes"], (4, SMALL["height"], SMALL["width"]), generator=g)
    with torch.no_grad():
        a, b = model(codes), model(codes)
        assert (a - b).abs().max() > 1e-3  # each pass its own mask, in the gated layers
        model.eval()
        assert torch.equal(model(codes), model(codes))


def test_code_nats_is_the_cross_entropy_over_every_code_of_both_levels():
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 5, 2, 3, generator=g), torch.randn(3, 5, 4, 6, generator=g))
    codes = (torch.randint(0, 5, (3, 2, 3), generator=g), torch.randint(0, 5, (3, 4, 6), generator=g))
    each = [-lg.log_softmax(1).gather(1, c[:, None]).flatten() for lg, c in zip(logits, codes)]
    assert vq.code_nats(logits, codes).item() == pytest.approx(torch.cat(each).mean().item(), rel=1e-6)
    assert vq.code_nats(logits[1], codes[1]).item() == pytest.approx(each[1].mean().item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extreme_temperatures(dtype):
    # a tiny temperature is greedy: each code the argmax of the prior given the codes before it, whatever the
    # noise (logits / T overflowed below about 1e-37, or 1e-6 in float16); an infinite one is uniform
    model = small_prior(seed=2, **RICH).to(dtype)
    pos = _position(model, 4).to(dtype)
    for fn in (model.generate, model.generate_naive):
        for t in (1e-6, 1e-40, 1e-300):
            codes = fn(4, t, torch.Generator().manual_seed(1), position=pos)
            assert torch.equal(codes, model(codes, pos).argmax(1))
            assert torch.equal(codes, fn(4, t, torch.Generator().manual_seed(2), position=pos))
    codes = model.generate(64, float("inf"), torch.Generator().manual_seed(3), position=pos.repeat(16))
    counts = torch.bincount(codes.flatten(), minlength=model.config.n_codes).double()
    expected = codes.numel() / model.config.n_codes
    assert ((counts - expected) ** 2 / expected).sum() < 2 * model.config.n_codes  # chi-square, K - 1 dof


@pytest.mark.parametrize("kind", [SMALL, RICH, TRANSPOSED, TIED], ids=["gated", "position", "transposed", "tied"])
def test_cached_logits_match_forward(kind):
    model = small_prior(seed=3, **{**kind, "n_codes": 13, "height": 7, "width": 9, "prior_dilations": (1, 2, 4)})
    pos = _position(model, 3)
    _, noise, _ = model._noise(3, 1.0, torch.Generator().manual_seed(0), pos)
    codes, logits = model._generate_cached(noise, 1.0, model._condition(3, pos, None), keep_logits=True)
    with torch.no_grad():
        full = model._scan(model(model._scan(codes, (1, 2)), pos)).permute(0, 2, 3, 1)  # (n, *shape, K) scanned
    assert (full - logits).abs().max() < 1e-5


def test_tied_prior_sees_codes_through_the_codebook_and_keeps_it(tmp_path):
    # at init a tied prior knows codes only by their codebook vectors: two codes with one vector are
    # interchangeable, in the input and in the logits; untied, they are not
    cb = torch.randn(SMALL["n_codes"], 5) * 4
    cb[2] = cb[1]
    codes = torch.randint(0, SMALL["n_codes"], (3, SMALL["height"], SMALL["width"]), generator=torch.Generator().manual_seed(0))
    swapped = torch.where(codes == 1, 2, torch.where(codes == 2, 1, codes))
    assert (codes == 1).any() and (codes == 2).any()
    torch.manual_seed(0)
    tied = PixelCNN(PriorConfig(**SMALL, code_dim=5)).eval().tie(cb)
    assert tied.codebook.pow(2).mean().item() == pytest.approx(1.0)
    assert torch.allclose(tied.codebook * cb.pow(2).mean().sqrt(), cb, atol=1e-5)  # scaled, not changed
    with torch.no_grad():
        logits = tied(codes)
        assert torch.allclose(logits[:, 1], logits[:, 2]) and torch.allclose(tied(swapped), logits, atol=1e-6)
        assert not torch.allclose(logits[:, 1], logits[:, 3])
        untied = small_prior()
        assert not torch.allclose(untied(codes)[:, 1], untied(codes)[:, 2])
    # a checkpoint keeps the codebook: the loaded prior gives the same logits and samples
    prior = small_prior(seed=1, **TIED)
    vq.save_checkpoint({"prior_config": asdict(prior.config), "prior": prior.state_dict()}, tmp_path / "p.pt")
    loaded = vq.load_prior(tmp_path / "p.pt")
    pos = _position(prior, 3)
    assert torch.equal(loaded.codebook, prior.codebook) and loaded.config == prior.config
    with torch.no_grad():
        assert torch.equal(loaded(codes, pos), prior(codes, pos))
    assert torch.equal(loaded.generate(3, generator=torch.Generator().manual_seed(2), position=pos),
                       prior.generate(3, generator=torch.Generator().manual_seed(2), position=pos))
    with pytest.raises(ValueError, match="code_dim"):
        PriorConfig(**SMALL, code_dim=-1)


def test_generate_ignores_dropout_in_train_mode():
    model = small_prior(seed=4, prior_dropout=0.5).double()
    model.train()
    cached = model.generate(3, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(cached, model.generate_naive(3, 1.0, torch.Generator().manual_seed(0)))
    assert model.training


@pytest.mark.parametrize("p", [0.1, 0.37])
def test_byte_dropout_drops_its_share_keeps_the_mean_and_masks_the_gradient(p):
    torch.manual_seed(3)
    x = (torch.rand(7, 5, 33, 19) + 0.5).requires_grad_()  # odd size: the last random integer is cut
    y = vq.byte_dropout(x, p)
    dropped = y == 0
    cut = round(256 * p)
    n = x.numel()
    assert abs(dropped.float().mean().item() - cut / 256) < 4 * math.sqrt(cut / 256 * (1 - cut / 256) / n)
    kept = ~dropped
    assert torch.allclose(y[kept], x[kept] * 256 / (256 - cut))
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.02
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * 256 / (256 - cut))
    assert not torch.equal(dropped, vq.byte_dropout(x, p) == 0)  # a fresh mask each call
    assert vq.byte_dropout(x, p, training=False) is x and vq.byte_dropout(x, 0.0) is x


def test_loss_bits_and_training_lowers_it():
    torch.manual_seed(0)
    cfg = PriorConfig(**{**SMALL, "prior_dropout": 0.0})
    model = PixelCNN(cfg)
    # each code is its left neighbour + 1 and its upper neighbour + 2: only code (0, 0) is random
    start = torch.randint(0, cfg.n_codes, (32, 1, 1))
    rows, cols = torch.arange(cfg.height).view(-1, 1), torch.arange(cfg.width)
    data = (start + 2 * rows + cols) % cfg.n_codes  # (N, h, w)
    nats, bits = model.loss(data)
    assert nats.dim() == 0 and torch.isfinite(nats)
    assert math.isclose(bits.item(), nats.item() / math.log(2), rel_tol=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        model.loss(data)[0].backward()
        opt.step()
    assert model.loss(data)[1].item() < 0.25 * math.log2(cfg.n_codes)


def test_bad_arguments():
    model = small_prior()
    for fn in (model.generate, model.generate_naive):
        for bad in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError):
                fn(2, temperature=bad)
        for bad in (0, -3):
            with pytest.raises(ValueError):
                fn(bad)
    with pytest.raises(ValueError):
        model(torch.zeros(2, SMALL["height"] + 1, SMALL["width"], dtype=torch.long))
    with pytest.raises(ValueError, match=r"int >= 1, got np.int64\(2\) \(int64\)"):
        model.generate(np.int64(2))
    rich = small_prior(**RICH)
    for bad in (float("nan"), 1.5, torch.tensor([0.3, -0.1])):
        for fn in (rich.generate, rich.generate_naive):
            with pytest.raises(ValueError, match=r"positions must be in \[0, 1\]"):
                fn(2, position=bad)


# ----------------------------------------------------------------------------- train.py and sample.py

ROOT = Path(__file__).resolve().parent
# a tiny model and data set: seconds per run on a CPU
TINY = ["--n_train", "48", "--n_val", "16", "--n_test", "16", "--size", "32", "32", "--batch_size", "8",
        "--channels", "16", "--code_dim", "8", "--n_codes", "32", "--prior_channels", "16",
        "--prior_layers", "3", "--prior_dilations", "1", "2", "4", "--log_every", "3", "--rate", "0"]  # rate: own tests


def _train(out, *extra):
    return train.main(["--out", str(out), "--epochs", "2", "--prior_epochs", "2", *TINY, *extra])


def test_each_epoch_shuffles_the_slices_its_own_way_and_replays_it():
    run = types.SimpleNamespace(rank=0, world=1)
    orders = [train._epoch_order(run, 50, e, seed=3) for e in (0, 1, 0)]
    assert sorted(orders[0].tolist()) == list(range(50)) and torch.equal(orders[0], orders[2])
    assert not torch.equal(orders[0], orders[1])
    halves = [train._epoch_order(types.SimpleNamespace(rank=r, world=2), 50, 1, seed=3) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), orders[1])  # two ranks split the epoch's order


def test_train_and_sample_end_to_end(tmp_path, capsys, monkeypatch):
    result = _train(tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    for key in ("test_ssim_mean", "test_ssim_std", "test_ssim_min", "test_psnr_mean", "n_train", "n_val", "n_test",
                "val_ssim_best", "codebook_usage", "perplexity", "skipped_files", "seconds_vqvae", "device",
                "prior_bits_per_code", "unigram_bits_per_code", "seconds_prior"):
        assert key in s, key
    assert (s["n_train"], s["n_val"], s["n_test"]) == (48, 16, 16)
    assert 0 < s["test_ssim_min"] <= s["test_ssim_mean"] <= 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["stage"] for r in lines] == ["vqvae"] * 2 + ["prior"] * 2
    assert s["val_ssim_best"] == max(json.loads(r)["val_ssim"] for r in lines[:2])  # the best epoch's,
    ckpt = vq.load_checkpoint(tmp_path / "model.pt")  # and model.pt holds its weights
    val = vq.load_splits(ckpt["data"])["validate"]
    got = vq.ssim(val, vq.VQVAE.from_checkpoint(ckpt).reconstruct(val)).mean().item()
    assert got == pytest.approx(s["val_ssim_best"], abs=1e-5)
    plotted = importlib.util.find_spec("matplotlib") is not None  # optional: the tests pass without it
    pictures = ("recon.png", "progress.png", "test_best.png", "test_worst.png", "samples.png", "positions.png",
                *["curves.png"] * plotted)
    for name in ("model.pt", "vqvae.pt", "prior.pt", "summary.json", "metrics.jsonl", *pictures):
        assert (tmp_path / name).exists(), name
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(pictures)  # no picture per epoch
    if plotted:
        curves = (tmp_path / "curves.png").read_bytes()
        assert curves[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(curves[16:20], "big") > 3 * 200  # 3 panels
        assert "needs matplotlib" not in capsys.readouterr().out
    else:
        assert "curves.png needs matplotlib" in capsys.readouterr().out
    assert 0 < s["test_ssim_body_mean"] <= 1 and len(s["test_best"]) == 4
    assert 0 <= s["two_sample_samples"] <= 1 and 0 <= s["copies"] <= 1 and s["realism_n"] == 16
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["vqvae_config"]["n_codes"] == 32 and ckpt["prior_config"]["prior_layers"] == 3
    assert ckpt["data"]["size"] == [32, 32] and ckpt["prior_config"]["positional"]  # phantom levels
    test = vq.load_splits(ckpt["data"])["test"]
    recon = vq.VQVAE.from_checkpoint(ckpt).reconstruct(test)
    assert s["diversity_recon"] == pytest.approx(sample.pair_ssim(recon), abs=1e-6) != s["diversity_real"]
    assert torch.equal(ckpt["prior"]["embed.weight"], result["prior"].state_dict()["embed.weight"])
    # samples.png: the first, middle and last of 8 evenly spaced test slices (32 x 32, shown turned), a grey band,
    # then two rows of samples; read back through zlib alone
    png = (tmp_path / "samples.png").read_bytes()
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    idat, i = b"", 8
    while i < len(png):
        n = int.from_bytes(png[i:i + 4], "big")
        idat += png[i + 8:i + 8 + n] if png[i + 4:i + 8] == b"IDAT" else b""
        i += 12 + n
    pic = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w + 1)[:, 1:] / 255
    assert (w, h) == (2 + 8 * 34, (2 + 34) + 6 + (2 + 2 * 34))
    for col, k in ((0, 0), (4, 9), (7, 15)):  # linspace(0, 15, 8) rounded: 0, 2, 4, 6, 9, 11, 13, 15
        tile = pic[2:34, 2 + 34 * col:34 + 34 * col]
        assert np.abs(tile - np.rot90(test[k, 0].numpy(), ckpt["data"]["rot90"])).max() <= 0.6 / 255, (col, k)
    assert np.allclose(pic[36:42], 128 / 255)  # the band

    images = sample.main(["--out", str(tmp_path), "--n", "3", "--seed", "7"])
    again = sample.main(["--out", str(tmp_path), "--n", "3", "--seed", "7", "--dest", str(tmp_path / "b")])
    assert torch.equal(images, again)  # same seed, same samples
    other = sample.main(["--out", str(tmp_path), "--n", "3", "--seed", "8", "--dest", str(tmp_path / "c")])
    assert not torch.equal(images, other)
    folder = tmp_path / "samples_seed7_t1"
    assert (folder / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nii = nib.load(str(folder / "sample_002.nii.gz"))
    arr = np.asanyarray(nii.dataobj)
    assert arr.shape == (32, 32) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert np.allclose(arr, images[2, 0].numpy())
    capsys.readouterr()
    sample.main(["--out", str(tmp_path), "--n", "2", "--seed", "7", "--dest", str(tmp_path / "b")])  # fewer
    assert "also holds 1 file(s) not of this run (sample_002.nii.gz" in capsys.readouterr().out
    assert (tmp_path / "b" / "sample_002.nii.gz").exists()  # named, never removed: the folder may be the user's

    names = ["d1/a.nii.gz", "d1/a_2.nii.gz", "d2/a.nii.gz"]  # one name taken three ways (once hung the renaming)
    for i, name in enumerate(names):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(folder / f"sample_00{i}.nii.gz", tmp_path / name)
    sims = sample.main(["--out", str(tmp_path), "--reconstruct", *(str(tmp_path / n) for n in names)])
    assert "ssim" in capsys.readouterr().out and len(sims) == 3 and all(0 < v.item() <= 1 for v in sims)
    dest = tmp_path / "reconstructions"
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        f"{i:03d}_{stem}{end}" for i, stem in enumerate(["a", "a_2", "a"]) for end in (".png", "_reconstruction.nii.gz"))
    arr = np.asanyarray(nib.load(str(dest / "001_a_2_reconstruction.nii.gz")).dataobj)
    want = result["vqvae"].reconstruct(load_slices([tmp_path / names[1]], (32, 32), cache_dir=False))  # as read
    assert arr.shape == (32, 32) and arr.dtype == np.float32 and np.allclose(arr, want[0, 0].numpy(), atol=1e-5)
    whole = sample.main(["--out", str(tmp_path), "--reconstruct", str(tmp_path / "d1"), str(tmp_path / names[2]),
                         "--dest", str(tmp_path / "r2")])  # a folder: its slice files, naturally sorted
    assert [v.item() for v in whole] == [v.item() for v in sims]
    assert "also holds" not in capsys.readouterr().out
    sample.main(["--out", str(tmp_path), "--reconstruct", str(tmp_path / names[0])])  # one input: two left over
    assert "also holds 4 file(s) not of this run (001_a_2.png, ...)" in capsys.readouterr().out
    writes, write = [], sample._write_slices

    def stopped_at_the_second(*a):
        writes.append(1)
        if len(writes) > 1:
            raise KeyboardInterrupt
        write(*a)
    with monkeypatch.context() as m:  # Ctrl-C at the second input: the first is this run's, the rest are said
        m.setattr(sample, "_write_slices", stopped_at_the_second)
        with pytest.raises(SystemExit):
            sample.main(["--out", str(tmp_path), "--reconstruct", *(str(tmp_path / n) for n in names)])
    out = capsys.readouterr().out
    assert "stopped after 1 of 3 inputs" in out and "also holds 4 file(s) not of this run (001_a_2.png" in out
    own = sample.main(["--out", str(tmp_path), "--reconstruct", str(folder), "--dest", str(tmp_path / "r3")])
    out = capsys.readouterr().out  # the samples' folder: its NIfTI samples, its grid.png named and left out
    assert len(own) == 3 and out.count("grid.png") == 1 and "skipped 1 PNG" in out
    assert not any("grid" in p.name for p in (tmp_path / "r3").iterdir())
    at = sample.main(["--out", str(tmp_path), "--n", "3", "--seed", "7", "--position", "0.9"])
    assert (tmp_path / "samples_seed7_t1_p0.9" / "grid.png").exists() and not torch.equal(at, images)
    report = sample.main(["--out", str(tmp_path), "--evaluate", "--seed", "3"])
    assert json.loads((tmp_path / "summary.json").read_text())["two_sample_samples"] == report["two_sample_samples"]
    # more draws, each with its own critic: the first is the single report's, the score their mean, the rest as before
    critic, seen = sample.two_sample_score, []  # what each critic is given

    def spy(real_fit, fake_fit, real_test, fake_test, seed, **kw):
        seen.append((real_fit, fake_fit, real_test, fake_test, seed))
        return critic(real_fit, fake_fit, real_test, fake_test, seed, **kw)
    monkeypatch.setattr(sample, "two_sample_score", spy)
    more = sample.main(["--out", str(tmp_path), "--evaluate", "--seed", "3", "--repeats", "3"])
    runs, prior_runs = more.pop("two_sample_samples_runs"), more.pop("two_sample_prior_runs")
    assert len(runs) == len(prior_runs) == 3 and runs[0] == report["two_sample_samples"]
    assert prior_runs[0] == report["two_sample_prior"]
    (real, recon_fit, test, recon, _), *critics = seen  # the floor (fit on reconstructions), then two per draw
    draws, priors = critics[::2], critics[1::2]  # real against samples, then reconstructions against the same
    assert [c[-1] for c in draws] == [c[-1] for c in priors] and draws[0][-1] == 3 and not torch.equal(recon, draws[0][3])
    assert len({c[-1] for c in draws}) == 3 and not {c[-1] for c in draws} & {sample._draw_seed(4, r) for r in range(3)}
    scored = [d[3] for d in draws]
    assert not torch.equal(scored[0], scored[1]) and not torch.equal(scored[1], scored[2])
    assert all(not torch.equal(d[1][: len(d[3])], d[3]) for d in draws)  # the critic never trains on what it scores
    for d, p in zip(draws, priors):  # the same samples; the reconstructions of the same slices in place of them
        assert torch.equal(d[0], real) and torch.equal(d[2], test) and p[1] is d[1] and p[3] is d[3]
        assert p[0] is recon_fit and torch.equal(p[2], recon)
    assert more.pop("two_sample_samples") == pytest.approx(sum(runs) / 3)
    assert more.pop("two_sample_prior") == pytest.approx(sum(prior_runs) / 3)
    assert more == {k: v for k, v in report.items() if k not in ("two_sample_samples", "two_sample_prior")}
    assert "two-sample" in capsys.readouterr().out
    (tmp_path / "summary.json").write_text('{"test_ssim_mean": 0.9')  # cut short by an old version's crash
    capsys.readouterr()
    again = sample.main(["--out", str(tmp_path), "--evaluate", "--seed", "3"])
    assert again == report and "not saved" in capsys.readouterr().out  # a report, not a traceback


def test_readme_code_runs_with_vq_py_copied_alone(tmp_path):
    """README's 'Copying vq.py' code as printed, in a folder holding vq.py, a model and slices, and no kernels/."""
    _train(tmp_path / "run", "--realism", "false")
    work = tmp_path / "elsewhere"
    (work / "out").mkdir(parents=True)
    shutil.copy(ROOT / "vq.py", work)
    shutil.copy(tmp_path / "run" / "model.pt", work / "out")
    rng = np.random.default_rng(3)
    for z in range(9):  # another size than the model's 32 x 32: load_slices brings them to it
        save(work / "keras_slices_test" / f"case_001_week_0_slice_{z}.nii.gz", rng.uniform(0, 500, (40, 24)))
    code = (ROOT / "README.md").read_text().split("## Copying vq.py", 1)[1].split("```python\n", 1)[1].split("```")[0]
    code += ("import importlib.util, os\n"
             "assert importlib.util.find_spec('kernels') is None and vq.__file__ == os.path.abspath('vq.py')\n"
             "assert x.shape == (9, 1, 32, 32) and codes.shape == (8, 8, 8) and new.shape == (4, 1, 32, 32)\n"
             "assert many.shape == (1000, 1, 32, 32) and s['map'].shape == (8, 1, 32, 32) and s['score'].shape == (8,)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    printed = [float(v) for v in r.stdout.split("[", 1)[1].split("]")[0].split(",")]  # the SSIM of 8 reconstructions
    assert len(printed) == 8 and all(-1 < v < 1 for v in printed)


def test_judge_scores_samples_by_a_prior_of_the_other_scan_order(tmp_path, capsys):
    run, other = tmp_path / "run", tmp_path / "judge"
    _train(run, "--realism", "false")
    other.mkdir()
    for name in ("vqvae.pt", "model.pt", "summary.json", "metrics.jsonl"):  # a copy, as the README says
        shutil.copy(run / name, other / name)
    train.main(["--out", str(other), "--stage", "prior", "--overwrite", "--prior_epochs", "2", *TINY,
                "--prior_transpose", "true", "--realism", "false"])
    ckpt = vq.load_checkpoint(run / "model.pt")
    vqvae, prior, judge = vq.VQVAE.from_checkpoint(ckpt), vq.load_prior(ckpt), vq.load_prior(other / "model.pt")
    assert judge.config.prior_transpose and not prior.config.prior_transpose
    report = sample.main(["--out", str(run), "--evaluate", "--seed", "3", "--judge", str(other)])  # its folder, too
    assert "judge |" in capsys.readouterr().out
    saved = json.loads((run / "summary.json").read_text())
    assert all(saved[k] == report[k] for k in ("judge_excess_bits_samples", "judge_excess_bits_real"))
    plain = sample.main(["--out", str(run), "--evaluate", "--seed", "3"])  # without it: no stale judge figures
    assert not any(k.startswith("judge_") for k in (*plain, *json.loads((run / "summary.json").read_text())))
    # the real slices' figure, from the two priors' logits directly
    data = vq.load_splits(ckpt["data"])
    codes, where = vqvae.encode(data["test"]), data["positions"]["test"]
    with torch.no_grad():
        nll = [F.cross_entropy(m.eval()(codes, where), codes, reduction="none").sum((1, 2)) / math.log(2)
               for m in (judge, prior)]
    assert report["judge_excess_bits_real"] == pytest.approx((nll[0] - nll[1]).mean().item(), rel=1e-4, abs=1e-3)
    assert report["judge_excess_bits_real_std"] == pytest.approx((nll[0] - nll[1]).std().item(), rel=1e-3, abs=1e-3)
    # samples: a prior judging its own draws finds nothing beyond them; with a seed, the same draws
    same = sample.judge_report(prior, prior, codes[:5], where[:5], seed=1)
    assert all(abs(v) < 1e-3 for v in same.values())
    a = sample.judge_report(prior, judge, codes, where, seed=1)
    b = sample.judge_report(prior, judge, codes, where, seed=1, batch_size=3)  # batches draw the same maps
    assert a["judge_excess_bits_samples"] == pytest.approx(b["judge_excess_bits_samples"], rel=1e-5)
    assert a != sample.judge_report(prior, judge, codes, where, seed=2)
    # usage: with --evaluate only; a prior of the same order or of another VQ-VAE's codes is refused
    stranger = dict(vq.load_checkpoint(other / "model.pt"), vqvae_fingerprint="another")
    vq.save_checkpoint(stranger, tmp_path / "stranger.pt")
    for argv, says in (([], "goes with --evaluate"), (["--evaluate"], "same order"),
                       (["--evaluate", "--judge", str(tmp_path / "stranger.pt")], "no prior of this VQ-VAE"),
                       (["--evaluate", "--judge", str(tmp_path / "nothing.pt")], "no checkpoint")):
        with pytest.raises(SystemExit) as e:
            sample.main(["--out", str(run), "--judge", str(run / "model.pt"), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, (argv, err)
    # the command it gives trains: HipMRI's 64 x 32 map read column by column needs 11 layers, not the default 10
    hip = vq.PixelCNN(PriorConfig(n_codes=8, height=64, width=32, prior_channels=8, prior_layers=10))
    with pytest.raises(sample.UsageError, match="--prior_transpose true --prior_layers 11$"):
        sample._judge(types.SimpleNamespace(judge=tmp_path / "stranger.pt", out="out"), {}, hip, "cpu")


def test_blind_comparison_shuffles_two_sources_and_keys_them(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _train(run, "--realism", "false")
    ckpt = vq.load_checkpoint(run / "model.pt")
    vqvae, prior = vq.VQVAE.from_checkpoint(ckpt), vq.load_prior(ckpt)
    test = vq.load_splits(ckpt["data"])["test"]
    shown, sources = sample.main(["--out", str(run), "--blind", "test", "--n", "5", "--seed", "4"])
    key = json.loads((run / "blind_test_seed4" / "blind_key.json").read_text())
    assert key == {"a": str(run.resolve()), "b": "test", "tiles": sources} and sources != sorted(sources)
    assert sources.count("a") == sources.count("b") == 5
    assert (run / "blind_test_seed4" / "blind.png").exists() and "judge each" in capsys.readouterr().out
    with monkeypatch.context() as m:  # the same comparison spelled from elsewhere: drawn again, not refused
        for here, out in ((tmp_path, "run"), (run, ".")):
            m.chdir(here)
            assert sample.main(["--out", out, "--blind", "test", "--n", "5", "--seed", "9"])[1] != sources
    calls = torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(1)).tolist()  # counted, nothing drawn
    counts = sample.main(["--out", str(run), "--blind", "test", "--seed", "4", "--calls", ",".join(map(str, calls))])
    assert counts == {a: sum(c for c, t in zip(calls, sources) if t == a) for a in "ab"}
    assert f"b: test: {counts['b']} of 5 called 1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # calls against another comparison's key
        sample.main(["--out", str(run), "--blind", "train", "--seed", "4", "--calls", ",".join(map(str, calls)),
                     "--dest", str(run / "blind_test_seed4")])
    assert e.value.code == 2 and "is of test, not --blind train" in capsys.readouterr().err

    def matched(tiles, pool):  # each tile is one image of pool, none twice
        gap = (tiles[:, None] - pool[None]).abs().flatten(2).amax(2)  # (tiles, pool)
        return bool((gap.min(1).values < 1e-5).all()) and len(set(gap.argmin(1).tolist())) == len(tiles)

    mine = vq.sample_slices(vqvae, prior, 5, generator=torch.Generator().manual_seed(4))
    is_mine = torch.tensor([s == "a" for s in sources])
    assert matched(shown[is_mine], mine) and matched(shown[~is_mine], vqvae.reconstruct(test))
    assert not matched(shown[~is_mine], mine)
    shown, train_sources = sample.main(["--out", str(run), "--blind", "train", "--n", "5", "--seed", "4"])
    assert (run / "blind_test_seed4" / "blind.png").exists() and (run / "blind_train_seed4" / "blind.png").exists()
    assert train_sources != sources  # a layout of its own: reading one key gives away no other picture
    sources = train_sources
    train_recon = vqvae.reconstruct(vq.load_splits(ckpt["data"])["train"])
    is_mine = torch.tensor([s == "a" for s in sources])
    assert matched(shown[~is_mine], train_recon) and not matched(shown[~is_mine], vqvae.reconstruct(test))
    # a run against itself: the second source draws with the next seed
    shown, sources = sample.main(["--out", str(run), "--blind", str(run), "--n", "3", "--seed", "4",
                                  "--dest", str(tmp_path / "self")])
    first, second = (vq.sample_slices(vqvae, prior, 3, generator=torch.Generator().manual_seed(k)) for k in (4, 5))
    is_a = torch.tensor([s == "a" for s in sources])
    assert matched(shown[is_a], first) and matched(shown[~is_a], second) and not matched(shown[~is_a], first)
    # usage: a run of another size, more real slices than the split has, a second mode, calls astray
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    vq.save_checkpoint({**ckpt, "data": {**ckpt["data"], "size": [64, 32]}}, stranger / "model.pt")
    for argv, says in ((["--blind", str(stranger)], "compare runs of one size"),
                       (["--blind", "test", "--n", "17"], "fewer than --n 17"),
                       (["--blind", str(tmp_path / "none")], "no model.pt there"),
                       (["--blind", str(run), "--n", "3", "--dest", str(run / "blind_test_seed4")],  # kept
                        f"blind_test_seed4 holds the blind test of {run} against test: give another --dest"),
                       (["--blind", "test", "--evaluate"], "separate modes"), (["--calls", "1"], "goes with --blind"),
                       (["--blind", "test", "--seed", "4", "--calls", "1,0"], "give 10 calls"),
                       (["--blind", "test", "--seed", "5", "--calls", "1"], "no blind key"),
                       (["--blind", "test", "--seed", "6", "--calls", "1"], "is not one blind.png's key (damaged?)"),
                       (["--blind", "test", "--seed", "7", "--calls", "1"], "is not one blind.png's key (damaged?)")):
        for seed, text in (("6", "{"), ("7", json.dumps({"a": str(run), "b": "test", "tiles": None}))):
            (run / f"blind_test_seed{seed}").mkdir(exist_ok=True)
            (run / f"blind_test_seed{seed}" / "blind_key.json").write_text(text)  # cut short, or edited by hand
        with pytest.raises(SystemExit) as e:
            sample.main(["--out", str(run), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_sample_beyond_one_batch_writes_each_sample_under_its_own_index_and_defaults_to_16(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, "--realism", "false")
    ckpt = vq.load_checkpoint(run / "model.pt")
    vqvae, prior = vq.VQVAE.from_checkpoint(ckpt), vq.load_prior(ckpt)
    shown = sample.main(["--out", str(run), "--n", "65", "--seed", "1"])  # more than the 64 drawn at a time
    folder = run / "samples_seed1_t1"
    assert sorted(p.name for p in folder.glob("sample_*.nii.gz")) == [f"sample_{i:03d}.nii.gz" for i in range(65)]
    want = vq.sample_slices(vqvae, prior, 65, generator=torch.Generator().manual_seed(1))  # the same draws
    assert len(shown) == 65 and torch.allclose(shown, want, atol=1e-5)
    for i in (0, 63, 64):  # each file holds the sample of its index, the first not overwritten by the 65th
        arr = np.asanyarray(nib.load(str(folder / f"sample_{i:03d}.nii.gz")).dataobj)
        assert np.allclose(arr, want[i, 0].numpy(), atol=1e-5), i
    assert "wrote 65 samples" in capsys.readouterr().out
    default = sample.main(["--out", str(run)])  # no --n: 16, as --help says
    assert len(default) == 16 and len(list((run / "samples_seed0_t1").glob("sample_*.nii.gz"))) == 16


def test_blind_against_a_split_takes_up_to_all_its_slices_picked_by_seed_and_keys_the_run_resolved(
        tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _train(run, "--realism", "false")
    ckpt = vq.load_checkpoint(run / "model.pt")
    test = vq.load_splits(ckpt["data"])["test"]
    recon = vq.VQVAE.from_checkpoint(ckpt).reconstruct(test)

    def which(tiles):  # the index in the test split of each tile (its reconstruction), each slice at most once
        gap = (tiles[:, None] - recon[None]).abs().flatten(2).amax(2)
        assert (gap.min(1).values < 1e-5).all()
        picked = gap.argmin(1).tolist()
        assert len(set(picked)) == len(picked)
        return set(picked)

    shown, sources = sample.main(["--out", str(run), "--blind", "test", "--n", str(len(test)), "--seed", "2"])
    assert which(shown[torch.tensor([s == "b" for s in sources])]) == set(range(len(test)))  # the whole split
    picks = []
    for seed in (4, 5):  # fewer than the split: a random pick, its own for each seed
        shown, sources = sample.main(["--out", str(run), "--blind", "test", "--n", "5", "--seed", str(seed)])
        picks.append(which(shown[torch.tensor([s == "b" for s in sources])]))
    assert len(picks[0]) == len(picks[1]) == 5 and picks[0] != picks[1]
    monkeypatch.chdir(tmp_path)  # --blind given relative: the key names the run's folder, wherever it is read from
    sample.main(["--out", "run", "--blind", "run", "--n", "1", "--dest", str(tmp_path / "self")])
    assert json.loads((tmp_path / "self" / "blind_key.json").read_text())["b"] == str(run.resolve())


def test_blind_calls_are_zeros_and_ones_spaces_allowed(tmp_path, capsys):
    tiles = ["a", "b", "b", "a", "b", "a"]  # a key as blind.png's drawing writes it; counting draws nothing
    (tmp_path / "blind_test_seed0").mkdir()
    (tmp_path / "blind_test_seed0" / "blind_key.json").write_text(json.dumps({"a": str(tmp_path), "b": "test",
                                                                               "tiles": tiles}))
    calls = [1, 0, 1, 1, 1, 0]
    want = {a: sum(c for c, t in zip(calls, tiles) if t == a) for a in "ab"}
    for typed in (",".join(map(str, calls)), ", ".join(map(str, calls))):
        assert sample.main(["--out", str(tmp_path), "--blind", "test", "--calls", typed]) == want, typed
    for typed in ("1,0,2,1,1,0", "1,0,1,1,1,-1", "1,0,1,1,1,yes"):  # not a yes or a no: refused, not counted
        with pytest.raises(SystemExit) as e:
            sample.main(["--out", str(tmp_path), "--blind", "test", "--calls", typed])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "give 6 calls of 0 or 1" in err and len(err.strip().splitlines()) == 1, typed


def test_sample_flag_bounds_are_inclusive_and_each_mode_refuses_what_it_ignores(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    for k in ("0", "1", "0.5"):  # the first and last slice of a volume are positions too
        assert sample.parse_args([*out, "--position", k]).position == float(k)
    assert sample.parse_args([*out, "--evaluate", "--repeats", "1"]).repeats == 1
    assert [sample.parse_args([*out, "--seed", str(k)]).seed for k in (0, 2**63 - 1)] == [0, 2**63 - 1]
    for argv, says in ((["--position", "1.01"], "--position must be between 0 and 1"),
                       (["--position", "-0.1"], "--position must be between 0 and 1"),
                       (["--evaluate", "--repeats", "0"], "--repeats must be at least 1"),
                       (["--seed", "-1"], "--seed must be between 0 and 2**63 - 1"),
                       (["--blind", "test", "--repeats", "2"], "--repeats does nothing with --blind"),
                       (["--surprise", "x.nii", "--n", "4"], "--n does nothing with --surprise")):
        with pytest.raises(SystemExit) as e:
            sample.parse_args([*out, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, argv


def test_realism_false_trains_both_stages_without_the_report(tmp_path, capsys):
    # what kernels.gpu_check's timing runs pass: the report's host SSIM searches are not what they time
    train.main(["--out", str(tmp_path), "--epochs", "1", "--prior_epochs", "1", *TINY, "--realism", "false"])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert not [k for k in s if k.startswith(("realism_", "two_sample_", "nearest_train_", "copies", "diversity_"))]
    assert s["epochs_vqvae"] == s["epochs_prior"] == 1 and s["prior_bits_per_code"] > 0 and s["test_ssim_mean"] > 0
    assert (tmp_path / "samples.png").exists() and "realism |" not in capsys.readouterr().out


def test_train_on_nifti_tree_with_bad_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VQ_CACHE_DIR", str(tmp_path / "cache"))  # keep the user's cache untouched
    root = write_phantom_tree(tmp_path / "data", n_train=40, n_val=12, n_test=12, size=(32, 32),
                                 slices_per_volume=4)
    bad = [root / "keras_slices_train" / "case_900_week_0_slice_0.nii.gz",
           root / "keras_slices_test" / "case_901_week_0_slice_0.nii.gz"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image")
    holed = sorted((root / "keras_slices_train").glob("case_*"))[5]
    a = np.asanyarray(nib.load(str(holed)).dataobj).astype(np.float32)
    a[3:6, 2:5] = np.nan  # 9 NaN: zeroed, and said in a line of the log, not a Python warning
    save(holed, a)
    out = tmp_path / "out"
    train.main(["--data", str(root), "--out", str(out), "--epochs", "1", "--prior_epochs", "1", *TINY[9:]])  # no --size
    captured = capsys.readouterr()
    assert f"9 NaN/inf values set to 0 in {holed}, of 41 files from" in captured.out and "Warning" not in captured.err
    assert "size 32 x 32: the training slices' most common shape" in captured.out  # the empty file's shape: none
    reading = captured.out.index("reading 66 slice files (decoded once, then cached)")  # skipped ones too
    assert reading < captured.out.index("9 NaN/inf values")  # said before the files are read
    s = json.loads((out / "summary.json").read_text())
    # positions from the names (slice_Z of volumes of 4), skipped files and all: the prior is conditioned
    assert torch.load(out / "model.pt", weights_only=True)["prior_config"]["positional"]
    assert torch.load(out / "model.pt", weights_only=True)["data"]["rot90"] == 1  # NIfTI: upright after a turn
    assert sorted(Path(f["file"]).name for f in s["skipped_files"]) == sorted(p.name for p in bad)
    assert (s["n_train"], s["n_val"], s["n_test"]) == (40, 12, 12)
    printed = captured.out
    for p in bad:
        assert printed.count(p.name) == 1  # each bad file named once
    sample.main(["--out", str(out), "--reconstruct", str(holed)])
    captured = capsys.readouterr()
    assert f"9 NaN/inf values set to 0 in {holed}\n" in captured.out and "Warning" not in captured.err
    # 40 slices in batches of 8: a small folder, so its prior trains on shifted maps with more dropout
    assert torch.load(out / "model.pt", weights_only=True)["prior_config"]["prior_dropout"] == 0.3
    assert "a small folder (40 training slices" in printed and "--prior_shifts 4" in printed
    capsys.readouterr()
    train.main(["--out", str(out), "--stage", "prior", "--overwrite", "--prior_epochs", "1", "--realism", "false",
                *TINY[9:]])  # no --data, no --size: the slices of model.pt's VQ-VAE
    assert f"slices of (32, 32) from {root.resolve()}" in capsys.readouterr().out
    sample.main(["--out", str(out), "--blind", "test", "--n", "2"])  # reads the test split again
    captured = capsys.readouterr()
    assert f"skipped {bad[1]}: " in captured.out and "Warning" not in captured.err  # a line, not a Python warning
    (tmp_path / "link").symlink_to(root)  # the same files through a symlinked folder: the same digest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bad files, said above
        assert len({vq.load_splits({"source": str(p), "size": [32, 32]})["settings"]["files"]
                    for p in (root, tmp_path / "link", Path(os.path.relpath(root)))}) == 1
    extra = root / "keras_slices_train" / "case_950_week_0_slice_0.nii.gz"  # a file added since: refused, where
    shutil.copy(holed, extra)  # a plain folder's case could move from train to test
    for argv, says in ((["--stage", "prior", "--overwrite"], "its test slices may now be training slices"),
                       (["--stage", "vqvae", "--resume", "--epochs", "2", "--data", str(root)], "splits would differ")):
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(out), *argv, *TINY[9:]])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    for added, note in ((True, 1), (False, 0)):  # sample.py reads them: said
        sample._own_data(vq.load_checkpoint(out / "model.pt"))
        assert capsys.readouterr().out.count(f"note: the files in {root.resolve()} changed since") == note
        extra.unlink(missing_ok=True)
    root.rename(tmp_path / "moved")  # the modes that read the training slices again say where they looked
    for argv in (["--evaluate"], ["--blind", "test", "--n", "2"]):
        with pytest.raises(SystemExit) as e:
            sample.main(["--out", str(out), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(root) in err and "moved?" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # and so does --stage prior, which reads them from model.pt's record
        train.main(["--out", str(out), "--stage", "prior", "--overwrite"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(root) in err and "moved?" in err and len(err.strip().splitlines()) == 1


def test_native_size_is_the_most_common_shape_fit_within_longest(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(3)
    files = [save(tmp_path / f"a{i}.nii.gz", rng.uniform(0, 5, shape).astype(np.float32))  # axes 1 dropped
             for i, shape in enumerate([(60, 44), (60, 44, 1), (1, 60, 44), (80, 80), (80, 80), (60, 44, 3)])]
    assert train._native_size(files, 4) == [60, 44] and train._native_size(files, 8) == [64, 48]  # rounded to step
    (tmp_path / "bad.nii.gz").write_bytes(b"not a header")
    assert train._native_size([tmp_path / "bad.nii.gz", files[3]], 4) == [80, 80]  # unreadable: left out
    assert train._native_size([tmp_path / "bad.nii.gz"], 4) is None
    for i in range(3):  # PNG: width x height in the header; 600 wide, 300 high, fit within 256
        Image.fromarray(rng.integers(0, 255, (300, 600), dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    assert train._native_size(sorted(tmp_path.glob("p*.png")), 8) == [128, 256]
    assert train._native_size(files[:3], 16) == [64, 48]  # 3.75 and 2.75 steps of 16, rounded
    tiny = save(tmp_path / "tiny.nii.gz", rng.uniform(0, 5, (10, 6)).astype(np.float32))
    assert train._native_size([tiny], 4) == [16, 16]  # at least 16, SSIM's window


def test_small_folder_trains_longer_and_regularises_its_prior(tmp_path):
    """--data's epochs, prior shifts and dropout follow the folder's size where not given (train.MIN_STEPS)."""
    def filled(n, *argv):
        args, lines = train.parse_args(["--data", str(tmp_path), *argv]), []
        train._fill_defaults(types.SimpleNamespace(args=args, world=1, log=lines.append), n)
        return args, lines

    for n in (37, 100, 300, 900):
        args, lines = filled(n)
        steps = math.ceil(n / min(32, n // 8))  # an epoch, in the batches a small folder gets
        for epochs in (args.epochs, args.prior_epochs):  # the fewest epochs that make MIN_STEPS steps
            assert epochs * steps >= train.MIN_STEPS > (epochs - 1) * steps and epochs > train.REAL_EPOCHS
        assert (args.prior_shifts, args.prior_dropout) == (4, 0.3) and f"a small folder ({n} training" in lines[0]
    args, lines = filled(5000)  # big enough: the plain defaults, nothing said
    assert (args.epochs, args.prior_epochs, args.prior_shifts, args.prior_dropout) == (30, 30, 1, 0.1) and not lines
    _, lines = filled(100, "--stage", "vqvae")  # the log names only the flags of the stages this run trains
    assert "--epochs" in lines[0] and "prior" not in lines[0].split(":")[1]
    _, lines = filled(100, "--stage", "prior")
    assert "--epochs" not in lines[0] and "--prior_epochs" in lines[0]
    args, lines = filled(1500, "--prior_batch_size", "64")  # 47 steps an epoch, the prior's 24: only the prior short
    assert (args.epochs, args.prior_epochs, args.prior_shifts, args.prior_dropout) == (30, 42, 4, 0.3)
    assert lines == ["a small folder (1500 training slices, 47 steps an epoch): --prior_epochs 42, --prior_shifts 4, "
                     "--prior_dropout 0.3"]
    args, _ = filled(100, "--epochs", "5", "--prior_shifts", "2", "--prior_dropout", "0.05")  # given flags win
    assert (args.epochs, args.prior_shifts, args.prior_dropout) == (5, 2, 0.05) and args.prior_epochs > 30
    args = train.parse_args([])  # the phantom has its own defaults
    train._fill_defaults(types.SimpleNamespace(args=args, world=1, log=print), 48)
    assert (args.epochs, args.prior_epochs, args.prior_shifts, args.prior_dropout) == (15, 14, 1, 0.1)
    # the prior's width: 128 on real data whatever its size, 32 on the phantom, a given flag wins
    assert [filled(n)[0].prior_channels for n in (100, 5000)] == [128, 128] and args.prior_channels == 32
    assert filled(5000, "--prior_channels", "48")[0].prior_channels == 48


@pytest.mark.parametrize("argv, says", [
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--epochs", "-1"], "--epochs"),
    (["--batch_size", "0"], "--batch_size"),
    (["--downsample", "3"], "downsample"),
    (["--lr", "0"], "--lr"),
    (["--resume"], "nothing to resume"),
    (["--stage", "prior"], "needs a trained VQ-VAE"),
    (["--size", "30", "30"], "divisible"),
    (["--data", "/no/such/folder", "--size", "30", "30"], "divisible"),  # before any file is looked for
    (["--data", __file__], "not a folder"),
    (["--data", str(ROOT), "--n_val", "5"], "with --data every slice of the folder is used: drop --n_val"),
    (["--bogus"], "unrecognized"),
    (["--seed", "-1"], "--seed"),
    (["--prior_seed", "-1"], "--prior_seed"),
    (["--device", "gpu"], "expected cpu, cuda"),
    (["--size", "8", "8"], "at least 16"),
    (["--size", "16", "15"], "at least 16 x 16 (SSIM's window is 11), got 16 15"),
    (["--channels", "1"], "channels must be at least 8"),
    (["--levels", "3"], "levels must be 1 or 2"),
    (["--compile", "--device", "cpu"], "--compile is for CUDA"),
    (["--ssim_weight", "-1"], "ssim_weight must be 0 or more"),
    (["--resume", "--overwrite"], "give one"), (["--rate", "inf"], "rate must be finite and >= 0"), (["--beta", "inf"], "beta must be positive and finite"),
    (["--prior_layers", "2"], "blind spot"),  # the prior's flags, before the VQ-VAE trains
    (["--prior_channels", "0"], "prior_channels must be positive"),
    (["--prior_dropout", "0.999"], "prior_dropout must be 0 or in"),  # byte_dropout would divide by 0
    (["--prior_dropout", "inf"], "prior_dropout must be 0 or in"), (["--prior_dropout", "nan"], "prior_dropout"),
    (["--levels", "2", "--prior_dilations", "1", "3"], "gaps"),
    (["--in_channels", "3"], "unrecognized"),  # the loaders give one channel: no flag for more
])
def test_train_usage_errors_exit_2_with_one_line(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "o"), *(TINY[6:] if "--data" in argv else TINY), *argv])  # no counts
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "vqvae.pt").exists()  # said before anything trains


def test_size_16_is_the_smallest_taken():
    assert train.parse_args(["--size", "16", "16"]).size == [16, 16]  # "at least 16 x 16": 16 itself is taken


def test_prior_layers_default_grows_to_reach_a_wide_map_and_a_given_one_does_not():
    # OASIS's 256 x 256 slices make 64 x 64 code maps, which the folder default of 10 layers cannot reach across
    shared = dict(n_codes=32, positional=False, code_dim=0, prior_dropout=0)
    for h, w, two, layers in ((64, 32, False, 10), (64, 64, False, 11), (64, 64, True, 11), (64, 96, False, 17)):
        args, said = train.parse_args(["--data", str(ROOT)]), []
        cfg = train._prior_config(args, h, w, two, said.append, **shared)
        for c in cfg.values() if two else [cfg]:
            assert c.prior_layers == layers == args.prior_layers and c.blind_spot() is None, (h, w)
        assert vq.PriorConfig(height=h, width=w, prior_layers=layers - 1).blind_spot() or layers == 10  # the fewest
        assert said == [f"prior_layers {layers}: the fewest that reach every earlier code of a {h} x {w} code map "
                        f"(10 do not; --prior_layers to choose)"] * (layers > 10)
    args = train.parse_args(["--data", str(ROOT), "--prior_layers", "10"])  # given: kept, and refused
    with pytest.raises(train.UsageError, match="prior_layers 10 with .* use prior_layers 11"):
        train._prior_config(args, 64, 64, False, print, **shared)


def test_one_sample_py_at_a_time_in_a_dest_and_never_in_the_data_folder(tmp_path, capsys, monkeypatch):
    _train(tmp_path / "run", "--prior_epochs", "1", "--realism", "false")
    dest, host = tmp_path / "d", socket.gethostname()
    dest.mkdir()
    (dest / "sample.lock").write_text(f"{host} {os.getppid()}")  # a live sample.py writing there
    with pytest.raises(SystemExit) as e:
        sample.main(["--out", str(tmp_path / "run"), "--n", "2", "--dest", str(dest)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{dest} is in use by another sample.py (pid {os.getppid()} on {host})" in err
    assert not list(dest.glob("sample_*"))  # two runs' samples mixed in one folder before
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (dest / "sample.lock").write_text(f"{host} {dead.pid}")  # a killed one's: taken over, and let go after
    sample.main(["--out", str(tmp_path / "run"), "--n", "2", "--dest", str(dest)])
    assert sorted(p.name for p in dest.iterdir()) == ["grid.png", "sample_000.nii.gz", "sample_001.nii.gz"]
    (tmp_path / "link").symlink_to(tmp_path / "gone" / "x")
    for script, flag in ((lambda a: train.main([*a, *TINY]), "--out"), (lambda a: sample.main(
            ["--out", str(tmp_path / "run"), "--n", "1", *a]), "--dest")):
        with pytest.raises(SystemExit):  # was "File exists"
            script([flag, str(tmp_path / "link")])
        assert f"a link to {tmp_path / 'gone' / 'x'}, which is missing" in capsys.readouterr().err
    ckpt = {"data": {"source": str(tmp_path / "data"), "phantom": None}}  # a model of a folder: not into its slices
    save(tmp_path / "data" / "keras_slices_test" / "case_1_slice_0.nii.gz", np.ones((16, 16), np.float32))
    for inside in (tmp_path / "data", tmp_path / "data" / "keras_slices_test"):
        with pytest.raises(sample.UsageError, match="holds slices of the model's data folder .* would be read as"):
            sample._make_dest(inside, ckpt)
    sample._make_dest(tmp_path / "data" / "out" / "samples", ckpt)  # an OUT there (--data .) is no split,
    save(tmp_path / "data" / "out" / "samples" / "sample_000.nii.gz", np.ones((16, 16), np.float32))
    sample._make_dest(tmp_path / "data" / "out" / "samples", ckpt)  # nor is it once it holds a run's samples
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["keras_slices_test", "out"]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~ given where no shell expands it: --out=~/run
    assert sample.parse_args(["--out=~/r", "--dest=~/d", "--reconstruct", "~/a"]).reconstruct == [
        str(tmp_path / "home" / "a")]
    assert train.parse_args(["--data=~/x", "--out=~/o"]).out == str(tmp_path / "home" / "o")
    monkeypatch.setenv("VQ_CACHE_DIR", "~/cache")  # set in a job script
    assert vq._cache_file([tmp_path / "x.nii"], (8, 8), None).parent == tmp_path / "home" / "cache"


def test_one_train_py_at_a_time_in_an_out_folder(tmp_path, capsys, monkeypatch):
    out, lock = tmp_path / "run", tmp_path / "run" / "train.lock"
    out.mkdir()
    seen = []  # the lock while the run reads its slices
    load = train.load_data
    monkeypatch.setattr(train, "load_data", lambda run, files: (seen.append(lock.read_text()), load(run, files))[1])
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for held, refused in ((f"{host} {os.getppid()}", True), ("elsewhere 1", True),  # live here, or another machine's
                          (f"{host} {dead.pid}", False), (f"{host} {os.getpid()}", False)):  # killed: taken over
        lock.write_text(held)
        if refused:
            with pytest.raises(SystemExit) as e:
                train.main(["--out", str(out), *TINY, "--stage", "vqvae", "--epochs", "1", "--overwrite"])
            err = capsys.readouterr().err
            assert e.value.code == 2 and "in use by another train.py" in err and str(lock) in err, err
            assert lock.read_text() == held and not (out / "vqvae.pt").exists()  # its lock stays, nothing trained
        else:
            train.main(["--out", str(out), *TINY, "--stage", "vqvae", "--epochs", "1", "--overwrite"])
            assert seen[-1] == f"{host} {os.getpid()}" and not lock.exists()  # held while it ran, then let go
    assert len(seen) == 2
    monkeypatch.setattr(train, "load_data", lambda *a: pytest.fail("read the slices before finding --out unwritable"))
    if os.path.isdir("/proc"):  # a folder no file can be created in
        with pytest.raises(SystemExit) as e:
            train.main(["--out", "/proc", *TINY])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "cannot write in --out /proc" in err and "--resume" not in err
    monkeypatch.chdir(tmp_path / "run")  # an empty --out (an unset variable) would fill the current folder
    before = sorted(os.listdir())
    with pytest.raises(SystemExit) as e:
        train.main(["--out", "", *TINY])
    assert e.value.code == 2 and "--out must name a folder" in capsys.readouterr().err
    assert sorted(os.listdir()) == before


def test_out_of_memory_is_one_line_and_other_errors_stay_tracebacks(tmp_path, capsys, monkeypatch):
    cuda = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 79 GiB in all")
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)")
    for error in (cuda, cpu, MemoryError("Unable to allocate 75. GiB for an array")):
        for script, where, argv in ((train, "train_vqvae", ["--out", str(tmp_path / "o"), *TINY]),
                                    (sample, "generate", ["--out", str(tmp_path / "o")])):
            monkeypatch.setattr(script, where, lambda *a, error=error: (_ for _ in ()).throw(error))
            with pytest.raises(SystemExit) as e:
                script.main(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2 and err.startswith("error: out of memory (") and len(err.splitlines()) == 1
            assert ("--batch_size" if script is train else "a smaller --n") in err
    monkeypatch.setattr(train, "train_vqvae", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not ours to hide
        train.main(["--out", str(tmp_path / "o2"), *TINY])


def test_sample_usage_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    cases = [([], "no checkpoint"), (["--n", "0"], "--n"), (["--temperature", "0"], "temperature"),
             (["--device", "gpu"], "expected cpu, cuda"), (["--seed", str(2**70)], "--seed"),
             (["--dest", str(tmp_path / "a_file")], "is a file"),
             (["--evaluate", "--reconstruct", "x.nii"], "separate modes"), (["--repeats", "0"], "--repeats"),
             (["--reconstruct", "x.nii", "--n", "4", "--position", "0.3"], "--n and --position do nothing with --recon"),
             (["--surprise", "x.nii", "--position", "0.3"], "--position does nothing with --surprise"),
             (["--reconstruct", "x.nii", "--seed", "3"], "--seed does nothing with --reconstruct"),
             (["--evaluate", "--n", "8"], "--n does nothing"), (["--repeats", "2"], "nothing with sampling"),
             (["--evaluate", "--dest", "x"], "--dest does nothing with --evaluate"),
             (["--bench", "--dest", "x"], "--dest does nothing with --bench")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device"))
    for argv, says in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(["--out", str(tmp_path), *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err
    (tmp_path / "vqvae.pt").write_bytes(b"a first stage stopped by Ctrl-C")
    with pytest.raises(SystemExit):
        sample.main(["--out", str(tmp_path)])
    assert f"stopped: python train.py --resume --out {tmp_path}, with the flags it began with, finishes it" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--out", str(tmp_path), "--stage", "prior", *TINY])
    assert "stopped: --resume --stage vqvae finishes it" in capsys.readouterr().err
    _train(tmp_path, "--stage", "vqvae", "--overwrite")
    with pytest.raises(SystemExit):
        sample.main(["--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "has no prior" in err
    # the line it gives trains the prior of this VQ-VAE (its --out and data flags), quickly with TINY's prior flags
    told = shlex.split(err.split("`")[1])
    assert told[:4] == ["python", "train.py", "--stage", "prior"]
    train.main([*told[2:], "--prior_epochs", "1", "--realism", "false", "--batch_size", "8", "--prior_channels", "16",
                "--prior_layers", "3", "--prior_dilations", "1", "2", "4"])
    assert "prior" in vq.load_checkpoint(tmp_path / "model.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # the checkpoint for the folder: said, not 'no checkpoint at .../model.pt/model.pt'
        sample.main(["--out", str(tmp_path / "model.pt"), "--n", "1"])
    assert e.value.code == 2 and f"give the folder train.py wrote (--out {tmp_path})" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # any other file: no folder to suggest
        sample.main(["--out", str(tmp_path / "summary.json"), "--n", "1"])
    assert capsys.readouterr().err.strip().endswith("is a file: give the folder train.py wrote")
    with pytest.raises(SystemExit) as e:  # a folder that cannot be made: one line, not a traceback
        sample.main(["--out", str(tmp_path), "--n", "1", "--dest", str(tmp_path / "a_file" / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot create" in err and len(err.strip().splitlines()) == 1

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(vq, "sample_slices", ctrl_c)  # Ctrl-C while drawing: one line and 130, as train.py
    with pytest.raises(SystemExit) as e:
        sample.main(["--out", str(tmp_path), "--n", "1"])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_train_help_shows_the_defaults_of_the_data_given(capsys):
    for argv, shown in (([], train.PHANTOM_DEFAULTS), (["--data", "anywhere"], train.REAL_DEFAULTS)):
        with pytest.raises(SystemExit):
            train.parse_args([*argv, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse's wrapping undone
        assert f"prior_channels (default {shown['prior_channels']})" in text
        assert ("the phantom's; a folder's differ" in text) == (not argv)


def test_train_out_that_cannot_be_a_folder(tmp_path, capsys):
    (tmp_path / "a_file").write_text("kept")
    for out, says in ((tmp_path / "a_file", "it is a file, not a folder"), (tmp_path / "a_file" / "o", "cannot create")):
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(out), *TINY])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "a_file").read_text() == "kept"


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    _train(tmp_path, "--stage", "vqvae")
    before = (tmp_path / "vqvae.pt").read_bytes()
    with pytest.raises(SystemExit):
        _train(tmp_path, "--stage", "vqvae")
    assert "--resume" in capsys.readouterr().err
    assert (tmp_path / "vqvae.pt").read_bytes() == before
    _train(tmp_path, "--stage", "prior")  # model.pt's VQ-VAE has no prior yet: nothing to lose
    model = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "vqvae.pt").unlink()  # --resume would train the VQ-VAE afresh over model.pt's
    with pytest.raises(SystemExit):
        _train(tmp_path, "--resume")
    assert "vqvae.pt is gone" in capsys.readouterr().err and (tmp_path / "model.pt").read_bytes() == model
    (tmp_path / "prior.pt").unlink()  # the training state deleted
    for stage in ("all", "vqvae", "prior"):  # model.pt is still a finished model
        with pytest.raises(SystemExit):
            _train(tmp_path, "--stage", stage)
        err = capsys.readouterr().err
        assert "model.pt holds a trained" in err and "--overwrite" in err, err
        assert (tmp_path / "model.pt").read_bytes() == model


def test_the_largest_seeds_accepted_train(tmp_path):
    top = str(2**63 - 1)  # the flags' bound; the seeds derived from it must stay within torch's
    _train(tmp_path, "--epochs", "1", "--prior_epochs", "1", "--seed", top, "--prior_seed", top, "--realism", "false")
    assert json.loads((tmp_path / "summary.json").read_text())["prior_seed"] == 2**63 - 1


def test_a_resumed_prior_leaves_no_figure_of_the_prior_before_it_in_the_summary(tmp_path):
    _train(tmp_path, "--realism", "false")
    path = tmp_path / "summary.json"
    s = json.loads(path.read_text())
    path.write_text(json.dumps({**s, "judge_excess_bits_samples": 7.5, "lesion_surprise_auroc": 0.25}))  # reports
    _train(tmp_path, "--resume", "--realism", "false")  # done already: the same prior, its figures stay
    assert json.loads(path.read_text())["lesion_surprise_auroc"] == 0.25
    _train(tmp_path, "--resume", "--prior_epochs", "3", "--realism", "false")  # trained on: another prior
    s = json.loads(path.read_text())
    assert not any(k.startswith(("judge_", "lesion_")) for k in s)
    assert s["prior_fingerprint"] == torch.load(tmp_path / "model.pt", weights_only=True)["prior_fingerprint"]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, capsys):
    _train(tmp_path, "--stage", "vqvae")
    before = (tmp_path / "vqvae.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--stage", "vqvae", "--overwrite", "--epochs", "4", "--lr", "1e30")
    assert e.value.code == 2 and "at step" in capsys.readouterr().err
    assert (tmp_path / "vqvae.pt").read_bytes() == before


def test_minutes_budget_saves_mid_epoch_and_resume_finishes(tmp_path, capsys):
    _train(tmp_path, "--stage", "vqvae", "--minutes", "0.0001")
    assert "budget" in capsys.readouterr().out
    state = torch.load(tmp_path / "vqvae.pt", weights_only=True)["trainer"]
    assert (state["epoch"], state["batch"]) == (0, 1)  # stopped after one step, mid-epoch, and saved
    assert "test_ssim_mean" in json.loads((tmp_path / "summary.json").read_text())  # evaluated all the same
    _train(tmp_path, "--stage", "vqvae", "--resume")
    state = torch.load(tmp_path / "vqvae.pt", weights_only=True)["trainer"]
    assert (state["epoch"], state["batch"], state["step"]) == (2, 0, 12)  # 48 / 8 = 6 steps per epoch
    _train(tmp_path / "whole", "--stage", "vqvae")  # the epoch cut in two has the uninterrupted run's train figures
    cut, whole = ([{k: v for k, v in json.loads(r).items() if k.startswith("train_")}
                   for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (tmp_path, tmp_path / "whole"))
    assert cut == whole and len(cut) == 2 and len(cut[0]) >= 3


def test_two_stage_commands_keep_summary_and_model_in_agreement(tmp_path, capsys):
    _train(tmp_path, "--stage", "vqvae")
    for flag, said in ((["--levels", "2"], "--levels 1, not --levels 2"), (["--n_codes", "64"], "--n_codes 32, not")):
        with pytest.raises(SystemExit) as e:  # the VQ-VAE is model.pt's: not silently a one-level prior of 32 codes
            _train(tmp_path, "--stage", "prior", *flag)
        assert e.value.code == 2 and f"VQ-VAE in {tmp_path / 'model.pt'}, which has {said}" in capsys.readouterr().err
    ckpt = vq.load_checkpoint(tmp_path / "model.pt")
    vq.save_checkpoint({**ckpt, "vqvae_config": {**ckpt["vqvae_config"], "downsample": 2}}, tmp_path / "odd.pt")
    (tmp_path / "model.pt").rename(tmp_path / "good.pt")
    (tmp_path / "odd.pt").rename(tmp_path / "model.pt")
    with pytest.raises(SystemExit) as e:  # a VQ-VAE this vq.py refuses: one line, not a ValueError traceback
        _train(tmp_path, "--stage", "prior")
    assert e.value.code == 2 and "downsample" in capsys.readouterr().err
    (tmp_path / "good.pt").replace(tmp_path / "model.pt")
    _train(tmp_path, "--stage", "prior")  # no --resume: the VQ-VAE's figures must survive; its flags given alike
    s = json.loads((tmp_path / "summary.json").read_text())
    assert "test_ssim_mean" in s and "prior_bits_per_code" in s
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "prior" in ckpt and s["vqvae_fingerprint"] == ckpt["vqvae_fingerprint"]
    assert [json.loads(r)["stage"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        ["vqvae"] * 2 + ["prior"] * 2
    _train(tmp_path, "--stage", "vqvae", "--overwrite")  # the same VQ-VAE again (a CPU repeats it): its prior stays
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert "prior" in ckpt and ckpt["vqvae_fingerprint"] == s["vqvae_fingerprint"]  # and the prior's lines with it
    assert (tmp_path / "samples.png").exists() and (tmp_path / "positions.png").exists()  # and its pictures
    assert sorted(json.loads(r)["stage"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()) == \
        ["prior"] * 2 + ["vqvae"] * 2
    assert "is dropped" not in capsys.readouterr().out
    _train(tmp_path, "--stage", "vqvae", "--overwrite", "--seed", "1")  # a new VQ-VAE: model.pt has no prior
    assert "model.pt: its prior learnt the codes of the VQ-VAE before this one, and is dropped" in \
        capsys.readouterr().out  # said
    s = json.loads((tmp_path / "summary.json").read_text())
    assert "prior" not in torch.load(tmp_path / "model.pt", weights_only=True)
    assert "test_ssim_mean" in s and not any("prior" in k or "two_sample" in k for k in s)
    assert not (tmp_path / "samples.png").exists() and not (tmp_path / "positions.png").exists()  # the old prior's
    assert [json.loads(r)["stage"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == ["vqvae"] * 2
    # prior.pt belongs to the old VQ-VAE: --stage prior trains afresh, with no --resume asked for
    capsys.readouterr()
    _train(tmp_path, "--stage", "prior", "--seed", "1")  # the new VQ-VAE's data (another seed is refused)
    assert "belongs to another VQ-VAE" in capsys.readouterr().out
    prior = torch.load(tmp_path / "prior.pt", weights_only=True)
    assert prior["vqvae_fingerprint"] == json.loads((tmp_path / "summary.json").read_text())["vqvae_fingerprint"]
    assert prior["trainer"]["step"] == 12  # 2 epochs of 6 steps (batches of 8), from scratch


def test_prior_restarts_when_its_vqvae_trained_on(tmp_path, capsys):
    # A budget stops the VQ-VAE early; --resume trains it further, so its codes change: the
    # prior trained on the old codes must not be resumed, nor compete as the best.
    _train(tmp_path, "--minutes", "0.0001")
    capsys.readouterr()
    _train(tmp_path, "--resume")
    assert "belongs to another VQ-VAE" in capsys.readouterr().out
    prior = torch.load(tmp_path / "prior.pt", weights_only=True)
    assert prior["trainer"]["step"] == 12 and prior["trainer"]["epoch"] == 2
    assert prior["vqvae_fingerprint"] == torch.load(tmp_path / "model.pt", weights_only=True)["vqvae_fingerprint"]
    # a changed prior configuration is refused in one line, not a shape-mismatch traceback
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--resume", "--prior_epochs", "3", "--prior_dilations", "1", "2", "4", "8")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "other prior flags" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # the tie is named by its flag
        _train(tmp_path, "--resume", "--prior_epochs", "3", "--prior_tied", "false")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--prior_tied True (now False)" in err
    with pytest.raises(SystemExit) as e2:  # the VQ-VAE's own code_dim is named as itself, not as the prior's tie
        _train(tmp_path, "--resume", "--epochs", "3", "--code_dim", "16")
    assert e2.value.code == 2 and "flags: --code_dim 8 (now 16);" in capsys.readouterr().err
    # the way out it names trains a new prior of the same VQ-VAE (a plain --overwrite would retrain the VQ-VAE too)
    assert "--stage prior --overwrite" in err and "--overwrite" not in err.replace("--stage prior --overwrite", "")
    vqvae = (tmp_path / "vqvae.pt").read_bytes()
    _train(tmp_path, "--stage", "prior", "--overwrite", "--prior_epochs", "1", "--prior_tied", "false")
    assert (tmp_path / "vqvae.pt").read_bytes() == vqvae
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert model["vqvae_fingerprint"] == prior["vqvae_fingerprint"] and model["prior_config"]["code_dim"] == 0


def test_lr_schedule_warms_up_then_falls_along_a_cosine_to_a_tenth():
    lr, total, warm = 3e-3, 400, 20  # warm-up: a twentieth of the steps, at most 100
    got = [train._lr_at(s, total, lr) for s in range(total + 50)]
    assert got[:warm] == pytest.approx([lr * (s + 1) / warm for s in range(warm)])  # linear, up to lr
    assert got[warm] == pytest.approx(lr) and got[warm + 190] == pytest.approx(0.55 * lr)  # half way: 0.1 + 0.9 / 2
    assert all(b < a for a, b in zip(got[warm:total], got[warm + 1:total + 1]))  # falling
    assert got[total:] == pytest.approx([0.1 * lr] * 50)  # then flat, for a resumed run's extra epochs


def test_resume_refuses_other_data_and_keeps_the_schedule(tmp_path, capsys):
    _train(tmp_path, "--stage", "vqvae")
    for flags, says in ((["--size", "32", "16"], "--size"), (["--n_train", "56"], "--data"),
                        (["--seed", "1"], "--data")):
        with pytest.raises(SystemExit) as e:
            _train(tmp_path, "--stage", "vqvae", "--resume", "--epochs", "3", *flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1
    _train(tmp_path, "--stage", "vqvae", "--resume", "--epochs", "4")
    lrs = [json.loads(r)["lr"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lrs) == 4 and lrs[2] <= lrs[1] + 1e-12 and lrs[3] <= lrs[2] + 1e-12  # no jump back up
    state = torch.load(tmp_path / "vqvae.pt", weights_only=True)  # as another version of vq.py wrote it
    state["vqvae_config"]["dead_threshold"] = 1.0  # a value this version refuses
    torch.save(state, tmp_path / "vqvae.pt")
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--stage", "vqvae", "--resume", "--epochs", "5")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "written by another version of vq.py (dead_threshold" in err and \
        len(err.strip().splitlines()) == 1, err


def test_resume_refuses_other_learning_rates_shifts_or_averages(tmp_path, capsys):
    _train(tmp_path, "--epochs", "1", "--prior_epochs", "1", "--realism", "false")
    state = (tmp_path / "prior.pt").read_bytes()
    shutil.copy(tmp_path / "model.pt", tmp_path / "prior.pt")  # a finished model where the training state was
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--stage", "prior", "--resume")
    assert e.value.code == 2 and "is not a prior training state" in capsys.readouterr().err
    (tmp_path / "prior.pt").write_bytes(state)
    for argv in (["--lr", "1e-4"], ["--prior_lr", "1e-4"], ["--prior_shifts", "2"], ["--prior_ema", "0.5"]):
        with pytest.raises(SystemExit) as e:  # a resume would go on other than the run it continues
            _train(tmp_path, "--stage", "vqvae" if argv[0] == "--lr" else "prior", "--resume", *argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"was trained with {argv[0]} " in err and len(err.splitlines()) == 1, err


def test_small_folders_get_small_batches(tmp_path, capsys):
    i = TINY.index("--batch_size")
    flags = TINY[:i] + TINY[i + 2:]
    train.main(["--out", str(tmp_path), "--stage", "vqvae", "--epochs", "1", *flags])  # 48 slices: 6 a batch
    assert "vqvae: batches of 6, 8 steps an epoch" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # resumed with another batch size: the epoch would be cut differently
        train.main(["--out", str(tmp_path), "--stage", "vqvae", "--epochs", "2", "--resume", *TINY])
    assert e.value.code == 2 and "batch size 6" in capsys.readouterr().err


def test_a_given_zero_is_kept_on_a_small_folder(tmp_path):
    """--prior_dropout 0 and --epochs 0 are given, not left out: a small folder's defaults fill only the others."""
    args = train.parse_args(["--data", str(tmp_path), "--prior_dropout", "0", "--epochs", "0"])
    train._fill_defaults(types.SimpleNamespace(args=args, world=1, log=print), 100)
    assert (args.prior_dropout, args.epochs) == (0, 0)
    assert args.prior_shifts == 4 and args.prior_epochs > train.REAL_EPOCHS  # the flags not given: filled


def test_default_batch_sizes_are_those_help_gives(tmp_path):
    for argv, n, size in (([], 2000, 16), (["--data", str(tmp_path)], 5000, 32),  # "default 32 (phantom 16)"
                          (["--data", str(tmp_path)], 100, 100 // 8)):  # a small folder: 8 steps an epoch
        args = train.parse_args(argv)
        assert train._batch_size(types.SimpleNamespace(args=args, world=1), n, args.batch_size) == size


def test_summary_records_the_epochs_and_slices_a_stopped_run_trained_on(tmp_path):
    _train(tmp_path, "--minutes", "0.0001", "--n_val", "8", "--realism", "false")  # each stage: one step, in epoch 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (s["n_train"], s["n_val"], s["n_test"]) == (48, 8, 16)  # TINY's, --n_val 8 given last
    records = train._read_json_lines(tmp_path / "metrics.jsonl")
    for stage in ("vqvae", "prior"):
        done = torch.load(tmp_path / f"{stage}.pt", weights_only=True)["trainer"]["epoch"]
        assert s[f"epochs_{stage}"] == done == len([r for r in records if r["stage"] == stage]) == 0


def test_a_new_prior_replaces_the_old_priors_metrics(tmp_path):
    _train(tmp_path, "--realism", "false")  # two epochs of each stage
    _train(tmp_path, "--stage", "prior", "--overwrite", "--prior_epochs", "1", "--prior_seed", "7",
           "--realism", "false")
    records = train._read_json_lines(tmp_path / "metrics.jsonl")
    assert [(r["stage"], r["epoch"]) for r in records] == [("vqvae", 1), ("vqvae", 2), ("prior", 1)]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["epochs_prior"] == 1 and s["prior_val_bits_best"] == records[-1]["val_bits"]


def test_a_run_stopped_in_its_vqvae_stage_resumes_as_it_says(tmp_path, capsys, monkeypatch):
    lr_at, sent = train._lr_at, []

    def preempted(step, total, lr):  # SIGTERM during the VQ-VAE's step 5: no prior.pt yet
        if step == 5 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return lr_at(step, total, lr)

    monkeypatch.setattr(train, "_lr_at", preempted)
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--realism", "false")
    assert e.value.code == 130 and "add --resume to continue" in capsys.readouterr().err
    assert (tmp_path / "vqvae.pt").exists() and not (tmp_path / "prior.pt").exists()
    monkeypatch.setattr(train, "_lr_at", lr_at)
    _train(tmp_path, "--resume", "--realism", "false")  # what it said: both stages finish
    assert torch.load(tmp_path / "vqvae.pt", weights_only=True)["trainer"]["step"] == 12
    assert torch.load(tmp_path / "prior.pt", weights_only=True)["trainer"]["step"] == 12


def test_budget_spent_on_an_epochs_last_batch_stops_there(tmp_path, monkeypatch):
    # out of time right after the last step of epoch 1: that epoch is validated, nothing more runs
    monkeypatch.setattr(train.Trainer, "_stop", lambda self, elapsed, done: "budget" if done == self.steps_per_epoch
                        else None)
    _train(tmp_path, "--stage", "vqvae", "--epochs", "3", "--minutes", "5")
    state = torch.load(tmp_path / "vqvae.pt", weights_only=True)["trainer"]
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 6)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_full_disk_stops_train_and_sample_in_one_line_and_resume_goes_on(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, "--stage", "vqvae", "--epochs", "1")
    slice_path = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(vq.phantom_slices(1, (32, 32), seed=5)[0, 0].numpy(), np.eye(4)), slice_path)
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as m:
        _fill_disk(m)
        for run in (lambda: _train(out, "--stage", "vqvae", "--epochs", "2", "--resume"),
                    lambda: sample.main(["--out", str(out), "--reconstruct", str(slice_path)])):
            with pytest.raises(SystemExit) as e:
                run()
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2 and len(err) == 1 and "No space left on device" in err[0], err
            assert f"{out}{os.sep}" in err[0]  # names the file
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == written  # whole, none half-written
    assert not list(out.glob("reconstructions/*"))
    _train(out, "--stage", "vqvae", "--epochs", "2", "--resume")  # room again: on from the last checkpoint
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def _script(*args):
    return [sys.executable, str(ROOT / "train.py"), *args]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    args = ["--stage", "vqvae", "--epochs", "3", *TINY, "--n_train", "400", "--seed", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(_script("--out", str(tmp_path / "a"), *args), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_script("--out", str(tmp_path / "b"), *args), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill a few steps into the second epoch
        if line.startswith("vqvae ep 2/3 step"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = subprocess.run(_script("--out", str(tmp_path / "b"), *args, "--resume"), env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed at epoch 1" in done.stdout
    a = torch.load(tmp_path / "a" / "vqvae.pt", weights_only=True)["trainer"]["model"]
    b = torch.load(tmp_path / "b" / "vqvae.pt", weights_only=True)["trainer"]["model"]
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def _torchrun(tmp_path, out, *args, clock=1.0, signal_at=None, timeout=300):
    """train.main in two gloo processes; rank 1's clock runs `clock` times as fast (and it alone gets
    SIGTERM as step signal_at starts); each rank saves its codebook and a draw from its random stream."""
    script = tmp_path / "ddp_run.py"
    script.write_text(
        "import os, signal, sys, time, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import train\n"
        "if os.environ['RANK'] == '1':\n"
        f"    real = time.time; t0 = real(); time.time = lambda: t0 + (real() - t0) * {clock}\n"
        "    lr_at, sent = train._lr_at, []\n"
        "    def preempted(step, total, lr):\n"
        f"        if step == {signal_at} and not sent: sent.append(os.kill(os.getpid(), signal.SIGTERM))\n"
        "        return lr_at(step, total, lr)\n"
        "    train._lr_at = preempted\n"
        "out = sys.argv[1]\n"
        "r = train.main(sys.argv[2:])\n"
        "rank = os.environ['RANK']\n"
        "torch.save(r['vqvae'].quantizer.codebook, os.path.join(out, 'codebook%s.pt' % rank))\n"
        "torch.save(torch.rand(4), os.path.join(out, 'draw%s.pt' % rank))\n")
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(out), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_ddp_two_cpu_processes_keep_identical_codebooks(tmp_path, capsys):
    out = tmp_path / "o"
    done = _torchrun(tmp_path, out, "--overwrite", "--stage", "vqvae", "--epochs", "1", *TINY)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    c0, c1 = torch.load(out / "codebook0.pt", weights_only=True), torch.load(out / "codebook1.pt", weights_only=True)
    assert torch.equal(c0, c1)
    fresh = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32)).quantizer.codebook
    assert not torch.allclose(c0, fresh)  # it did train
    assert json.loads((out / "summary.json").read_text())["device"] == "cpu x2"
    # each rank has its own random stream (dropout masks, restarts), saved for each rank
    assert not torch.equal(torch.load(out / "draw0.pt"), torch.load(out / "draw1.pt"))
    states = torch.load(out / "vqvae.pt", weights_only=True)["trainer"]["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["cpu"], states[1]["cpu"])
    # resuming needs the same number of processes: another one would shard the epoch differently
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(out), "--stage", "vqvae", "--epochs", "2", "--resume", *TINY])
    assert e.value.code == 2 and "2 process(es)" in capsys.readouterr().err


def test_ddp_minutes_budget_is_one_decision(tmp_path):
    # Rank 1's clock runs 30 times as fast: alone it would stop after a second, while rank 0 waits in the
    # quantizer's all-reduce for a step that never comes (a hang, or mismatched collectives). Far more
    # epochs than the 30 s budget can run, so the budget ends the stage: rank 1's, as rank 0 reports it.
    out = tmp_path / "o"
    done = _torchrun(tmp_path, out, "--epochs", "2000", "--prior_epochs", "1", "--minutes", "0.5", *TINY,
                     clock=30.0, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("--minutes budget of 0.5 reached") == 1  # rank 0's log: one decision
    state = torch.load(out / "vqvae.pt", weights_only=True)["trainer"]
    assert state["step"] % train.SYNC_EVERY == 0 and state["epoch"] < 2000
    assert state["seconds"] < 20  # on rank 0's clock: it stopped at rank 1's word, not at its own budget
    assert torch.equal(torch.load(out / "codebook0.pt"), torch.load(out / "codebook1.pt"))


def test_ddp_signal_to_one_rank_stops_both_at_one_step(tmp_path):
    # SIGTERM reaches rank 1 only, at step 5: both ranks stop together at the next shared check, save once, exit 130
    out = tmp_path / "o"
    done = _torchrun(tmp_path, out, "--stage", "vqvae", "--epochs", "20", "--minutes", "30", *TINY, signal_at=5)
    assert done.returncode != 0 and "train.py\", line" not in done.stderr  # torchrun's report is the only traceback
    assert done.stderr.count("stopped by SIGTERM at step 16") == 1  # rank 1
    assert done.stderr.count("stopped by a signal to another process at step 16") == 1  # rank 0
    assert "--minutes budget" not in done.stdout  # the signal outranks the budget, and the budget was not spent
    assert torch.load(out / "vqvae.pt", weights_only=True)["trainer"]["step"] == train.SYNC_EVERY


def test_fewer_training_slices_than_processes(tmp_path):
    done = _torchrun(tmp_path, tmp_path / "o", "--stage", "vqvae", "--epochs", "1", *TINY, "--n_train", "1")
    assert done.returncode != 0
    # one line from each process; the only traceback is torchrun's own report of a failed child
    assert done.stderr.count("error: vqvae: 1 training slice(s) cannot be shared by 2 processes") == 2
    assert "train.py\", line" not in done.stderr


def test_teacher_forced_against_its_definition():
    # one pass over the true codes: the argmax redraw is the prior's argmax at every code, so its share
    # and SSIM follow from one forward; the sampled redraw keeps a code with the prior's probability of it
    torch.manual_seed(0)
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=7))
    x = vq.phantom_slices(64, (24, 20), seed=5)
    model(x)  # a training step seeds the codebook by k-means: codes that vary
    # a decoder whose images differ visibly from code to code, so the SSIMs are not all 1
    model.decoder = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(8, 1, 3, padding=1), nn.Sigmoid())
    nn.init.normal_(model.decoder[1].weight, std=0.2 / model.quantizer.codebook.std().item())  # logits of sd ~1.7
    nn.init.zeros_(model.decoder[1].bias)
    model.eval()
    codes = model.encode(x)  # (64, 6, 5)
    prior = small_prior(seed=3, **RICH).train()
    pos, opt = _position(prior, 64), torch.optim.Adam(prior.parameters(), 1e-2)
    for _ in range(15):  # a prior that has begun to learn these codes: it keeps most, not all
        opt.zero_grad()
        prior.loss(codes, pos)[0].backward()
        opt.step()
    prior.eval()
    with torch.no_grad():
        logits = prior(codes, pos)
    best, recon = logits.argmax(1), model.decode(codes)
    kept = logits.softmax(1).gather(1, codes[:, None]).double().mean().item()  # the sampled redraw's expected share
    assert 0.02 < (best != codes).double().mean() < 1 - kept - 0.05  # argmax and sampling told apart
    got = vq.teacher_forced(model, prior, x, pos, torch.Generator().manual_seed(0))
    assert got["changed_argmax"] == pytest.approx((best != codes).double().mean().item())
    assert got["ssim_argmax"] == pytest.approx(vq.ssim(recon, model.decode(best)).mean().item(), abs=1e-6)
    assert got["ssim_argmax"] < 0.999 and got["ssim"] < 0.999
    assert abs(got["changed"] - (1 - kept)) < 0.025  # 1920 codes: about 3 standard errors
    assert got != vq.teacher_forced(model, prior, x, pos, torch.Generator().manual_seed(1))


def test_realism_report_sanity():
    a, b = vq.phantom_slices(80, (64, 32), seed=11), vq.phantom_slices(80, (64, 32), seed=12)
    blur = lambda t: F.interpolate(F.avg_pool2d(t, 2), scale_factor=2, mode="bilinear")  # noqa: E731 (a smooth decoder)
    same, same_parts = sample.two_sample_score(a[:40], b[:40], a[40:], b[40:], steps=300)
    apart, apart_parts = sample.two_sample_score(a[:40], blur(b[:40]), a[40:], blur(b[40:]), steps=300)
    assert abs(same - 0.5) < 0.12 and apart > 0.9, (same, apart)
    assert len(same_parts) == 2 and same == pytest.approx(sum(same_parts) / 2) and min(apart_parts) > 0.8
    # scored only on slices it never trained on: blurred fakes to fit, sharp ones to score, and it is fooled
    fooled, fooled_parts = sample.two_sample_score(a[:40], blur(b[:40]), a[40:], b[40:], steps=300)
    assert fooled < 0.75 and fooled_parts[1] < 0.5, (fooled, fooled_parts)
    # a copy of a training slice is as near as can be; real held-out slices are not
    assert torch.allclose(sample.nearest_ssim(b[:4], torch.cat([a, b[:4]])), torch.ones(4))
    assert sample.nearest_ssim(b[:4], a).max() < 0.99
    assert sample.pair_ssim(a[:1].repeat(6, 1, 1, 1)) == pytest.approx(1.0) and sample.pair_ssim(a) < 0.8
    assert sample.pair_ssim(a[:2]) == pytest.approx(vq.ssim(a[:1], a[1:2]).item())  # never a slice with itself
    # the critics mirror left and right (flip_dim), which anatomy allows; upside-down fakes stay told apart
    upside, _ = sample.two_sample_score(a[:40], b[:40].flip(-1), a[40:], b[40:].flip(-1), steps=100, flip_dim=-2)
    assert upside > 0.9, upside



def test_unigram_baseline_is_the_test_codes_under_the_training_frequencies():
    g = torch.Generator().manual_seed(0)
    train_c, test_c = torch.randint(0, 5, (6, 3, 4), generator=g), torch.randint(0, 7, (4, 3, 4), generator=g)
    counts = np.bincount(train_c.flatten().numpy(), minlength=7) + 1  # codes 5, 6 unseen in training: finite
    want = -np.mean([math.log2(counts[c] / counts.sum()) for c in test_c.flatten().tolist()])
    assert train._unigram_bits(train_c, test_c, 7) == pytest.approx(want)
    top = (torch.randint(0, 7, (6, 1, 2), generator=g), torch.randint(0, 7, (4, 1, 2), generator=g))
    both = train._unigram_bits((top[0], train_c), (top[1], test_c), 7)  # each level under its own frequencies
    top_bits = train._unigram_bits(top[0], top[1], 7)
    assert both == pytest.approx((top_bits * 8 + want * 48) / 56)


def test_the_critics_learn_from_training_slices_spread_over_every_case(monkeypatch):
    # training slices come sorted by case: the first FIT would be a few patients' (HipMRI: 11,460 slices)
    monkeypatch.setattr(sample, "FIT", 10)
    fits = []
    flips = []
    monkeypatch.setattr(sample, "two_sample_score",
                        lambda fit, *a, **k: (fits.append(fit), flips.append(k["flip_dim"]), (0.5, (0.5, 0.5)))[2])
    vqvae = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=7)).eval()
    prior = vq.PixelCNN(PriorConfig(**{**SMALL, "height": 8, "width": 8, "prior_layers": 6})).eval()
    train_x, test_x = torch.rand(46, 1, 32, 32, generator=torch.Generator().manual_seed(1)).split([37, 9])
    report = sample.realism_report(vqvae, prior, test_x, train_x, log=lambda line: None)
    recon = vqvae.reconstruct(test_x)
    near = [vq.ssim(r.expand_as(train_x), train_x).max().item() for r in recon]  # all 37
    assert report["nearest_train_ssim_recon"] == pytest.approx(float(np.median(near)), abs=1e-6)  # decoded, as samples
    c = lambda t: t[..., 8:24, 8:24]  # noqa: E731 (the central half of each side of 32 x 32)
    near = [vq.ssim(c(r).expand_as(c(train_x)), c(train_x)).max().item() for r in recon]
    assert report["nearest_train_ssim_centre_recon"] == pytest.approx(float(np.median(near)), abs=1e-6)
    rows = [next(i for i in range(37) if torch.equal(train_x[i], f)) for f in fits[0]]  # the floor's critic
    assert len(rows) == 10 and rows[0] == 0 and rows[-1] == 36 and np.diff(rows).min() >= 3, rows
    near = iter([torch.tensor([0.3, 0.6, 0.8, 0.96]), torch.tensor([0.2, 0.5, 0.7, 0.95]), torch.rand(4)])
    monkeypatch.setattr(sample, "nearest_ssim", lambda x, pool: next(near) if x.shape[-1] == 32  # samples', recons',
                        else x.mean((1, 2, 3)))  # real; a centre (16 wide): its mean, to tell whose it is
    report = sample.realism_report(vqvae, prior, test_x, train_x, log=lambda line: None, rot90=0)  # PNG: upright
    assert set(flips[:3]) == {-2} and set(flips[3:]) == {-1}  # NIfTI: shown after np.rot90, left-right is axis -2
    assert report["copies"] == 0.25  # samples nearer a training slice than any reconstruction is
    for k, x in (("real", test_x), ("recon", recon)):
        assert report[f"nearest_train_ssim_centre_{k}"] == pytest.approx(c(x).mean((1, 2, 3)).median().item())


def test_auroc_and_precision_recall_against_their_definitions_with_ties():
    g = torch.Generator().manual_seed(4)
    for trial in range(6):
        n = 50 + 37 * trial
        score = (torch.rand(n, generator=g) * (3 + trial)).floor() * (torch.rand(n, generator=g) < 0.7)  # many ties
        label = torch.rand(n, generator=g) < 0.1 + 0.1 * trial
        label[trial] = True  # a positive in the first places, where ties used to rank it by index
        pos, neg = score[label], score[~label]
        pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
        assert sample.auroc(score, label) == pytest.approx(pairs.mean().item())
        ap, dice, recall_before = 0.0, 0.0, 0.0  # every distinct score a threshold, the highest first
        for t in score.unique().flip(0):
            said = score >= t
            tp = (said & label).sum().item()
            ap += (tp / label.sum().item() - recall_before) * tp / said.sum().item()
            recall_before, dice = tp / label.sum().item(), max(dice, 2 * tp / (said.sum().item() + label.sum().item()))
        assert sample.precision_recall(score.view(1, -1), label.view(1, -1)) == pytest.approx((ap, dice)), trial
    none = torch.zeros(9, dtype=torch.bool)  # one class only: undefined, not a score of 0 (read as the worst)
    assert sample.auroc(score[:9], none) is None and sample.auroc(score[:9], ~none) is None
    assert sample.precision_recall(score[:9], none) == (None, None)


def test_two_sample_critic_learning_rate_decays_to_zero(monkeypatch):
    seen = []  # the learning rate of every step the critic takes

    class Spy(torch.optim.Adam):
        def step(self, *a, **k):
            seen.append(self.param_groups[0]["lr"])
            return super().step(*a, **k)

    monkeypatch.setattr(sample.torch.optim, "Adam", Spy)
    a, b = vq.phantom_slices(12, (32, 16), seed=3), vq.phantom_slices(12, (32, 16), seed=4)
    sample.two_sample_score(a[:6], b[:6], a[6:], b[6:], steps=40, batch_size=4)
    assert len(seen) == 40 and seen[0] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(seen, seen[1:])) and seen[-1] < 1e-5 and seen[20] == pytest.approx(0.5e-3)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_metrics_and_reference_search_ignore_tf32_on_gpu():
    saved = vq.set_tf32(True)  # as train.py sets them; put back after, so later tests run as they would alone
    try:
        from kernels import nearest_code_reference, nearest_code_torch
        for x, y in _image_pairs():
            got = vq.ssim(x[None, None].cuda(), y[None, None].cuda()).item()
            assert abs(got - _ssim_reference(x, y)) < 1e-4
        g = torch.Generator().manual_seed(0)
        z, c = torch.randn(5000, 64, generator=g), torch.randn(512, 64, generator=g)
        assert torch.equal(nearest_code_torch(z.cuda(), c.cuda())[0].cpu(), nearest_code_reference(z, c)[0])
    finally:
        vq.set_tf32(saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", [SMALL, RICH], ids=["gated", "position"])
def test_cuda_graph_sampler_matches_naive_on_gpu(kind):
    model = small_prior(seed=2, **kind).double().cuda()
    pos = _position(model, 4)
    pos = None if pos is None else pos.cuda()
    cached = model.generate(4, 0.9, torch.Generator("cuda").manual_seed(5), position=pos)
    assert torch.equal(cached, model.generate_naive(4, 0.9, torch.Generator("cuda").manual_seed(5), position=pos))
    _, noise, _ = model._noise(3, 1.0, torch.Generator("cuda").manual_seed(0), pos[:3] if pos is not None else None)
    codes, logits = model._generate_cached(noise, 1.0, model._condition(3, pos[:3] if pos is not None else None, None),
                                           keep_logits=True)
    with torch.no_grad():
        assert (model(codes, pos[:3] if pos is not None else None).permute(0, 2, 3, 1) - logits).abs().max() < 1e-9


# ----------------------------------------------------------------------------- trust (numerics, no lost work, odd input)


def test_sampler_runs_where_the_new_tf32_api_was_used():
    # a program that set torch's fp32_precision API may not touch the legacy TF32 flags (RuntimeError)
    saved = torch.backends.fp32_precision
    try:
        torch.backends.fp32_precision = "tf32"
        model = small_prior(seed=1)
        assert model.generate(2, generator=torch.Generator().manual_seed(0)).shape == (2, 6, 5)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"  # left as the program set it
    finally:
        torch.backends.fp32_precision = saved


@pytest.mark.parametrize("levels", [1, 2])
def test_quantizer_sees_float32_encoder_outputs_under_bf16(levels):
    torch.manual_seed(0)
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32, levels=levels)).eval()
    x = vq.phantom_slices(2, (32, 32), seed=4)
    seen = {}
    # every quantizer: the bottom one's input is float32 by construction, the top one's only if its encoder says so
    for name, q in model.named_modules():
        if isinstance(q, vq.VectorQuantizer):
            q.register_forward_pre_hook(lambda m, inp, name=name: seen.setdefault(name, []).append(inp[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        z = model.encoder(x)
    want = ["quantizer", "quantizer_top"][:levels]
    assert seen == {name: [torch.float32] for name in want} and z.dtype == torch.float32  # not bf16-rounded vectors


@pytest.mark.parametrize("has, flag", [(True, "true"), (False, "true"), (True, "false")])
def test_cpu_training_steps_are_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch, has, flag):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    run = train.Run(train.parse_args(["--device", "cpu", "--bf16", flag]))
    want = has and flag == "true"
    with run.autocast():
        y = F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))
    assert run.bf16 == want and y.dtype == (torch.bfloat16 if want else torch.float32)


def test_checkpoints_get_the_mode_of_any_other_file(tmp_path):
    old = os.umask(0o022)
    try:
        vq.save_checkpoint({"a": torch.ones(2)}, tmp_path / "c.pt")
        vq.save_json(tmp_path / "s.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
    assert (tmp_path / "s.json").stat().st_mode & 0o777 == 0o644


def test_one_volume_split_file_by_file_has_one_position_scale_in_every_split(tmp_path):
    g = np.random.default_rng(3)
    for z in range(30):  # one volume's slices: no cases, so split file by file
        nib.save(nib.Nifti1Image(g.random((20, 18)).astype(np.float32), np.eye(4)), tmp_path / f"scan_slice_{z}.nii.gz")
    (tmp_path / "scan_slice_31.png").write_bytes(b"x")  # a picture beside them: never read, nor counted
    with pytest.warns(vq.SplitWarning, match="split file by file"), pytest.warns(SkippedFileWarning, match="1 PNG"):
        files = find_splits(tmp_path)
        data = vq.load_splits({"source": str(tmp_path), "size": [16, 16]}, files=files)
    for k in vq.SPLITS:  # Z over the volume's largest Z, 29, wherever that slice went (not the split's largest)
        z = [int(re.search(r"slice_(\d+)", f.name)[1]) for f in files[k]]
        assert data["positions"][k].tolist() == pytest.approx([v / 29 for v in z]), k


def test_oasis_names_carry_positions():
    names = [Path(f"case_001_slice_{z}.nii.png") for z in (0, 5, 10)]
    assert vq._positions(names, [1, 1, 1]) == [0.0, 0.5, 1.0]


def test_cut_metrics_line_and_tiny_test_split(tmp_path, capsys):
    # a kill mid-write leaves half a line; the next run warns and goes on; 3 test slices are too few
    # for the two-sample scores, which are left out with a line, and model.pt and summary.json agree
    (tmp_path / "metrics.jsonl").write_text('{"stage": "vqvae", "epoch": 1}\n{"stage": "vq')
    with pytest.warns(UserWarning, match="cut short"):
        _train(tmp_path, "--overwrite", "--n_test", "3", "--prior_epochs", "1")
    assert "too few for the two-sample scores" in capsys.readouterr().out
    s = json.loads((tmp_path / "summary.json").read_text())
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert s["realism_n"] == 3 and "two_sample_samples" not in s and s["n_test"] == 3
    assert s["prior_fingerprint"] == ckpt["prior_fingerprint"] == train._fingerprint(vq.load_prior(ckpt))


def test_metrics_lines_that_are_no_record_are_left_out(tmp_path):
    good = {"stage": "prior", "epoch": 3, "val_bits": 2.5}
    lines = ["[1, 2]", "7", '{"stage": "vqvae"}', '{"stage": "both", "epoch": 1}', json.dumps(good), '{"sta']
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n\n")
    with pytest.warns(UserWarning, match="no record") as said:
        assert train._read_json_lines(tmp_path / "m.jsonl") == [good]
    assert sorted(int(str(w.message).split("line ")[1].split(":")[0]) for w in said) == [1, 2, 3, 4, 6]


def test_vqvae_resume_of_a_finished_run_keeps_its_prior_and_other_data_is_refused(tmp_path, capsys, monkeypatch):
    _train(tmp_path)
    before = json.loads((tmp_path / "summary.json").read_text())
    capsys.readouterr()
    _train(tmp_path, "--stage", "vqvae", "--resume", "--epochs", "2")  # nothing left to train: the prior still fits
    said = capsys.readouterr().out
    assert "vqvae: resumed at epoch 2 step 12, its epochs done" in said and "training on" not in said
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    after = json.loads((tmp_path / "summary.json").read_text())
    assert "prior" in ckpt and after["prior_bits_per_code"] == before["prior_bits_per_code"]
    assert [json.loads(r)["stage"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        ["vqvae"] * 2 + ["prior"] * 2
    capsys.readouterr()
    monkeypatch.setattr(train, "load_data", None)  # other data is refused before any slice is read
    for argv, says in [(["--seed", "5"], "not --seed 5 --n_train 48"), (["--n_val", "8"], "--n_val 8"),
                       (["--size", "64", "32"], "not --size 64 32"), (["--data", str(tmp_path)], "no --data")]:
        with pytest.raises(SystemExit) as e:  # (the phantom's counts are refused with --data: left out there)
            train.main(["--out", str(tmp_path), *(TINY[6:] if "--data" in argv else TINY), "--stage", "prior",
                        "--overwrite", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_prior_seed_trains_another_prior_of_the_same_vqvae(tmp_path, capsys):
    _train(tmp_path, "--realism", "false")
    first, before = torch.load(tmp_path / "model.pt", weights_only=True), json.loads((tmp_path / "summary.json").read_text())
    assert before["prior_seed"] == 0  # the default: --seed
    _train(tmp_path, "--stage", "prior", "--overwrite", "--prior_seed", "0", "--realism", "false")
    again = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(first["prior"][k], v) for k, v in again["prior"].items())  # the same seed: the same prior
    _train(tmp_path, "--stage", "prior", "--overwrite", "--prior_seed", "7", "--realism", "false")
    other, after = torch.load(tmp_path / "model.pt", weights_only=True), json.loads((tmp_path / "summary.json").read_text())
    assert after["prior_seed"] == 7 and after["vqvae_fingerprint"] == before["vqvae_fingerprint"]
    assert after["test_ssim_mean"] == before["test_ssim_mean"]  # the VQ-VAE and its figures kept
    assert all(torch.equal(first["vqvae"][k], v) for k, v in other["vqvae"].items())
    assert not all(torch.equal(first["prior"][k], v) for k, v in other["prior"].items())  # another prior
    assert after["prior_bits_per_code"] != before["prior_bits_per_code"]
    train.main(["--out", str(tmp_path), "--stage", "prior", "--overwrite", "--prior_seed", "7", "--realism", "false",
                "--prior_epochs", "2", *TINY[9:]])  # no --size, --n_train...: as model.pt's VQ-VAE was trained
    same = torch.load(tmp_path / "model.pt", weights_only=True)["prior"]
    assert all(torch.equal(other["prior"][k], v) for k, v in same.items())  # the same slices: the same prior
    # resuming under another prior seed would replay another slice order: refused in one line
    _train(tmp_path, "--stage", "prior", "--overwrite", "--prior_seed", "7", "--minutes", "0.0001", "--realism", "false")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--stage", "prior", "--resume", "--prior_seed", "8")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--prior_seed 7, not 8" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # on the phantom --seed draws other slices: the refusal names --prior_seed
        _train(tmp_path, "--stage", "prior", "--overwrite", "--seed", "5")
    assert e.value.code == 2 and "--prior_seed" in capsys.readouterr().err


def test_rate_train_resume_and_sample(tmp_path, capsys):
    # a VQ-VAE with a rate model: its scale buffer is 0-dim (the fingerprint reads it), its codes depend on it
    _train(tmp_path, "--rate", "1.0", "--prior_epochs", "1", "--realism", "false")
    ckpt = vq.load_checkpoint(tmp_path / "model.pt")
    model = vq.VQVAE.from_checkpoint(ckpt)
    assert ckpt["vqvae_config"]["rate"] == 1.0 and model.rate_model.scale > 0
    _train(tmp_path, "--rate", "1.0", "--prior_epochs", "1", "--realism", "false", "--resume")
    assert "resume" in capsys.readouterr().out.lower()
    assert vq.load_checkpoint(tmp_path / "model.pt")["vqvae_fingerprint"] == ckpt["vqvae_fingerprint"]
    x = vq.load_splits(ckpt["data"])["test"]
    assert torch.equal(model.encode(x), vq.VQVAE.from_checkpoint(tmp_path / "model.pt").encode(x))
    assert sample.main(["--out", str(tmp_path), "--n", "2"]).shape == (2, 1, *x.shape[-2:])


def test_many_samples_are_written_as_drawn_and_the_grid_shows_the_first(tmp_path, capsys, monkeypatch):
    _train(tmp_path, "--prior_epochs", "1", "--realism", "false")
    ckpt = vq.load_checkpoint(tmp_path / "model.pt")
    want = vq.sample_slices(vq.VQVAE.from_checkpoint(ckpt), vq.load_prior(ckpt), 70,
                            generator=torch.Generator().manual_seed(3))  # all at once
    monkeypatch.setattr(sample, "GRID_TILES", 5)
    shown = sample.main(["--out", str(tmp_path), "--n", "70", "--seed", "3", "--dest", str(tmp_path / "a")])
    assert torch.equal(shown, want[:5]) and "the first 5 in grid.png" in capsys.readouterr().out
    for i in (0, 63, 64, 69):  # across the two draws of 64 and 6
        assert np.allclose(np.asanyarray(nib.load(tmp_path / "a" / f"sample_{i:03d}.nii.gz").dataobj), want[i, 0])
    png = (tmp_path / "a" / "grid.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 2 + 5 * 34 and int.from_bytes(png[20:24], "big") == 2 + 34
    draws, real = [], vq.sample_slices

    def interrupted(*a):  # Ctrl-C in the second draw
        draws.append(len(draws))
        if len(draws) > 1:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(vq, "sample_slices", interrupted)
    with pytest.raises(SystemExit) as e:  # the first 64 are on disk, and the grid
        sample.main(["--out", str(tmp_path), "--n", "70", "--seed", "3", "--dest", str(tmp_path / "b")])
    assert e.value.code == 130 and len(list((tmp_path / "b").glob("sample_*.nii.gz"))) == 64
    assert (tmp_path / "b" / "grid.png").read_bytes() == png
    assert f"stopped after 64 of 70 samples: sample_000 to sample_063 in {tmp_path / 'b'} are this run's\n" in \
        capsys.readouterr().out
    draws.clear()
    with pytest.raises(SystemExit):  # into the folder of 70 drawn before: the ones left over are named
        sample.main(["--out", str(tmp_path), "--n", "70", "--seed", "4", "--dest", str(tmp_path / "a")])
    assert "also holds 6 file(s) not of this run (sample_064.nii.gz, ...)" in capsys.readouterr().out
    monkeypatch.setattr(vq, "sample_slices", real)
    save, saved = sample._save_nifti, []

    def full(path, image):  # the disk fills at the eleventh file
        if len(saved) == 10:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(save(path, image))
    monkeypatch.setattr(sample, "_save_nifti", full)
    with pytest.raises(SystemExit) as e:
        sample.main(["--out", str(tmp_path), "--n", "70", "--dest", str(tmp_path / "c")])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and "sample_010.nii.gz: No space left on device" in err
    assert "stopped after 10 of 70 samples: sample_000 to sample_009 in" in out and ", not grid.png" in out


def test_the_reports_land_in_summary_json_when_the_disk_fills_after_them(tmp_path, monkeypatch):
    real = train.report_prior

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    def then_full(*a):  # after the reports no checkpoint fits: model.pt was written before them, unchanged since
        report = real(*a)
        monkeypatch.setattr(vq, "save_checkpoint", full)
        return report
    monkeypatch.setattr(train, "report_prior", then_full)
    _train(tmp_path, "--prior_epochs", "1")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert "lesion_surprise_auroc" in s and "two_sample_samples" in s and s["seconds_total"] > 0


def test_sample_py_stopped_by_sigterm_says_what_it_wrote(tmp_path):
    _train(tmp_path, "--prior_epochs", "1", "--realism", "false")
    run = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--out", str(tmp_path), "--n", "5000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    first = tmp_path / "samples_seed0_t1" / "sample_000.nii.gz"
    for _ in range(600):  # until it has written something (at most a minute)
        if first.exists() or run.poll() is not None:
            break
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130 and err.strip() == "interrupted" and "stopped after " in out, (out, err)


def test_evaluate_saves_nothing_when_model_pt_changed_while_the_report_ran(tmp_path, capsys, monkeypatch):
    _train(tmp_path, "--prior_epochs", "1", "--realism", "false")
    model, before = tmp_path / "model.pt", (tmp_path / "summary.json").read_bytes()

    def retrained(*a, **kw):  # a train.py --stage prior --overwrite into the folder, done while the report runs
        ckpt = vq.load_checkpoint(model)
        vq.save_checkpoint({**ckpt, "prior": {k: v + 1 for k, v in ckpt["prior"].items()}}, model)
        return {"two_sample_samples": 0.7}
    monkeypatch.setattr(sample, "realism_report", retrained)
    report = sample.main(["--out", str(tmp_path), "--evaluate"])
    out = capsys.readouterr().out
    assert "lesion_n" in report and f"not saved: {model} changed while the report ran" in out
    assert (tmp_path / "summary.json").read_bytes() == before  # not the old prior's figures over the new one's
    monkeypatch.setattr(sample, "realism_report", lambda *a, **kw: {"two_sample_samples": 0.7})
    real_access = os.access
    monkeypatch.setattr(sample.os, "access", lambda p, mode: False)  # a run only readable to you (root reads all)
    sample.main(["--out", str(tmp_path), "--evaluate"])  # said before the report, and no error after it
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path} is read-only to you: the report will be printed, not saved")
    assert f"not saved: {tmp_path} is read-only to you" in out and (tmp_path / "summary.json").read_bytes() == before
    monkeypatch.setattr(sample.os, "access", real_access)
    sample.main(["--out", str(tmp_path), "--evaluate"])  # unchanged: saved
    assert "added to" in capsys.readouterr().out and (tmp_path / "summary.json").read_bytes() != before


def test_a_run_from_before_resumes_with_rate_0_and_is_refused_in_one_line_without(tmp_path, capsys):
    _train(tmp_path, "--stage", "vqvae", "--epochs", "1", "--rate", "0")
    ckpt = vq.load_checkpoint(tmp_path / "vqvae.pt")
    del ckpt["vqvae_config"]["rate"]  # as written before the field existed
    ckpt["vqvae_config"]["adv_weight"] = 0.0  # and with a field since dropped
    vq.save_checkpoint(ckpt, tmp_path / "vqvae.pt")
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--stage", "vqvae", "--epochs", "2", "--resume", "--rate", "0.25")  # train.py's default
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--rate 0.0 (now 0.25)" in err and len(err.strip().splitlines()) == 1
    _train(tmp_path, "--stage", "vqvae", "--epochs", "2", "--resume", "--rate", "0")
    assert vq.load_checkpoint(tmp_path / "vqvae.pt")["trainer"]["epoch"] == 2


def test_two_level_train_and_sample(tmp_path, capsys):
    # not square: code maps of 8 x 4 (bottom) and 4 x 2 (top)
    _train(tmp_path, "--levels", "2", "--prior_epochs", "1", "--size", "32", "16")
    assert "into 4x2 and 8x4 code maps" in capsys.readouterr().out
    assert [train.parse_args(a).rate for a in ([], ["--levels", "2"], ["--levels", "2", "--rate", "1"])] == [.25, 0, 1]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert {"codebook_usage_top", "perplexity_top", "prior_bits_per_code_top", "prior_bits_per_code_bottom"} <= set(s)
    assert s["prior_bits_per_slice"] == pytest.approx(8 * s["prior_bits_per_code_top"]
                                                      + 32 * s["prior_bits_per_code_bottom"], rel=1e-5)
    images = sample.main(["--out", str(tmp_path), "--n", "3", "--position", "0.4", "--temperature", "0.8"])
    assert images.shape == (3, 1, 32, 16)
    shown, sources = sample.main(["--out", str(tmp_path), "--blind", "test", "--n", "3", "--position", "0.4"])
    assert shown.shape == (6, 1, 32, 16) and sorted(sources) == ["a"] * 3 + ["b"] * 3
    bench = sample.main(["--out", str(tmp_path), "--n", "2", "--bench"])
    assert all(map(torch.equal, vq.as_levels(bench["cached"][1]), vq.as_levels(bench["naive"][1])))
    folder = tmp_path / "samples_seed0_t0.8_p0.4"
    sims = sample.main(["--out", str(tmp_path), "--reconstruct", str(folder / "sample_000.nii.gz"),
                        str(folder / "sample_001.nii.gz")])
    assert len(sims) == 2 and all(0 < v.item() <= 1 for v in sims)
    assert "identical codes: True" in capsys.readouterr().out
    # the config of a two-level prior from before the tie (no code_dim) reads as untied: refused, in one line
    ckpt = vq.load_checkpoint(tmp_path / "prior.pt")
    for level in ("top", "bottom"):
        del ckpt["prior_config"][level]["code_dim"]
    vq.save_checkpoint(ckpt, tmp_path / "prior.pt")
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--levels", "2", "--prior_epochs", "2", "--size", "32", "16", "--resume")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("--prior_tied False (now True)") == 1 and len(err.strip().splitlines()) == 1
    capsys.readouterr()
    vq.save_checkpoint({**vq.load_checkpoint(tmp_path / "model.pt"), "vqvae_fingerprint": "x"}, tmp_path / "o.pt")
    with pytest.raises(SystemExit) as e:  # said at once, not after a recipe for a judge it would refuse
        sample.main(["--out", str(tmp_path), "--evaluate", "--judge", str(tmp_path / "o.pt")])
    assert e.value.code == 2 and "one-level priors only" in capsys.readouterr().err


def test_sigterm_saves_at_the_next_step_and_resume_finishes(tmp_path, capsys, monkeypatch):
    lr_at = train._lr_at

    sent = []

    def preempted(step, total, lr):  # a cluster's SIGTERM arrives during step 5
        if step == 5 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return lr_at(step, total, lr)

    monkeypatch.setattr(train, "_lr_at", preempted)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--stage", "vqvae")
    assert e.value.code == 130 and signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err
    assert "stopped by SIGTERM at step 6" in err and "--resume" in err and "Traceback" not in err
    state = torch.load(tmp_path / "vqvae.pt", weights_only=True)["trainer"]
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 6)  # step 6 ended the epoch
    monkeypatch.setattr(train, "_lr_at", lr_at)
    _train(tmp_path, "--stage", "vqvae", "--resume")
    assert torch.load(tmp_path / "vqvae.pt", weights_only=True)["trainer"]["step"] == 12


def test_ctrl_c_during_the_reports_stops_at_once_with_both_models_saved(tmp_path, capsys, monkeypatch):
    report_prior = train.report_prior

    def interrupted(*args, **kwargs):  # Ctrl-C as the reports start: they take minutes at full size
        os.kill(os.getpid(), signal.SIGINT)
        return report_prior(*args, **kwargs)

    monkeypatch.setattr(train, "report_prior", interrupted)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--prior_epochs", "1")
    err = capsys.readouterr().err
    assert e.value.code == 130 and signal.getsignal(signal.SIGINT) is before
    assert "stopped by SIGINT during the reports" in err and "sample.py --evaluate" in err and "Traceback" not in err
    assert isinstance(vq.load_prior(tmp_path / "model.pt"), vq.PixelCNN)  # both models kept, with their figures
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "prior_bits_per_code" in summary and "two_sample_samples" not in summary


@pytest.mark.parametrize("where", ["_shifted_codes", "evaluate_vqvae"])
def test_ctrl_c_while_the_prior_encodes_stops_at_once_and_resume_trains_the_prior(tmp_path, capsys, monkeypatch,
                                                                                 where):
    shifted, after = getattr(train, where), []

    def interrupted(*args, **kwargs):  # Ctrl-C while every slice is encoded (minutes on a CPU at HipMRI's size),
        os.kill(os.getpid(), signal.SIGINT)  # or as the VQ-VAE's reports run: stopped before the encoding
        after.append("went on")
        return shifted(*args, **kwargs)
    monkeypatch.setattr(train, where, interrupted)
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "--realism", "false")
    err = capsys.readouterr().err
    assert e.value.code == 130 and "while the prior's slices were encoded" in err and "add --resume to go on" in err
    assert after == (["went on"] if where == "evaluate_vqvae" else [])  # the reports end: model.pt holds the VQ-VAE
    assert "prior" not in torch.load(tmp_path / "model.pt", weights_only=True) and not (tmp_path / "prior.pt").exists()
    steps = torch.load(tmp_path / "vqvae.pt", weights_only=True)["trainer"]["step"]
    monkeypatch.setattr(train, where, shifted)
    _train(tmp_path, "--realism", "false", "--resume")
    assert isinstance(vq.load_prior(tmp_path / "model.pt"), vq.PixelCNN)
    assert torch.load(tmp_path / "vqvae.pt", weights_only=True)["trainer"]["step"] == steps  # stage 1 not retrained
    if where == "_shifted_codes":  # a new prior of this VQ-VAE (--stage prior) has nothing to resume: run it again
        monkeypatch.setattr(train, where, interrupted)
        with pytest.raises(SystemExit) as e:
            _train(tmp_path, "--realism", "false", "--stage", "prior", "--overwrite")
        assert "run the same command again" in capsys.readouterr().err
        monkeypatch.setattr(train, where, shifted)
        _train(tmp_path, "--realism", "false", "--stage", "prior", "--overwrite")


def test_ctrl_c_while_reading_the_slices_stops_there_and_leaves_no_run(tmp_path, capsys, monkeypatch):
    load, after = vq.load_splits, []  # what ran after the signal

    def interrupted(*args, **kwargs):  # Ctrl-C while a big folder is read (a minute for HipMRI's first read)
        os.kill(os.getpid(), signal.SIGINT)
        after.append("read on")
        return load(*args, **kwargs)
    monkeypatch.setattr(vq, "load_splits", interrupted)
    with pytest.raises(SystemExit) as e:
        _train(tmp_path)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "while reading the slices: nothing was trained" in err and not after
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no step-0 checkpoint to --resume or --overwrite
    monkeypatch.setattr(vq, "load_splits", load)
    _train(tmp_path, "--epochs", "1", "--prior_epochs", "1", "--realism", "false")  # a plain rerun trains


def test_an_interrupted_prior_resumes_with_its_records(tmp_path, capsys, monkeypatch):
    lr_at, sent = train._lr_at, []

    def preempted(step, total, lr):  # SIGTERM during prior step 8 of 18 (the VQ-VAE's schedule has 12)
        if total == 18 and step == 7 and not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return lr_at(step, total, lr)

    flags = ("--prior_epochs", "3", "--realism", "false", "--prior_dropout", "0.3", "--prior_ema", "0.9",
             "--device", "cpu")  # dropout: random draws to replay; the CPU: no nondeterministic kernels
    _train(tmp_path / "whole", *flags)
    monkeypatch.setattr(train, "_lr_at", preempted)
    with pytest.raises(SystemExit):
        _train(tmp_path, *flags)
    records = lambda: [(r["stage"], r["epoch"]) for r in train._read_json_lines(tmp_path / "metrics.jsonl")]  # noqa
    assert records() == [("vqvae", 1), ("vqvae", 2), ("prior", 1)]
    monkeypatch.setattr(train, "_lr_at", lr_at)
    _train(tmp_path, *flags, "--resume")
    assert records() == [("vqvae", 1), ("vqvae", 2), ("prior", 1), ("prior", 2), ("prior", 3)]
    for name, part in (("prior.pt", lambda c: c["trainer"]["model"]), ("model.pt", lambda c: c["prior"])):  # average
        a, b = (part(torch.load(p / name, weights_only=True)) for p in (tmp_path / "whole", tmp_path))
        assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6, name  # as if never stopped


@pytest.mark.parametrize("levels", [1, 2])
def test_shifted_codes_are_the_codes_of_slightly_moved_slices(levels):
    torch.manual_seed(0)
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=32, levels=levels)).eval()
    x = vq.phantom_slices(5, (32, 48), seed=6)
    codes = model.encode(x)
    maps = vq.as_levels(train._shifted_codes(model, x, codes, 3, seed=1))
    assert [m.shape[0] for m in maps] == [15] * levels
    for a, b in zip(maps, vq.as_levels(codes)):
        assert torch.equal(a[:5], b)  # the slices' own maps come first
    moves = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    for i in range(5, 15):  # every other map is the code of its slice rolled by one of the 25 moves
        rolled = torch.stack([x[i % 5].roll(m, (-2, -1)) for m in moves])
        found = [all(torch.equal(a[i], b[k]) for a, b in zip(maps, vq.as_levels(model.encode(rolled))))
                 for k in range(len(moves))]
        assert any(found)
    assert not all(torch.equal(maps[-1][i], maps[-1][i % 5]) for i in range(5, 15))  # and they move


def test_prior_shifts_keep_the_epochs_and_batches(tmp_path, capsys):
    _train(tmp_path, "--prior_epochs", "1", "--prior_shifts", "3", "--realism", "false")
    out = capsys.readouterr().out
    assert "48 train slices and 2 shifted copies of each" in out
    assert "prior: batches of 8, 6 steps an epoch" in out  # an epoch is one map of each slice
    with pytest.raises(SystemExit):
        train.parse_args(["--prior_shifts", "0"])


def test_prior_weight_average_is_what_is_validated_and_kept(tmp_path, monkeypatch):
    # the average, computed here from the weights after every step, is what model.pt holds
    steps, step = [], torch.optim.AdamW.step

    def record(self, *a, **k):
        prior = self.param_groups[0]["params"][0].shape[0] == 1  # the prior's (its first weight: the position map)
        if prior and not steps:
            steps.append([p.detach().clone() for p in self.param_groups[0]["params"]])  # the initial weights
        out = step(self, *a, **k)
        if prior:
            steps.append([p.detach().clone() for p in self.param_groups[0]["params"]])
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    result = _train(tmp_path, "--prior_epochs", "1", "--prior_ema", "0.8", "--realism", "false")
    assert len(steps) == 7  # the initial weights, then 48 slices in batches of 8
    avg = steps[0]
    for n, weights in enumerate(steps[1:]):
        d = min(0.8, (1 + n) / (10 + n))
        avg = [a * d + w * (1 - d) for a, w in zip(avg, weights)]
    kept = list(result["prior"].parameters())
    assert all(torch.allclose(a, k, atol=1e-6) for a, k in zip(avg, kept))
    assert not all(torch.allclose(w, k, atol=1e-6) for w, k in zip(steps[-1], kept))  # not the last weights
    with pytest.raises(SystemExit):
        train.parse_args(["--prior_ema", "1"])


def test_a_one_slice_test_split_keeps_the_prior(tmp_path):
    result = _train(tmp_path, "--n_test", "1", "--prior_epochs", "1")
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["n_test"] == 1 and s["diversity_real"] is None and "two_sample_samples" not in s  # too few: left out
    assert 0 < s["nearest_train_ssim_real"] <= 1 and s["lesion_n"] == 1
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(ckpt["prior"]["embed.weight"], result["prior"].state_dict()["embed.weight"])


def _discs(n, seed):
    """Normal slices the tiny models below learn in seconds: a grey disc, jittered, with noise."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    c = 16 + 2 * torch.rand(n, 2, generator=g) - 1
    d = ((ys - c[:, :1, None]) ** 2 + (xs - c[:, 1:, None]) ** 2).sqrt()  # (n, 32, 32)
    return (0.5 * torch.sigmoid(2 * (11 - d)) + 0.02 * torch.rand(n, 32, 32, generator=g))[:, None]


def test_lesions_sit_in_their_masks_and_an_oracle_map_scores_perfectly(monkeypatch):
    x = vq.phantom_slices(12, (64, 32), seed=5)
    xl, masks, has, sign = sample.draw_lesions(x, seed=1)
    assert has.sum() == 6 and torch.equal(masks.flatten(1).any(1), has) and set(sign[has].tolist()) <= {-1.0, 1.0}
    change = (xl - x).abs()
    assert change[masks].mean() > 0.06 and change[masks].mean() > 10 * change[~masks].mean()  # changed where said
    assert all(sign[i] * (xl - x)[i][masks[i]].mean() > 0 for i in has.nonzero()[:, 0])  # bright up, dark down
    assert {-1.0, 1.0} <= set(sign[has].tolist())
    many = vq.phantom_slices(64, (64, 32), seed=6)  # each lesion centred well inside the body, not on its rim
    _, rings, drawn, _ = sample.draw_lesions(many, seed=2)
    for i in drawn.nonzero()[:, 0]:
        cy, cx = rings[i, 0].nonzero().float().mean(0).round().long()  # the centre of a whole ellipse
        assert vq._blur(many, 3.0)[i, 0, cy, cx] > 0.25
    oracle = {"map": masks.float(), "score": masks.flatten(1).float().mean(1), "redo": torch.zeros(12, 16, 8).bool()}
    monkeypatch.setattr(vq, "surprise", lambda *a, **k: oracle)  # a surprise map that is the mask itself
    vqvae = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=16, n_res_blocks=1)).eval()
    seen, reconstruct = [], vqvae.reconstruct
    vqvae.reconstruct = lambda t: (seen.append(t), reconstruct(t))[1]
    report, _ = sample.lesion_report(vqvae, small_prior(), x, None, {"threshold": 1.0, "sigma": 2.0}, seed=1,
                                     log=lambda line: None)
    assert len(seen) == 1 and torch.equal(seen[0], xl)  # the residual baseline: of the lesioned slices
    assert report["lesion_slices"] == 6 and report["lesion_surprise_auroc"] == 1.0
    assert report["lesion_surprise_auprc"] == pytest.approx(1.0) and report["lesion_surprise_dice"] == pytest.approx(1.0)
    assert report["lesion_intensity_auprc"] < 0.5  # the baselines are scored on their own maps
    keep = (sign == -1) | ~has  # a sign's figure: its lesions among every slice without one, as chance is given
    assert report["lesion_intensity_auprc_dark"] == pytest.approx(sample.precision_recall(xl[keep], masks[keep])[0])


@pytest.mark.parametrize("levels", [1, 2])
def test_the_surprise_map_is_the_smoothed_absolute_difference_in_the_redrawn_cells(levels):
    torch.manual_seed(0)
    vqvae = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=7, n_res_blocks=1, levels=levels)).eval()
    with torch.no_grad():
        vqvae.decoder.net[-1].bias.fill_(0.6)  # healed slices brighter than the background: x - healed < 0 there
    x = vq.phantom_slices(3, (24, 20) if levels == 1 else (24, 24), seed=1)  # small_prior's maps, or 3 x 3 and 6 x 6
    prior, pos = (small_prior(), None) if levels == 1 else (two_level_prior(), torch.tensor([0.2, 0.5, 0.7]))
    bits = torch.cat([b.flatten() for b in vq.as_levels(vq.code_bits(prior, vqvae.encode(x), pos))])
    s = vq.surprise(vqvae, prior, x, bits.median().item(), pos, sigma=1.5, generator=torch.Generator().manual_seed(0))
    cells = torch.stack([r.float().repeat_interleave(24 // r.shape[1], 1).repeat_interleave(x.shape[-1] // r.shape[2], 2)
                         for r in vq.as_levels(s["redo"])]).amax(0)[:, None]  # a pixel in any level's redrawn cell
    assert 0 < cells.mean() < 1 and ((x - s["healed"]) * cells < -0.1).any()  # some kept, some darker than healed
    want = vq._blur((x - s["healed"]).abs() * cells, 1.5)
    assert torch.allclose(s["map"], want, atol=1e-6) and torch.allclose(s["score"], want.flatten(1).mean(1))


@pytest.mark.parametrize("levels", [1, 2])
def test_surprise_redraws_exactly_the_codes_above_the_threshold(levels):
    # thresholds from surprise_threshold are some code's bits: that code is not above it, so it is kept
    torch.manual_seed(0)
    vqvae = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=7, n_res_blocks=1, levels=levels)).eval()
    x = vq.phantom_slices(3, (24, 20) if levels == 1 else (24, 24), seed=2)
    prior, pos = (small_prior(), None) if levels == 1 else (two_level_prior(), torch.tensor([0.3, 0.6, 0.9]))
    codes = vqvae.encode(x)
    bits = vq.as_levels(vq.code_bits(prior, codes, pos))
    for q in (0.5, 0.8, 1.0):  # 1.0: the largest bits, so nothing is redrawn
        th = vq.surprise_threshold(prior, codes, pos, quantile=q)
        assert any((b == th).any() for b in bits)
        s = vq.surprise(vqvae, prior, x, th, pos, generator=torch.Generator().manual_seed(1))
        for b, sb, r, c, h in zip(bits, *(vq.as_levels(s[k]) for k in ("bits", "redo", "codes", "healed_codes"))):
            assert torch.equal(sb, b) and torch.equal(r, b > th) and torch.equal(h[~r], c[~r])
    assert not any(r.any() for r in vq.as_levels(s["redo"])) and (s["score"] == 0).all()
    assert all(map(torch.equal, vq.as_levels(s["healed_codes"]), vq.as_levels(codes)))


def test_the_rate_models_nats_join_the_loss_in_training_only():
    torch.manual_seed(0)
    model = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=16, n_res_blocks=1, rate=0.25))
    x = vq.phantom_slices(4, (32, 32), seed=3)
    model.train()(x)  # k-means seeds the codebook, the rate model sets its scale
    first = model.rate_model.scale.item()
    with torch.no_grad():
        _, _, trained = model.train()(x)
        model(vq.phantom_slices(4, (32, 32), seed=4))
        _, _, evaluated = model.eval()(x)
        z, codes = model.encoder(x), model.encode(x)
    assert 0 < abs(model.rate_model.scale.item() / first - 1) < 0.02  # then it moves slowly, 1% of the way a step
    commit = model.quantizer.beta * F.mse_loss(z, model.quantizer.codebook[codes].permute(0, 3, 1, 2)).item()
    assert evaluated["commit"].item() == pytest.approx(commit, rel=1e-4)  # no nats in an evaluation's loss
    assert trained["commit"].item() > commit + 0.5 * trained["rate_bits"].item()  # in training: nats of the codes


def test_a_two_level_loss_commits_both_levels():
    torch.manual_seed(0)
    m = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=16, n_res_blocks=1, levels=2, rate=0))
    x = vq.phantom_slices(4, (32, 32), seed=3)
    m.train()(x)  # k-means seeds both codebooks
    with torch.no_grad():
        _, _, stats = m.eval()(x)
        top, bottom = m.encode(x)
        z = m.encoder(x)
        at = lambda q, c: q.codebook[c].permute(0, 3, 1, 2)  # noqa: E731 (codes -> their vectors)
        merged = m.merge(torch.cat([z, m.decoder_top(at(m.quantizer_top, top))], 1))
        want = F.mse_loss(m.encoder_top(z), at(m.quantizer_top, top)) + F.mse_loss(merged, at(m.quantizer, bottom))
    assert stats["commit"].item() == pytest.approx(m.quantizer.beta * want.item(), rel=1e-4)


def test_a_lesion_raises_the_surprise_score():
    torch.manual_seed(0)
    vqvae = vq.VQVAE(vq.VQVAEConfig(channels=16, code_dim=8, n_codes=16, n_res_blocks=1))
    normal = _discs(256, seed=1)
    vqvae.train()(normal[:128])  # k-means seeds the codebook on normal slices; the rest stays untrained
    vqvae.eval()
    codes = vqvae.encode(normal)
    prior = PixelCNN(PriorConfig(n_codes=16, height=8, width=8, prior_channels=16, prior_layers=4,
                                 prior_dilations=(1, 2)))
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for step in range(150):
        loss, _ = prior.loss(codes[torch.randint(0, 192, (32,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    threshold = vq.surprise_threshold(prior.eval(), codes[192:], quantile=0.99)
    x = _discs(16, seed=2)
    lesioned = x.clone()
    lesioned[:, :, 12:18, 14:20] = 1.0  # a bright patch inside every disc
    base, hurt = (vq.surprise(vqvae, prior, t, threshold, generator=torch.Generator().manual_seed(0)) for t in (x, lesioned))
    assert hurt["score"].mean() > 2 * base["score"].mean()
    assert (hurt["score"] > base["score"]).float().mean() >= 0.75
    assert hurt["redo"].sum() > base["redo"].sum()
    # a slice's redraws start from the generator's state whatever its neighbours: alone or in other batches alike
    again = vq.surprise(vqvae, prior, lesioned, threshold, generator=torch.Generator().manual_seed(0), batch_size=5)
    for i in (0, 7, 13):
        alone = vq.surprise(vqvae, prior, lesioned[i:i + 1], threshold, generator=torch.Generator().manual_seed(0))
        assert alone["redo"].any() and torch.equal(alone["codes"][0], hurt["codes"][i])
        for got in (hurt, again):
            assert torch.equal(alone["healed_codes"][0], got["healed_codes"][i])
            assert alone["score"][0].item() == pytest.approx(got["score"][i].item(), rel=1e-5)
    with pytest.raises(ValueError, match="3 maps need one generator each, got 2"):
        prior.generate(3, generator=[torch.Generator()] * 2)


def test_sample_positions_of_input_files_one_scan_a_folder(tmp_path, monkeypatch, capsys):
    cases = [f"a/case_{c}_week_0_slice_{z}.nii.gz" for c, n in ((7, 5), (12, 3)) for z in range(n)]
    for name in cases + ["b/scan.nii.gz", "b/case_1_slice_4.nii.gz"]:  # in b one name has no slice_Z: it alone 0.5
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")  # names only: never read
    scans, each = [], vq._slice_files
    monkeypatch.setattr(vq, "_slice_files", lambda folder: scans.append(folder.name) or each(folder))
    positional = types.SimpleNamespace(config=types.SimpleNamespace(positional=True))
    seen = {}
    got = {n: sample._positions_of(tmp_path / n, 1, positional, seen)[0]
           for n in cases[::-1] + ["b/case_1_slice_4.nii.gz", "b/scan.nii.gz"]}
    assert scans == ["a", "b"]  # 10 files, two folders: two scans (11,400 files once took 0.13 s each)
    assert got == {**{f"a/case_7_week_0_slice_{z}.nii.gz": z / 4 for z in range(5)},
                   **{f"a/case_12_week_0_slice_{z}.nii.gz": z / 2 for z in range(3)}, "b/case_1_slice_4.nii.gz": 1.0,
                   "b/scan.nii.gz": 0.5}
    said = capsys.readouterr().out
    assert "scan.nii.gz: no position from slice_Z" in said and said.count("no position") == 1
    assert sample._positions_of(tmp_path / cases[0], 1, types.SimpleNamespace(
        config=types.SimpleNamespace(positional=False)), seen) is None
    # a volume in one file: its own slice order, as training reads it (the name's slice_Z is not its position)
    assert sample._positions_of(tmp_path / cases[1], 5, positional, seen) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_surprise_maps_healed_slices_and_outputs(tmp_path, capsys, monkeypatch):
    result = _train(tmp_path)
    vqvae, prior = result["vqvae"], result["prior"]
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    settings = ckpt["surprise"]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["lesion_threshold_bits"] == settings["threshold"] > 0 and 0 <= s["lesion_surprise_auprc"] <= 1
    x = vq.phantom_slices(12, (32, 32), seed=1000 * 0 + 2)  # the run's test slices
    pos = vq.phantom_positions(12, seed=2)
    out = vq.surprise(vqvae, prior, x, settings["threshold"], pos, settings["sigma"], batch_size=5)
    assert out["map"].shape == out["healed"].shape == x.shape and out["score"].shape == (12,)
    assert torch.equal(out["redo"], out["bits"] > settings["threshold"])
    assert torch.equal(out["healed_codes"][~out["redo"]], out["codes"][~out["redo"]])  # below the threshold: kept
    assert torch.equal(out["codes"], vqvae.encode(x)) and (out["map"] >= 0).all()
    with pytest.raises(ValueError, match="at least one slice"):  # not an IndexError from its empty lists
        vq.surprise(vqvae, prior, x[:0], settings["threshold"], pos[:0], settings["sigma"])
    # sample.py --surprise: two inputs of one name, one a two-slice volume
    for k, folder in enumerate(("d1", "d2")):
        (tmp_path / folder).mkdir()
        a = np.moveaxis(x[2 * k:2 * k + 1 + k, 0].numpy(), 0, -1)
        nib.save(nib.Nifti1Image(a if k else a[..., 0], np.eye(4)), str(tmp_path / folder / "case_1_slice_3.nii.gz"))
    (tmp_path / "bad.nii.gz").write_text("not an image")
    with pytest.raises(SystemExit) as e:
        sample.main(["--out", str(tmp_path), "--surprise", str(tmp_path / "bad.nii.gz")])
    assert e.value.code == 2 and "bad.nii.gz" in capsys.readouterr().err
    entries = sample.main(["--out", str(tmp_path), "--surprise", str(tmp_path / "d1" / "case_1_slice_3.nii.gz"),
                           str(tmp_path / "d2" / "case_1_slice_3.nii.gz")])
    assert [e["position"] for e in entries] == [1.0, 0.0, 1.0]  # d1's from its name; d2 is a volume of two
    g, files = torch.Generator().manual_seed(0), [tmp_path / d / "case_1_slice_3.nii.gz" for d in ("d1", "d2")]
    one_by_one = [vq.surprise(vqvae, prior, load_slices([f], (32, 32), cache_dir=False), settings["threshold"],
                              torch.tensor(where), settings["sigma"], generator=g)["score"]
                  for f, where in zip(files, ([1.0], [0.0, 1.0]))]
    assert [e["score"] for e in entries] == pytest.approx(torch.cat(one_by_one).tolist(), abs=1e-7)
    dest = tmp_path / "surprise"
    report = json.loads((dest / "surprise.json").read_text())
    assert [(Path(r["file"]).parent.name, r["slice"]) for r in report["slices"]] == [("d1", 0), ("d2", 0), ("d2", 1)]
    assert [r["score"] for r in report["slices"]] == [e["score"] for e in entries] and report["threshold_bits"] > 0
    # a folder stands for its slice files; a missing path is named before anything is written
    with pytest.raises(SystemExit) as e:
        sample.main(["--out", str(tmp_path), "--surprise", str(tmp_path / "d1"), str(tmp_path / "gone.nii.gz"),
                     "--dest", str(tmp_path / "s2")])
    assert e.value.code == 2 and "gone.nii.gz" in capsys.readouterr().err and not (tmp_path / "s2").exists()
    calls, each = [], vq.surprise
    monkeypatch.setattr(vq, "surprise", lambda vqvae, prior, x, *a: calls.append(len(x)) or each(vqvae, prior, x, *a))
    again = sample.main(["--out", str(tmp_path), "--surprise", str(tmp_path / "d1"), str(tmp_path / "d2"),
                         "--dest", str(tmp_path / "s2")])
    assert [e["score"] for e in again] == [e["score"] for e in entries] and calls == [3]  # both files in one call
    for name, shape in (("000_case_1_slice_3", (32, 32)), ("001_case_1_slice_3", (32, 32, 2))):
        for kind in ("surprise", "healed"):
            arr = np.asanyarray(nib.load(str(dest / f"{name}_{kind}.nii.gz")).dataobj)
            assert arr.shape == shape and arr.dtype == np.float32 and arr.min() >= 0
        assert (dest / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "also holds" not in capsys.readouterr().out
    sample.main(["--out", str(tmp_path), "--surprise", str(tmp_path / "d1")])  # fewer inputs: the old ones named
    assert "also holds 3 file(s) not of this run (001_case_1_slice_3.png, ...)" in capsys.readouterr().out
    assert [r["file"] for r in json.loads((dest / "surprise.json").read_text())["slices"]] == [str(files[0])]
    os.symlink("loop_b", tmp_path / "d1" / "loop_a")  # a symlink loop beside the slice: no slice file, passed over
    os.symlink("loop_a", tmp_path / "d1" / "loop_b")  # (its is_file() raises ELOOP)
    looped = sample.main(["--out", str(tmp_path), "--surprise", str(files[0]), "--dest", str(tmp_path / "s3")])
    assert [e["position"] for e in looped] == [1.0]
    monkeypatch.setattr(sample, "_positions_of", lambda *a: sample.fail("a folder that cannot be read"))
    with pytest.raises(SystemExit):  # the positions come from the inputs' folders, read before any write
        sample.main(["--out", str(tmp_path), "--surprise", str(files[0]), "--dest", str(tmp_path / "s4")])
    assert not (tmp_path / "s4").exists()
    monkeypatch.undo()
    save(tmp_path / "d1" / "volume.nii.gz", np.stack([x[0, 0].numpy()] * 3, -1))  # a neighbour without slice_Z
    beside = sample.main(["--out", str(tmp_path), "--surprise", str(files[0]), "--dest", str(tmp_path / "s5")])
    assert [e["position"] for e in beside] == [1.0] and "no position" not in capsys.readouterr().out
    s6, d1d2 = tmp_path / "s6", [str(tmp_path / "d1" / "case_1_slice_3.nii.gz"), str(tmp_path / "d2")]
    sample.main(["--out", str(tmp_path), "--surprise", *d1d2, "--dest", str(s6)])  # an earlier run there
    real_surprise, calls = vq.surprise, []

    def stopped_at_the_second(*a):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_surprise(*a)
    monkeypatch.setattr(sample, "_runs", lambda inputs: ([item] for item in enumerate(inputs)))  # a call a file
    monkeypatch.setattr(vq, "surprise", stopped_at_the_second)
    with pytest.raises(SystemExit):  # Ctrl-C at the second file: surprise.json indexes the first, not the earlier run
        sample.main(["--out", str(tmp_path), "--surprise", *d1d2[::-1], "--dest", str(s6)])
    out = capsys.readouterr().out
    assert f"stopped after 2 of 3 slices: surprise.json in {s6} lists them" in out
    assert "also holds 3 file(s) not of this run (001_case_1_slice_3.png, ...)" in out
    assert [r["file"] for r in json.loads((s6 / "surprise.json").read_text())["slices"]] == [str(files[1])] * 2
