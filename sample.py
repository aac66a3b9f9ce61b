"""Generate new slices with the trained prior, or reconstruct given slices with the VQ-VAE.

    python sample.py --n 16                        # PNG grid + one .nii.gz per sample
    python sample.py --reconstruct a.nii.gz b.nii.gz
    python sample.py --bench --n 16                # cached sampler against the naive one
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import vq


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        fail(f"{message} (see --help)")


def parse_args(argv=None):
    p = _Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out", help="the training output folder holding model.pt (default out)")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default cuda when present)")
    p.add_argument("--dest", default=None, help="where to write (default OUT/samples_seedS_tT)")
    p.add_argument("--reconstruct", nargs="+", metavar="PATH", help="slices to reconstruct")
    p.add_argument("--bench", action="store_true", help="time the cached sampler against the naive one")
    args = p.parse_args(argv)
    if args.n < 1:
        fail(f"--n must be at least 1, got {args.n}")
    if not args.temperature > 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    return args


def _load(args, need_prior):
    path = Path(args.out) / "model.pt"
    if not path.exists():
        raise vq.CheckpointError(f"no checkpoint at {path}: run train.py first (or pass --out)")
    ckpt = vq.load_checkpoint(path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vqvae = vq.VQVAE.from_checkpoint(ckpt).to(device)
    prior = None
    if need_prior:
        if "prior" not in ckpt:
            raise vq.CheckpointError(f"{path} has no prior: train it with `python train.py --stage prior`")
        prior = vq.PixelCNN.from_checkpoint(ckpt).to(device)
    return ckpt, vqvae, prior, device


def _save_nifti(path, image):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ascontiguousarray(image, dtype=np.float32), np.eye(4)), str(path))


def generate(args):
    ckpt, vqvae, prior, device = _load(args, need_prior=True)
    dest = Path(args.dest or Path(args.out) / f"samples_seed{args.seed}_t{args.temperature:g}")
    dest.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device).manual_seed(args.seed)
    images = vqvae.decode(prior.generate(args.n, args.temperature, generator=g)).float().cpu()  # (n, 1, H, W)
    vq.save_png(dest / "grid.png", vq.image_grid(images, ncol=8, rot90=ckpt["data"]["rot90"]))
    for i, im in enumerate(images):
        _save_nifti(dest / f"sample_{i:03d}.nii.gz", im[0].numpy())  # as stored: the input slices' orientation
    print(f"wrote {args.n} samples to {dest} (grid.png and sample_*.nii.gz)")
    return images


def reconstruct(args):
    ckpt, vqvae, _, device = _load(args, need_prior=False)
    size = tuple(ckpt["data"]["size"])
    dest = Path(args.dest or Path(args.out) / "reconstructions")
    results = []
    for path in args.reconstruct:
        x = vq.load_slices([path], size, strict=True, cache_dir=False)  # (S, 1, H, W): S slices of one file
        with torch.no_grad():
            r = vqvae.decode(vqvae.encode(x.to(device))).float().cpu()
        s = vq.ssim(x, r)
        name = Path(path).name.split(".")[0]
        vq.save_png(dest / f"{name}.png", vq.image_grid(torch.cat([x, r]), ncol=len(x), rot90=ckpt["data"]["rot90"]))
        print(f"{path}: ssim " + " ".join(f"{v:.4f}" for v in s.tolist()))
        results.append(s)
    print(f"input over reconstruction pictures in {dest}")
    return results


def bench(args):
    _, _, prior, device = _load(args, need_prior=True)
    times = {}
    for name, fn in (("cached", prior.generate), ("naive", prior.generate_naive)):
        g = torch.Generator(device).manual_seed(args.seed)
        t = time.perf_counter()
        codes = fn(args.n, args.temperature, generator=g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times[name] = (time.perf_counter() - t, codes)
        print(f"{name:6s} sampler: {times[name][0]:.2f} s for {args.n} maps of {tuple(codes.shape[1:])} codes")
    same = torch.equal(times["cached"][1], times["naive"][1])
    print(f"speed-up {times['naive'][0] / times['cached'][0]:.1f}x | identical codes: {same}")
    return times


def main(argv=None):
    """Parse flags and run; user errors print one line and exit with code 2."""
    args = parse_args(argv)
    try:
        if args.reconstruct:
            return reconstruct(args)
        return bench(args) if args.bench else generate(args)
    except (vq.CheckpointError, vq.DataError) as e:
        fail(str(e))


if __name__ == "__main__":
    main()
