"""VQ-VAE with a gated PixelCNN prior for 2D MRI slices, in one file.

Sections, top to bottom: data, metrics, building blocks, quantizer, VQ-VAE, prior, checkpoints.
Copy this file alone into another project: at top level it needs only torch and numpy
(nibabel is imported by the NIfTI reader, the Triton kernel is optional).
"""

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
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

# ----------------------------------------------------------------------------- metrics


def _gaussian_window(sigma=1.5, truncate=3.5, device=None, dtype=torch.float32):
    radius = int(truncate * sigma + 0.5)  # scikit-image's rule: radius 5, window 11 for sigma 1.5
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def ssim(x, y, data_range=1.0):
    """Structural similarity per image, as scikit-image computes it.

    Equal to `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range)` (window 11, K1 0.01, K2 0.03), averaged
    over the pixels at least 5 from the border, which is where scikit-image averages too.

    Args:
        x, y: (B, 1, H, W) or (B, H, W) tensors, H and W at least 11.
        data_range: the value range of the images (1.0 for [0, 1] images).
    Returns:
        (B,) float32 tensor of SSIM values.
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.reshape(-1, 1, *x.shape[-2:])  # (B, 1, H, W)
    y = y.reshape(-1, 1, *y.shape[-2:])
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11 x 11, got {tuple(x.shape[-2:])}")
    dtype = torch.float64 if x.device.type == "cpu" else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    g = _gaussian_window(device=x.device, dtype=dtype)
    k = len(g)

    def blur(t):  # separable Gaussian, 'valid' region only: the border scikit-image crops away
        t = F.conv2d(t, g.view(1, 1, k, 1))
        return F.conv2d(t, g.view(1, 1, 1, k))

    stats = blur(torch.cat([x, y, x * x, y * y, x * y], 1).view(-1, 1, *x.shape[-2:]))
    ux, uy, uxx, uyy, uxy = stats.view(x.shape[0], 5, *stats.shape[-2:]).unbind(1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean((-2, -1)).float()


def psnr(x, y, data_range=1.0):
    """Peak signal-to-noise ratio in dB per image; (B,) float32."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-10))


# ----------------------------------------------------------------------------- building blocks


class ResBlock(nn.Module):
    """Pre-activation residual block: 3x3 then 1x1 convolution."""

    def __init__(self, channels):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x):
        return x + self.net(x)


def _n_halvings(downsample):
    if downsample not in (4, 8):
        raise ValueError(f"downsample must be 4 or 8, got {downsample}")
    return int(math.log2(downsample))


class Encoder(nn.Module):
    """Strided 4x4 convolutions halve the image log2(downsample) times, then residual blocks."""

    def __init__(self, in_channels, channels, code_dim, downsample, n_res_blocks):
        super().__init__()
        n = _n_halvings(downsample)
        widths = [channels // 2 ** (n - 1 - i) for i in range(n)]  # widen as resolution drops
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 4, stride=2, padding=1)] + ([nn.ReLU()] if i < n - 1 else [])
            c = w
        layers += [nn.Conv2d(c, channels, 3, padding=1)]
        layers += [ResBlock(channels) for _ in range(n_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(channels, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of the encoder: residual blocks, then 4x4 transposed convolutions back to full size."""

    def __init__(self, out_channels, channels, code_dim, downsample, n_res_blocks):
        super().__init__()
        n = _n_halvings(downsample)
        layers = [nn.Conv2d(code_dim, channels, 3, padding=1)]
        layers += [ResBlock(channels) for _ in range(n_res_blocks)]
        c = channels
        for i in range(n):
            w = out_channels if i == n - 1 else c // 2
            layers += [nn.ReLU(), nn.ConvTranspose2d(c, w, 4, stride=2, padding=1)]
            c = w
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


# ----------------------------------------------------------------------------- quantizer


def _nearest_code_torch(z, codebook, chunk=8192):
    # Used only when vq.py is copied without kernels/: chunked so memory stays bounded for any N.
    c_sq = codebook.pow(2).sum(1)
    codes = torch.cat([torch.addmm(c_sq, zc, codebook.t(), alpha=-2).argmin(1) for zc in z.split(chunk)])
    return codes, (z - codebook[codes]).pow(2).sum(1)


def nearest_code(z, codebook):
    """Index of the nearest codebook row for every row of z, and its squared distance.

    z (N, D) and codebook (K, D), float. Returns int64 codes (N,) and float32 distances (N,).
    Uses `kernels.nearest_code` (fused Triton kernel on a GPU, chunked torch elsewhere) when the
    kernels package is importable, else a chunked torch search.
    """
    if len(z) == 0:
        return torch.empty(0, dtype=torch.long, device=z.device), z.new_empty(0, dtype=torch.float32)
    if _kernel_nearest_code is not None:
        return _kernel_nearest_code(z, codebook)
    return _nearest_code_torch(z.float(), codebook.float())


def _all_reduce(t):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """EMA codebook with Laplace smoothing, commitment loss, dead-code restart, k-means init."""

    def __init__(self, n_codes, code_dim, beta=0.25, decay=0.99, dead_threshold=1.0, kmeans_init=True,
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
        self.generator = None  # a torch.Generator for restarts; train.py sets and checkpoints it

    def forward(self, z):
        """z (B, D, h, w) -> (z_q straight-through, codes (B, h, w), loss, stats)."""
        with torch.autocast(z.device.type, enabled=False):  # distances and EMA need float32
            z = z.float()
            B, D, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (N, D)
            if self.training and not bool(self.initialised):
                self._kmeans(flat.detach())
            codes, _ = nearest_code(flat.detach(), self.codebook)
            counts = torch.bincount(codes, minlength=self.n_codes).float()  # (K,) no N x K one-hot
            if self.training:
                self._ema_update(flat.detach(), codes, counts)
            z_q = self.codebook[codes].view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
            loss = self.beta * F.mse_loss(z, z_q.detach())
            z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient reaches the encoder
            p = counts / counts.sum().clamp_min(1)
            stats = {
                "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()),
                "usage": (counts > 0).float().mean(),
            }
        return z_q, codes.view(B, h, w), loss, stats

    @torch.no_grad()
    def _ema_update(self, flat, codes, counts):
        embed_sum = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)  # (K, D)
        counts = _all_reduce(counts.clone())  # every rank sees every rank's vectors
        _all_reduce(embed_sum)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.n_codes * self.eps) * n  # Laplace
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
        self._restart_dead(flat)

    @torch.no_grad()
    def _restart_dead(self, flat):
        # cluster_size is identical on every rank (all-reduced), so every rank agrees on `dead`.
        dead = self.cluster_size < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(len(flat), (n_dead,), generator=self.generator, device="cpu").to(flat.device)
        self.codebook[dead] = flat[pick]
        self.cluster_size[dead] = self.dead_threshold
        self.embed_sum[dead] = flat[pick] * self.dead_threshold
        self._broadcast()

    @torch.no_grad()
    def _kmeans(self, flat, iters=10):
        # Seed the codebook from the data so no code starts far from every encoder output.
        pick = torch.randint(len(flat), (self.n_codes,), generator=self.generator, device="cpu")
        centres = flat[pick.to(flat.device)].clone()  # (K, D)
        for _ in range(iters):
            codes, _ = nearest_code(flat, centres)
            counts = torch.bincount(codes, minlength=self.n_codes).float()
            sums = torch.zeros_like(centres).index_add_(0, codes, flat)
            used = counts > 0
            centres[used] = sums[used] / counts[used].unsqueeze(1)
        self.codebook.copy_(centres)
        self.embed_sum.copy_(centres)
        self.cluster_size.fill_(1.0)
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
    dead_threshold: float = 1.0  # restart a code whose EMA count falls below this
    kmeans_init: bool = True  # seed the codebook by k-means on the first batch


class VQVAE(nn.Module):
    """Encoder, vector quantizer and decoder."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = c = config
        self.encoder = Encoder(c.in_channels, c.channels, c.code_dim, c.downsample, c.n_res_blocks)
        self.quantizer = VectorQuantizer(c.n_codes, c.code_dim, c.beta, c.decay, c.dead_threshold,
                                         c.kmeans_init)
        self.decoder = Decoder(c.in_channels, c.channels, c.code_dim, c.downsample, c.n_res_blocks)

    def forward(self, x):
        """x (B, C, H, W) -> (recon, loss, stats); loss = reconstruction MSE + commitment."""
        z = self.encoder(x)  # (B, D, h, w)
        z_q, codes, commit, stats = self.quantizer(z)
        recon = self.decoder(z_q)  # (B, C, H, W)
        mse = F.mse_loss(recon.float(), x.float())
        stats.update(recon=mse.detach(), commit=commit.detach())
        return recon, mse + commit, stats

    @torch.no_grad()
    def encode(self, x):
        """x (B, C, H, W) -> codes (B, h, w) int64."""
        return self.quantizer(self.encoder(x))[1]

    @torch.no_grad()
    def decode(self, codes):
        """codes (B, h, w) -> images (B, C, H, W), clamped to [0, 1]."""
        z_q = self.quantizer.codebook[codes].permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decoder(z_q).clamp(0, 1)

    @classmethod
    def from_checkpoint(cls, path_or_ckpt, map_location="cpu"):
        ckpt = _as_checkpoint(path_or_ckpt, map_location)
        return _build(cls, VQVAEConfig, ckpt, "vqvae")


# ----------------------------------------------------------------------------- prior


@dataclass
class PriorConfig:
    n_codes: int = 512  # K, codebook size of the VQ-VAE
    height: int = 32  # h, code map rows (the position embedding is learned for this size)
    width: int = 16  # w, code map columns
    prior_channels: int = 64  # C, hidden width: ~1M weights, about one per code of a 2000-map data set
    prior_layers: int = 10  # gated layers; with the dilations below every earlier code is in reach
    prior_dilations: tuple = (1, 2, 4, 8, 16)  # cycled over layers: two cycles reach 63 rows up, 62 columns aside
    prior_dropout: float = 0.1  # on the gated outputs, because small data sets overfit without it


def gated_tanh(x):
    """tanh of the first half of the channels times sigmoid of the second half."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One layer of both stacks: vertical sees rows <= i, horizontal sees columns <= j of row i."""

    def __init__(self, channels, dilation, dropout):
        super().__init__()
        C, d = channels, dilation
        self.dilation = d
        self.vconv = nn.Conv2d(C, 2 * C, (2, 3), dilation=d)  # taps: rows i-d, i x columns j-d, j, j+d
        self.hconv = nn.Conv2d(C, 2 * C, (1, 2), dilation=d)  # taps: columns j-d, j of row i
        self.v2h = nn.Conv2d(2 * C, 2 * C, 1)  # hands the horizontal stack everything above its row
        self.hout = nn.Conv2d(C, C, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, v, h):
        d = self.dilation
        v_pre = self.vconv(F.pad(v, (d, d, d, 0)))  # (B, 2C, h, w), from rows <= i
        above = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]  # shifted down a row: from rows < i only
        h_pre = self.hconv(F.pad(h, (d, 0))) + self.v2h(above)  # (B, 2C, h, w)
        v = v + self.drop(gated_tanh(v_pre))
        h = h + self.hout(self.drop(gated_tanh(h_pre)))  # residual: the horizontal stack goes deep
        return v, h


class PixelCNN(nn.Module):
    """Gated PixelCNN prior over VQ-VAE code maps, with a learned position embedding."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = c = config
        self.embed = nn.Embedding(c.n_codes, c.prior_channels)
        # where in the map a code sits, so the prior can place anatomy consistently
        self.pos = nn.Parameter(torch.randn(1, c.prior_channels, c.height, c.width))
        self.layers = nn.ModuleList(
            GatedLayer(c.prior_channels, c.prior_dilations[k % len(c.prior_dilations)], c.prior_dropout)
            for k in range(c.prior_layers)
        )
        # channel-last, so the cached sampler calls the same modules on (n, C) rows
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(c.prior_channels, c.prior_channels), nn.ReLU(),
                                  nn.Linear(c.prior_channels, c.n_codes))

    def forward(self, codes):
        """codes (B, h, w) int64 -> logits (B, K, h, w); logits at (i, j) see codes before (i, j) only."""
        c = self.config
        if codes.dim() != 3 or tuple(codes.shape[1:]) != (c.height, c.width):
            raise ValueError(f"codes must be (B, {c.height}, {c.width}), got {tuple(codes.shape)}")
        x = self.embed(codes).permute(0, 3, 1, 2)  # (B, C, h, w)
        v = x + self.pos
        h = F.pad(x, (1, 0))[..., :-1] + self.pos  # shifted right a column: codes left of j only
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, K, h, w)

    def loss(self, codes):
        """Mean cross-entropy per code as (nats, bits)."""
        nats = F.cross_entropy(self(codes), codes)
        return nats, nats / math.log(2)

    def _gumbel(self, n, temperature, generator):
        """Gumbel noise (n, h, w, K), drawn up front so both samplers use the same numbers."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n}")
        c, p = self.config, self.pos
        u = torch.rand(n, c.height, c.width, c.n_codes, generator=generator, dtype=p.dtype, device=p.device)
        eps = torch.finfo(p.dtype).eps
        return -torch.log(-torch.log(u.clamp_(eps, 1 - eps)))

    @torch.no_grad()
    def generate(self, n, temperature=1.0, generator=None):
        """Sample n code maps in raster order: returns codes (n, h, w) int64.

        Incremental: the vertical stack runs once per finished row, on cached activations of the
        rows above; the horizontal stack runs once per position, on the cached columns its
        kernels reach; so a position costs a few (n, 2C) matmuls per layer instead of a forward.
        Code (i, j) is argmax(logits / temperature + Gumbel noise), the noise drawn up front from
        `generator`, so `generate_naive` returns the same codes for the same generator state (up
        to float rounding at near-ties). Dropout is never applied.

        n: number of maps, >= 1. temperature: > 0; below 1 sharpens, above 1 flattens.
        generator: a torch.Generator on the model's device, for reproducible samples.
        """
        return self._generate_cached(self._gumbel(n, temperature, generator), temperature)[0]

    def _generate_cached(self, g, temperature):
        """The cached sampler on noise g (n, h, w, K): returns codes (n, h, w) and logits (n, h, w, K)."""
        c, layers, emb = self.config, self.layers, self.embed.weight
        n, H, W, C = g.shape[0], c.height, c.width, c.prior_channels
        pos = self.pos[0].permute(1, 2, 0)  # (h, w, C)
        # per layer: its vertical input for every row so far, zero-padded as forward pads it
        vbuf = [g.new_zeros(n, C, L.dilation + H, W + 2 * L.dilation) for L in layers]
        # per layer: its horizontal input along the current row, channel-last, left-padded
        hbuf = [g.new_zeros(n, L.dilation + W, C) for L in layers]
        # per layer: the row above's v2h term plus the hconv bias, (n, w, 2C); nothing above row 0
        vh = [(L.v2h.bias + L.hconv.bias).expand(n, W, 2 * C) for L in layers]
        # hconv's two taps as one (2C, 2C) matrix for the (n, 2, C) window [j - d, j]
        wh = [L.hconv.weight[:, :, 0].permute(0, 2, 1).reshape(2 * C, 2 * C).t() for L in layers]
        wo = [L.hout.weight.flatten(1).t() for L in layers]
        codes = torch.zeros(n, H, W, dtype=torch.long, device=g.device)
        logits = torch.empty_like(g)
        for i in range(H):
            for j in range(W):
                x = pos[i, j] + emb[codes[:, i, j - 1]] if j else pos[i, j].expand(n, C)  # (n, C)
                for L, hb, b, w1, w2 in zip(layers, hbuf, vh, wh, wo):
                    d = L.dilation
                    hb[:, d + j] = x
                    pre = torch.addmm(b[:, j], hb[:, j:j + d + 1:d].reshape(n, 2 * C), w1)  # (n, 2C)
                    x = x + torch.addmm(L.hout.bias, gated_tanh(pre), w2)
                logits[:, i, j] = self.head(x)
                codes[:, i, j] = (logits[:, i, j] / temperature + g[:, i, j]).argmax(-1)
            if i + 1 == H:
                break
            v = pos[i].t() + emb[codes[:, i]].transpose(1, 2)  # (n, C, w)
            for k, L in enumerate(layers):
                d = L.dilation
                vbuf[k][:, :, d + i, d:d + W] = v
                v_pre = F.conv2d(vbuf[k][:, :, i:i + d + 1], L.vconv.weight, L.vconv.bias, dilation=d)
                vh[k] = (L.v2h(v_pre)[:, :, 0] + L.hconv.bias[:, None]).transpose(1, 2)  # (n, w, 2C)
                v = v + gated_tanh(v_pre[:, :, 0])
        return codes, logits

    @torch.no_grad()
    def generate_naive(self, n, temperature=1.0, generator=None):
        """Reference sampler: a full forward per position, same noise and codes as `generate`."""
        g = self._gumbel(n, temperature, generator)
        codes = torch.zeros(g.shape[:3], dtype=torch.long, device=g.device)
        training = self.training
        self.eval()  # no dropout, as in the cached sampler
        try:
            for i in range(self.config.height):
                for j in range(self.config.width):
                    logits = self(codes)[:, :, i, j]  # (n, K)
                    codes[:, i, j] = (logits / temperature + g[:, i, j]).argmax(-1)
        finally:
            self.train(training)
        return codes


    @classmethod
    def from_checkpoint(cls, path_or_ckpt, map_location="cpu"):
        ckpt = _as_checkpoint(path_or_ckpt, map_location)
        return _build(cls, PriorConfig, ckpt, "prior")



# ----------------------------------------------------------------------------- checkpoints and files


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, unsafe or lacks a part."""


def save_checkpoint(obj, path):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load with weights_only=True, so a checkpoint can hold tensors and plain data, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types; the user needs one line either way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path} is not a safe checkpoint (it asks to run code): refused") from None
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {first}") from None


def _as_checkpoint(path_or_ckpt, map_location):
    return path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt, map_location)


def _build(cls, config_cls, ckpt, name):
    if name not in ckpt or f"{name}_config" not in ckpt:
        raise CheckpointError(f"the checkpoint has no {name}")
    known = {f.name for f in fields(config_cls)}
    model = cls(config_cls(**{k: v for k, v in ckpt[f"{name}_config"].items() if k in known}))
    model.load_state_dict(ckpt[name])
    return model.eval()


def save_png(path, image):
    """Write a 2-D array in [0, 1] as an 8-bit greyscale PNG, with zlib alone (no imaging library)."""
    import struct
    import zlib

    a = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in a)  # filter type 0 per scanline

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(png)


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
