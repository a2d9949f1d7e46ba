"""Causal temporal VAE: video (B, 3, T, H, W) <-> latents (B, C, F, h, w).

READ (arXiv 2508.03457) builds its speed on a temporal VAE that compresses video
32x32x8 pixels per latent token (the LTX-Video geometry), so the A2V-DiT sees few
tokens. That compression ratio is the paper's; everything else here is our
reconstruction, following LTX-Video and DESIGN.md section 4:

- Causal in time. Every 3D convolution pads only on the past side, so latent frame f
  never sees a video frame after it. A clip of T = 1 + s_t*k frames maps to F = 1 + k
  latent frames: the first latent frame encodes frame 0 alone, so a still image is a
  1-frame video (the reference image uses the same encoder).
- Streaming. Because nothing looks ahead, encode and decode run chunk by chunk with a
  carried cache (the last k_t - 1 inputs of each convolution) and give the same result
  as the whole clip, in memory bounded by the chunk.
- Cheap steps. The input is folded 4x4 pixels into channels (LTX-Video's patchify), so
  at 32 px the convolutions run on an 8x8 grid; the tiny preset convolves each frame on
  its own (`time_kernel` 1, a third of the cost of a 3x3x3 kernel) at the finest and the
  latent level and mixes time at the 4x4 level between them; normalisation never mixes
  frames (GroupNorm per frame, or the tiny preset's LayerNorm over each pixel's channels),
  so causality holds; the posterior log-variance starts low (-6) and the output layer at
  mid-grey (zero), which keeps early training stable.
- Down/up-sampling is space-to-depth / depth-to-space: a time step folds frames
  (2j-1, 2j) into latent j, with frame 0 repeated into the past for latent 0. With
  `shortcut` (DC-AE's residual autoencoding) a parameter-free path runs beside each one
  and beside the latent projections: channels averaged in groups on the way down,
  repeated on the way up, so the convolutions learn a residual on top of plain pooling.
- Loss: L1 plus a squared error, with extra weight on a region mask (the mouth in the
  toy world; optional, so real footage trains with plain weights), plus a small KL to a
  unit Gaussian. Latents for the DiT are standardised per channel
  with buffers fitted after training (`encode_latents` / `decode_latents`).
- Data: frames within a clip are near-duplicates, so the recipe trains on many distinct
  faces: 1600 babble identities rendered in memory from the seed (frames only, none of
  them a toy set's face), scored on the held-out identities of a rendered toy set's test
  split.
- Optimiser: Muon (minread/optim.py) for every conv filter, AdamW for biases and norm
  gains. At equal steps it beats AdamW by about 2 dB of held-out PSNR here.
- Budget: the recipe is a wall-clock budget (19 minutes, rendering included), not a step
  count: steps 20-60 are timed and the cosine schedule is cut to the steps that fit.

Training, evaluation and checkpoints are plain functions at the bottom of this file:
`vae_loss`, `train_vae` (explicit loop, time budget, atomic checkpoints, exact resume),
`evaluate_vae` (held-out PSNR and LipCorr) and `load_vae`.
"""

import math
import random
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from minread.data import ToyClipDataset, load_checkpoint, render_clip, save_checkpoint
from minread.metrics import lip_corr, mouth_mask, psnr, read_opening
from minread.optim import Muon, split_params


@dataclass
class VAEConfig:
    image_size: int = 32            # H = W of the frames the preset is meant for
    spatial: int = 8                # s: pixels per latent cell along H and along W
    temporal: int = 4               # s_t: video frames per latent frame (after frame 0)
    latent_channels: int = 16       # C
    patch: int = 4                  # pixels folded into channels at input and output
    widths: tuple = (48, 64, 96)    # conv width per level, finest first (len = levels)
    blocks: int = 1                 # residual blocks per level
    groups: int = 8                 # GroupNorm groups (statistics per frame)
    time_kernel: tuple = ()         # temporal taps of the convs per level, finest first (1 = per
                                    # frame, no temporal mixing); () = 3 at every level
    logvar_init: float = -6.0       # initial posterior log-variance
    norm: str = "group"             # "group": GroupNorm per frame; "channel": LayerNorm over the
                                    # channels of each pixel of each frame
    shortcut: bool = False          # parameter-free paths around every down/up-sampling and the
                                    # latent projections (channel averaging / duplicating)

    def __post_init__(self):
        self.widths, self.time_kernel = tuple(self.widths), tuple(self.time_kernel) or (3,) * self.levels
        for name in ("spatial", "temporal", "patch"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"VAEConfig.{name}={v}: must be a power of two (1, 2, 4, ...)")
        if self.spatial % self.patch:
            raise ValueError(f"VAEConfig: patch={self.patch} must divide spatial={self.spatial}")
        if len(self.widths) != self.levels:
            raise ValueError(f"VAEConfig: spatial={self.spatial}, patch={self.patch}, temporal={self.temporal} "
                             f"need {self.levels} widths (one per level), got {len(self.widths)}: {self.widths}")
        if len(self.time_kernel) != self.levels:
            raise ValueError(f"VAEConfig: need {self.levels} time_kernel entries (one per level), got {self.time_kernel}")
        if self.norm not in ("group", "channel"):
            raise ValueError(f"VAEConfig.norm={self.norm!r}: use 'group' or 'channel'")
        if self.shortcut:                                           # folded width of level i -> width of i + 1
            w, C = self.widths, self.latent_channels
            fold = [(4 if i < self.space_downs else 1) * (2 if i < self.time_downs else 1) for i in range(self.levels - 1)]
            pairs = [(w[i] * fold[i], w[i + 1]) for i in range(self.levels - 1)] + [(w[-1], C)]
            if not all(can_match(a, b) for a, b in pairs):
                raise ValueError(f"VAEConfig: shortcut needs each level's folded width and the next width (and the last "
                                 f"width and latent_channels={C}) to divide one another; widths {w} give {pairs}")
        if any(w % self.groups for w in self.widths):
            raise ValueError(f"VAEConfig: every width in {self.widths} must be a multiple of groups={self.groups}")

    @property
    def space_downs(self):
        return int(math.log2(self.spatial // self.patch))

    @property
    def time_downs(self):
        return int(math.log2(self.temporal))

    @property
    def levels(self):
        return max(self.space_downs, self.time_downs) + 1


def tiny():
    """32 px, 8x8x4, C = 16: trains on a laptop CPU. LayerNorm over channels (GroupNorm over a
    4x4 grid wipes out each frame's colours), parameter-free shortcuts around every
    down/up-sampling (widths chosen so the channel counts divide), convs per frame at the
    finest and the latent level and 3x3x3 at the 4x4 level between them (time is also mixed
    by the temporal folding and the latent-level mid blocks and projections)."""
    return VAEConfig(widths=(48, 96, 96), time_kernel=(1, 3, 1), norm="channel", shortcut=True)


def small():
    """128 px, 32x32x8, C = 64: the paper's compression at a size one GPU trains quickly.
    The tiny preset's LayerNorm and shortcuts; widths that the shortcuts divide."""
    return VAEConfig(image_size=128, spatial=32, temporal=8, latent_channels=64,
                     widths=(64, 128, 256, 256), time_kernel=(1, 3, 3, 1), norm="channel", shortcut=True)


def paper():
    """512 px, 32x32x8, C = 128: READ's geometry, for shapes and parameter counts."""
    return VAEConfig(image_size=512, spatial=32, temporal=8, latent_channels=128,
                     widths=(128, 256, 384, 512), blocks=2, groups=32)


PRESETS = {"tiny": tiny, "small": small, "paper": paper}


# ----------------------------------------------------------------------------- blocks

class CausalConv3d(nn.Module):
    """3D convolution padded on the past side only; `cache` carries the past across chunks."""

    def __init__(self, c_in, c_out, kernel=3, time_kernel=3):
        super().__init__()
        self.kt = time_kernel
        self.conv = nn.Conv3d(c_in, c_out, (time_kernel, kernel, kernel), padding=(0, kernel // 2, kernel // 2))

    def forward(self, x, cache=None):
        """x (B, c_in, T, H, W) -> (B, c_out, T, H, W)."""
        past = self.kt - 1
        if past:
            if cache is not None and self in cache:
                pad = cache[self]                                   # last inputs of the previous chunk
            else:                                                   # clip start: repeat frame 0 into the past
                pad = x[:, :, :1].expand(-1, -1, past, -1, -1)
            x = torch.cat([pad, x], dim=2)                          # (B, c_in, past+T, H, W)
            if cache is not None:
                cache[self] = x[:, :, -past:].detach()
        return self.conv(x)


class FrameNorm(nn.Module):
    """Normalisation whose statistics never mix frames: GroupNorm per frame ("group") or
    LayerNorm over the channels of each pixel ("channel")."""

    def __init__(self, channels, groups, kind="group"):
        super().__init__()
        self.kind = kind
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6) if kind == "group" else nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x):
        if self.kind == "channel":
            return self.norm(x.movedim(1, -1)).movedim(-1, 1)
        B, C, T, H, W = x.shape
        y = self.norm(x.transpose(1, 2).reshape(B * T, C, H, W))   # (B*T, C, H, W)
        return y.reshape(B, T, C, H, W).transpose(1, 2)             # (B, C, T, H, W)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, groups, time_kernel=3, norm="group"):
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(c_in, groups, norm), CausalConv3d(c_in, c_out, 3, time_kernel)
        self.norm2, self.conv2 = FrameNorm(c_out, groups, norm), CausalConv3d(c_out, c_out, 3, time_kernel)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, cache=None):
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


def match_channels(x, c):
    """Parameter-free channel change (B, cx, ...) -> (B, c, ...): the mean of each group of
    cx/c consecutive channels, or each channel repeated c/cx times."""
    cx = x.shape[1]
    if cx >= c:
        return x.unflatten(1, (c, cx // c)).mean(2)
    return x.repeat_interleave(c // cx, dim=1)


def can_match(cx, c):
    return cx % c == 0 or c % cx == 0


class Downsample(nn.Module):
    """Space-to-depth by (st, ss, ss) then a pointwise conv (plus, with `shortcut`, the folded
    input averaged down to c_out channels). In time, latent j gets frames (2j-1, 2j); frame 0
    is repeated into the past so latent 0 sees frame 0 alone."""

    def __init__(self, c_in, c_out, space, time, shortcut=False):
        super().__init__()
        self.ss, self.st = (2 if space else 1), (2 if time else 1)
        self.proj = nn.Conv3d(c_in * self.ss * self.ss * self.st, c_out, 1)
        self.shortcut = shortcut

    def forward(self, x, cache=None):
        B, C, T, H, W = x.shape
        st, ss = self.st, self.ss
        if st == 2:
            first = cache is None or self not in cache
            if cache is not None:
                cache[self] = True
            if first:
                x = torch.cat([x[:, :, :1], x], dim=2)              # (B, C, 1+T, H, W)
            if x.shape[2] % 2:
                raise ValueError(f"streaming encode: a chunk after the first needs a multiple of the "
                                 f"temporal factor frames (got one that leaves {T} frames at a level)")
        T2 = x.shape[2] // st
        x = x.reshape(B, C, T2, st, H // ss, ss, W // ss, ss)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)                       # (B, C, st, ss, ss, T2, h, w)
        x = x.reshape(B, C * st * ss * ss, T2, H // ss, W // ss)
        y = self.proj(x)
        return y + match_channels(x, y.shape[1]) if self.shortcut else y


class Upsample(nn.Module):
    """Pointwise conv (plus, with `shortcut`, the input's channels repeated up to its width)
    then depth-to-space: latent j -> frames (2j-1, 2j); frame -1 is dropped."""

    def __init__(self, c_in, c_out, space, time, shortcut=False):
        super().__init__()
        self.ss, self.st = (2 if space else 1), (2 if time else 1)
        self.c_out = c_out
        self.proj = nn.Conv3d(c_in, c_out * self.ss * self.ss * self.st, 1)
        self.shortcut = shortcut

    def forward(self, x, cache=None):
        B, _, T, H, W = x.shape
        st, ss, C = self.st, self.ss, self.c_out
        y = self.proj(x)
        if self.shortcut:
            y = y + match_channels(x, y.shape[1])
        x = y.reshape(B, C, st, ss, ss, T, H, W)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)                       # (B, C, T, st, H, ss, W, ss)
        x = x.reshape(B, C, T * st, H * ss, W * ss)
        if st == 2:
            first = cache is None or self not in cache
            if cache is not None:
                cache[self] = True
            if first:
                x = x[:, :, 1:]                                     # latent 0 decodes to frame 0 alone
        return x


def patchify(video, p):
    """(B, 3, T, H, W) -> (B, 3*p*p, T, H/p, W/p): pixels of each p x p patch become channels."""
    B, c, T, H, W = video.shape
    x = video.reshape(B, c, T, H // p, p, W // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(B, c * p * p, T, H // p, W // p)


def unpatchify(x, p):
    """(B, 3*p*p, T, H/p, W/p) -> (B, 3, T, H, W)."""
    B, cpp, T, h, w = x.shape
    x = x.reshape(B, cpp // (p * p), p, p, T, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(B, cpp // (p * p), T, h * p, w * p)


# ----------------------------------------------------------------------------- model

class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w, g, kt = cfg.widths, cfg.groups, cfg.time_kernel
        self.conv_in = CausalConv3d(3 * cfg.patch ** 2, w[0], 3, kt[0])
        self.blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        for i in range(cfg.levels):
            self.blocks.append(nn.ModuleList(ResBlock(w[i], w[i], g, kt[i], cfg.norm) for _ in range(cfg.blocks)))
            if i < cfg.levels - 1:
                self.downs.append(Downsample(w[i], w[i + 1], i < cfg.space_downs, i < cfg.time_downs, cfg.shortcut))
        self.mid = ResBlock(w[-1], w[-1], g, 3, cfg.norm)
        self.norm_out = FrameNorm(w[-1], g, cfg.norm)
        self.conv_out = CausalConv3d(w[-1], 2 * cfg.latent_channels)
        C = cfg.latent_channels                                    # start the posterior nearly deterministic
        nn.init.zeros_(self.conv_out.conv.bias[:C])
        nn.init.constant_(self.conv_out.conv.bias[C:], cfg.logvar_init)
        self.conv_out.conv.weight.data[C:] *= 0.01
        self.shortcut = cfg.shortcut

    def forward(self, x, cache=None):
        """x (B, 3*p*p, T, H/p, W/p) -> (B, 2C, F, h, w)."""
        x = self.conv_in(x, cache)
        for i, blocks in enumerate(self.blocks):
            for block in blocks:
                x = block(x, cache)
            if i < len(self.downs):
                x = self.downs[i](x, cache)
        x = self.mid(x, cache)
        h = self.conv_out(F.silu(self.norm_out(x)), cache)
        if self.shortcut:                                          # the mean path (not the log-variance)
            C = h.shape[1] // 2
            h = torch.cat([h[:, :C] + match_channels(x, C), h[:, C:]], dim=1)
        return h


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w, g, kt = cfg.widths, cfg.groups, cfg.time_kernel
        self.conv_in = CausalConv3d(cfg.latent_channels, w[-1])
        self.mid = ResBlock(w[-1], w[-1], g, 3, cfg.norm)
        self.blocks, self.ups = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(cfg.levels)):                      # coarsest level first
            if i < cfg.levels - 1:
                self.ups.append(Upsample(w[i + 1], w[i], i < cfg.space_downs, i < cfg.time_downs, cfg.shortcut))
            self.blocks.append(nn.ModuleList(ResBlock(w[i], w[i], g, kt[i], cfg.norm) for _ in range(cfg.blocks)))
        self.norm_out = FrameNorm(w[0], g, cfg.norm)
        self.conv_out = CausalConv3d(w[0], 3 * cfg.patch ** 2, 3, kt[0])
        self.shortcut = cfg.shortcut
        nn.init.zeros_(self.conv_out.conv.weight)                   # start at mid-grey (0 in [-1, 1])
        nn.init.zeros_(self.conv_out.conv.bias)

    def forward(self, z, cache=None):
        """z (B, C, F, h, w) -> (B, 3*p*p, T, H/p, W/p)."""
        x = self.conv_in(z, cache)
        if self.shortcut:
            x = x + match_channels(z, x.shape[1])
        x = self.mid(x, cache)
        for i, blocks in enumerate(self.blocks):
            if i > 0:
                x = self.ups[i - 1](x, cache)
            for block in blocks:
                x = block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class VAE(nn.Module):
    """Causal video VAE. `cache` (a dict, start with {}) makes encode/decode stream chunk by chunk."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        C = cfg.latent_channels
        self.register_buffer("latent_mean", torch.zeros(C))        # fitted after training
        self.register_buffer("latent_std", torch.ones(C))

    def latent_frames(self, T):
        return 1 + (T - 1) // self.cfg.temporal

    def _check_video(self, video, cache):
        cfg = self.cfg
        if video.dim() != 5 or video.shape[1] != 3:
            hint = " (a still image (B, 3, H, W) is a 1-frame video: video.unsqueeze(2))" if video.dim() == 4 else ""
            raise ValueError(f"VAE.encode: expected video (B, 3, T, H, W), got shape {tuple(video.shape)}{hint}")
        T, H, W = video.shape[2:]
        if H % cfg.spatial or W % cfg.spatial:
            raise ValueError(f"VAE.encode: frame size {H}x{W} is not a multiple of the spatial factor "
                             f"{cfg.spatial}; resize or crop the frames")
        first = not cache
        if first and (T - 1) % cfg.temporal:
            k = (T - 1) // cfg.temporal
            raise ValueError(f"VAE.encode: got T={T} frames; the causal VAE needs T = 1 + {cfg.temporal}k "
                             f"frames (e.g. {1 + cfg.temporal * k} or {1 + cfg.temporal * (k + 1)}): trim or pad the clip")
        if not first and T % cfg.temporal:
            raise ValueError(f"VAE.encode: a streaming chunk after the first needs a multiple of "
                             f"{cfg.temporal} frames, got {T}")

    def encode(self, video, cache=None):
        """video (B, 3, T, H, W) in [-1, 1] -> posterior (mean, logvar), each (B, C, F, h, w)."""
        self._check_video(video, cache)
        h = self.encoder(patchify(video, self.cfg.patch), cache)   # (B, 2C, F, h, w)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z, cache=None):
        """z (B, C, F, h, w) -> video (B, 3, T, H, W) with T = 1 + s_t*(F-1) (first chunk)."""
        if z.dim() != 5 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"VAE.decode: expected latents (B, {self.cfg.latent_channels}, F, h, w), "
                             f"got shape {tuple(z.shape)}")
        return unpatchify(self.decoder(z, cache), self.cfg.patch)

    def forward(self, video, sample=True):
        """video -> (reconstruction, mean, logvar); samples z from the posterior when `sample`."""
        mean, logvar = self.encode(video)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return self.decode(z), mean, logvar

    # latents handed to the DiT: posterior mean, standardised per channel
    def encode_latents(self, video, cache=None):
        """video (B, 3, T, H, W) -> z (B, C, F, h, w), roughly unit variance per channel."""
        mean, _ = self.encode(video, cache)
        return (mean - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)

    def decode_latents(self, z, cache=None):
        """Inverse of encode_latents: standardised z (B, C, F, h, w) -> video (B, 3, T, H, W)."""
        if z.dim() != 5 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"VAE.decode_latents: expected latents (B, {self.cfg.latent_channels}, F, h, w), "
                             f"got shape {tuple(z.shape)}")
        z = z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)
        return self.decode(z, cache)

    @torch.no_grad()
    def fit_latent_norm(self, videos):
        """Fit latent_mean / latent_std per channel from an iterable of videos (B, 3, T, H, W)."""
        s, s2, n = 0.0, 0.0, 0
        for video in videos:
            mean, _ = self.encode(video)
            m = mean.transpose(0, 1).reshape(self.cfg.latent_channels, -1).double()  # (C, B*F*h*w)
            s, s2, n = s + m.sum(1), s2 + (m * m).sum(1), n + m.shape[1]
        mu = s / n
        self.latent_mean.copy_(mu.float())
        self.latent_std.copy_((s2 / n - mu * mu).clamp_min(1e-8).sqrt().float())


def decode_stream(vae, latent_chunks, normalised=False):
    """Decode an iterable of latent chunks (B, C, f_i, h, w) one by one with a carried cache.
    Yields video chunks; their concatenation equals decoding all latents at once."""
    cache = {}
    for z in latent_chunks:
        yield vae.decode_latents(z, cache) if normalised else vae.decode(z, cache)


def encode_stream(vae, video_chunks):
    """Encode video chunks (first 1 + s_t*j frames, then multiples of s_t) with a carried
    cache; yields posterior means (B, C, f_i, h, w) equal to slices of encoding the whole."""
    cache = {}
    for video in video_chunks:
        yield vae.encode(video, cache)[0]


def count_parameters(cfg):
    """(encoder, decoder, total) parameter counts of a config, built on the meta device."""
    with torch.device("meta"):
        m = VAE(cfg)
    enc = sum(p.numel() for p in m.encoder.parameters())
    dec = sum(p.numel() for p in m.decoder.parameters())
    return enc, dec, enc + dec


# ----------------------------------------------------------------------------- training

@dataclass
class VAETrainConfig:
    """The tiny recipe: 19 minutes on a 2-core CPU, rendering included. Measured inside
    `python -m minread train --stage all --preset tiny` (2 threads) on data_toy's held-out
    identities (24 clips of 49 frames): 1600 faces rendered in 0.5 min, the probe timed a
    step at 284 ms and planned 3922 steps of 24 five-frame windows, Muon for the filters:
    held-out PSNR 30.6 dB, LipCorr 0.94 (true frames 0.98) in 19.3 min in all (500 steps:
    26.7, 1000: 28.2, 2000: 29.5, 3000: 30.4). The plan now keeps 3% of the budget for the
    evaluations and checkpoints that took those 0.3 minutes past 19.
    Equal-step runs, 3000 steps (one thread each, two at a time; held-out PSNR / LipCorr):
    AdamW on 400 faces (the recipe before) 27.96 / 0.955; AdamW on 1600 faces 28.39 / 0.953;
    Muon on 400 faces 29.90 / 0.940 (step 500: 26.46 against AdamW's 24.02; on its own
    training faces 31.18, the gap more faces close); Muon on 1600 faces 29.75 at step 2000
    (on 400: 29.37). An EMA of the weights (0.999) gained 0.4-0.7 dB mid-run and nothing
    at the end of the cosine schedule, so there is none.
    Before Muon (AdamW; 1000 steps, one thread each unless said): GroupNorm, no shortcuts,
    squared error weighted 1, mouth weight 24: 20.85 / 0.21 (23.2 / 0.92 at 3000 steps);
    LayerNorm over channels 21.25; squared error weighted 10, 30, 100: 22.35, 22.70,
    22.81 / 0.69; mouth weight 8: 23.64 / 0.67 (0 gives up the lips: 0.55 at step 500
    against 0.92); shortcuts with widths (48, 96, 96): 25.13 / 0.95; 3x3x3 convs at the 4x4
    level: 25.28 / 0.954. Five-frame windows instead of nine: 25.15 / 0.94 at batch 16 for
    0.72x the step time (batch 24: 0.94x). Peak lr 8e-3 lost 0.4 dB, 2e-3 0.3. On a GPU at
    3200 steps (27.68 dB, as on the CPU), nine-frame windows: batch 32 +0.76 dB, 6400 steps
    +1.05, widths (64, 128, 128) +0.60, two blocks per level +0.38: about +1 dB per
    doubling of compute, where Muon gave +1.9 dB for 1.3x the step time (its Newton-Schulz
    iterations; 225 against 283-303 ms at batch 24 on 2 threads, measured side by side).
    Edges of the face, hair and eyes carry most of the error."""
    steps: int = 6000               # optimiser steps (the LR schedule spans them); with `minutes`, at most
    minutes: float = 19.0           # wall-clock budget of the whole call, rendering included (0 = none):
                                    # steps PROBE[0]..PROBE[1] are timed and the schedule is cut to the
                                    # steps that fit (kept in the checkpoint, so a resumed run keeps it)
    batch_size: int = 24            # clips per step
    frames: int = 0                 # T per training window (1 + s_t*k); 0 = 1 + s_t: frame 0 and
                                    # one latent group (5 frames for tiny, 9 for small)
    optimizer: str = "muon"         # "muon": Muon for conv filters, AdamW for biases and norms (see
                                    # minread/optim.py); "adamw": AdamW for everything
    lr: float = 4e-3                # peak learning rate (Muon's steps are scaled to AdamW's size)
    warmup: int = 100               # linear warm-up steps, then cosine decay to lr * min_lr
    min_lr: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kl_weight: float = 1e-4         # on the mean KL per latent element
    mse_weight: float = 100.0       # an added squared-error term (PSNR is a squared error)
    mouth_weight: float = 8.0       # extra weight inside the mouth mask (0 = plain weights)
    eval_every: int = 500
    ckpt_every: int = 500
    eval_frames: int = 49           # T per held-out clip (1 + s_t*k, trimmed from each clip)
    seed: int = 0
    identities: int = 1600          # babble identities rendered in memory to train on (0 = use
                                    # data_root's train split); from `seed`, past the first 1000
                                    # identities of every seed, so no toy set's face is trained on
    data_root: str = "data_toy"     # a rendered toy set (see data.render_dataset): its test split
                                    # is the held-out evaluation; its train split is used if identities=0
    eval_root: str = ""             # held-out clips: this set's test split ("" = data_root's)

    def window(self, cfg):
        """Frames per training window for VAE config `cfg`: `frames`, or 1 + s_t when 0."""
        return self.frames or 1 + cfg.temporal


RENDER_FIRST = 1000                 # first identity index ClipBank.render uses (toy sets have fewer)
PROBE = (20, 60)                    # steps timed to fit a schedule to VAETrainConfig.minutes (in the warm-up)


def _render_one(job):
    ident_seed, size = job
    clip = render_clip(ident_seed, None, size=size, seed=ident_seed * 100, source="babble", audio=False)
    return clip["video"], clip["opening"]


def mouth_region(video, radius=2):
    """Where the reserved mouth colour appears anywhere in the clip, dilated by `radius` px so
    the lips count too: video (B, 3, T, H, W) in [-1, 1] -> (B, 1, 1, H, W) in {0, 1}.
    On real footage nothing is that green, the mask is empty and the loss is plain L1."""
    inside = mouth_mask(video.transpose(0, 1)) > 0.5                      # (B, T, H, W)
    seen = inside.any(dim=1, keepdim=True).float()                        # (B, 1, H, W)
    seen = F.max_pool2d(seen, 2 * radius + 1, stride=1, padding=radius)
    return seen.unsqueeze(2)                                              # (B, 1, 1, H, W)


def lr_at(step, t):
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    progress = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr + (1 - t.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def vae_loss(model, video, mask=None, mouth_weight=VAETrainConfig.mouth_weight, kl_weight=VAETrainConfig.kl_weight,
             mse_weight=VAETrainConfig.mse_weight):
    """L1 (+ mse_weight * squared error) reconstruction, weighted 1 + mouth_weight inside
    `mask` (B, 1, 1|T, H, W) if given, plus kl_weight * KL(q(z|x) || N(0, I)) per latent
    element. Returns (loss, parts)."""
    recon, mean, logvar = model(video)
    err = (recon - video).abs()                                           # (B, 3, T, H, W)
    weight = 1.0 if mask is None else 1.0 + mouth_weight * mask
    rec = (err * weight).mean() + (mse_weight * (err.pow(2) * weight).mean() if mse_weight else 0.0)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return rec + kl_weight * kl, {"l1": err.mean().item(), "kl": kl.item()}


class ClipBank:
    """Whole clips held in memory as uint8 (3, Tc, H, W), for fast random training windows."""

    def __init__(self, video, opening, identity):
        self.video, self.opening, self.identity = video, opening, identity

    @classmethod
    def load(cls, root, split, size):
        """Every clip of a split of a rendered toy set (data_toy/ or data.render_dataset's)."""
        clips = ToyClipDataset(root, split=split, size=size, frames=1).clips
        return cls([((c["video"] + 1) * 127.5).round().to(torch.uint8) for c in clips],
                   [c["opening"] for c in clips], [int(c["identity"]) for c in clips])

    @classmethod
    def render(cls, identities, size, seed, first=RENDER_FIRST, workers=1, progress=False):
        """Render one babble clip per identity in memory (no files), identities first..first+n-1
        of `seed` (identity i has seed seed * 100_000 + i, as in data.render_dataset). The default
        `first` starts past the identities of any rendered toy set, so held-out faces stay unseen."""
        jobs = [(seed * 100_000 + i, size) for i in range(first, first + identities)]
        if workers > 1:
            import multiprocessing as mp
            with mp.get_context("fork").Pool(workers) as pool:
                clips = pool.map(_render_one, jobs, chunksize=4)
        else:
            clips = [_render_one(j) for j in tqdm(jobs, desc="render faces", disable=not progress)]
        return cls([torch.from_numpy(v).permute(3, 0, 1, 2).contiguous() for v, _ in clips],
                   [torch.from_numpy(o) for _, o in clips], [j[0] for j in jobs])

    def __len__(self):
        return len(self.video)

    def batch(self, gen, B, T, device):
        """B random windows of T frames, randomly mirrored: (B, 3, T, H, W) in [-1, 1]."""
        idx = torch.randint(len(self), (B,), generator=gen).tolist()
        u, flip = torch.rand(B, generator=gen).tolist(), (torch.rand(B, generator=gen) < 0.5).tolist()
        clips = []
        for i, a, f in zip(idx, u, flip):
            v = self.video[i]
            s = int(a * (v.shape[1] - T + 1))
            clips.append(v[:, s:s + T].flip(-1) if f else v[:, s:s + T])
        return torch.stack(clips).to(device).float() / 127.5 - 1.0       # (B, 3, T, H, W)


@torch.no_grad()
def evaluate_vae(model, bank, frames=None):
    """Held-out figures from posterior-mean reconstructions of every clip in `bank`:
    PSNR (dB), LipCorr of the opening read back from reconstructions against the truth,
    and the same LipCorr on the true frames (the ceiling of the read-back)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    psnrs, lc, lc_true = [], [], []
    for v8, opening in zip(bank.video, bank.opening):
        Tc = v8.shape[1] if frames is None else min(frames, v8.shape[1])
        T = 1 + (Tc - 1) // model.cfg.temporal * model.cfg.temporal
        video = v8[None, :, :T].to(device).float() / 127.5 - 1.0       # (1, 3, T, H, W)
        mean, _ = model.encode(video)
        recon = model.decode(mean).clamp(-1, 1)[0].cpu()
        psnrs.append(float(psnr(recon, video[0].cpu())))
        lc.append(float(lip_corr(read_opening(recon), opening[:T])))
        lc_true.append(float(lip_corr(read_opening(video[0].cpu()), opening[:T])))
    model.train(was_training)
    mean_of = lambda xs: float(np.nanmean(xs))
    return {"psnr": mean_of(psnrs), "lip_corr": mean_of(lc), "lip_corr_true_frames": mean_of(lc_true),
            "clips": len(psnrs)}


def config_diff(stored, cfg):
    """Names and values of the settings where a stored config dict and `cfg` differ."""
    now = asdict(cfg)
    return [f"{k}: checkpoint {stored.get(k)!r} vs requested {now[k]!r}" for k in now
            if (list(stored.get(k)) if isinstance(stored.get(k), (list, tuple)) else stored.get(k))
            != (list(now[k]) if isinstance(now[k], tuple) else now[k])]


def load_vae(path, cfg=None, device="cpu"):
    """A trained VAE from a checkpoint. With `cfg`, refuse a checkpoint of another config."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no VAE checkpoint at {path!r}; train one with minread.vae.train_vae")
    ckpt = load_checkpoint(path, map_location=device)
    if "vae_config" not in ckpt:
        raise ValueError(f"{path!r} is not a VAE checkpoint (no 'vae_config' entry)")
    stored = ckpt["vae_config"]
    if cfg is not None and config_diff(stored, cfg):
        raise ValueError(f"{path!r} was trained with another VAE config; differing settings: "
                         + "; ".join(config_diff(stored, cfg)))
    model = VAE(VAEConfig(**stored)).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval()


def make_optimizers(model, t):
    """The optimisers of VAETrainConfig `t`: [Muon, AdamW] or [AdamW]."""
    adamw = lambda params: torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.99))  # noqa: E731
    if t.optimizer == "adamw":
        return [adamw(model.parameters())]
    if t.optimizer != "muon":
        raise ValueError(f"VAETrainConfig.optimizer={t.optimizer!r}: use 'muon' or 'adamw'")
    filters, rest = split_params(model)
    return [Muon(filters, lr=t.lr, weight_decay=t.weight_decay), adamw(rest)]


def train_vae(cfg, out_dir="runs/vae_tiny", tcfg=None, device=None, resume=True, until=None,
              banks=None, progress=True, **overrides):
    """Train the VAE on the toy world; returns a dict of figures. `overrides` set
    VAETrainConfig fields (steps=, seed=, ...). By default it trains on `identities` faces
    rendered in memory and scores data_root's test split (held-out identities); with
    identities=0 it trains on data_root's train split. Resumes exactly from out_dir/ckpt.pt;
    `until` stops early at that step (as if interrupted) while keeping the schedule;
    `banks` = (train, test) ClipBanks already in memory (else read from the data roots)."""
    t = replace(tcfg or VAETrainConfig(), **overrides)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t = replace(t, frames=t.window(cfg))
    if (t.frames - 1) % cfg.temporal:
        raise ValueError(f"VAETrainConfig.frames={t.frames} must be 1 + {cfg.temporal}k")
    ckpt_path = Path(out_dir) / "ckpt.pt"
    random.seed(t.seed), np.random.seed(t.seed), torch.manual_seed(t.seed)
    t_start = time.time()                                            # the budget counts from here
    if banks is not None:
        train, test = banks
    else:
        test = ClipBank.load(t.eval_root or t.data_root, "test", cfg.image_size)
        train = (ClipBank.render(t.identities, cfg.image_size, t.seed, workers=torch.get_num_threads(),
                                 progress=progress) if t.identities
                 else ClipBank.load(t.data_root, "train", cfg.image_size))
    data_minutes = (time.time() - t_start) / 60
    model = VAE(cfg).to(device)
    opts = make_optimizers(model, t)
    gen = torch.Generator().manual_seed(t.seed)                      # batch sampling
    step, history = 0, []
    planned = t.steps if not t.minutes or t.steps <= PROBE[1] else None   # None: fixed after the probe
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path, map_location=device)
        diff = config_diff(ckpt["vae_config"], cfg) + config_diff(ckpt["train_config"], t)
        if diff:
            raise ValueError(f"{ckpt_path} holds a run with other settings ({'; '.join(diff)}); "
                             f"choose another out_dir or pass resume=False")
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(opts, ckpt["optimizers"]):
            opt.load_state_dict(state)
        step, history, planned = ckpt["step"], ckpt["history"], ckpt.get("planned_steps", planned)
        gen.set_state(ckpt["rng"]["batches"]), torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])

    def save():
        rng = {"batches": gen.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        save_checkpoint(ckpt_path, dict(model=model.state_dict(), optimizers=[o.state_dict() for o in opts], step=step, rng=rng,
                                        vae_config=asdict(cfg), train_config=asdict(t), history=history, planned_steps=planned))

    sched = replace(t, steps=planned or t.steps)                     # the schedule this run follows
    probe_from, t_probe = max(PROBE[0], step), time.time()           # (a resumed run may start inside it)
    model.train()
    t0 = time.time()
    bar = tqdm(total=sched.steps, initial=step, disable=not progress, desc="vae", dynamic_ncols=True)
    while step < min(sched.steps, until or sched.steps):
        lr = lr_at(step, sched)
        video = train.batch(gen, t.batch_size, t.frames, device)
        mask = mouth_region(video) if t.mouth_weight else None
        loss, parts = vae_loss(model, video, mask, t.mouth_weight, t.kl_weight, t.mse_weight)
        model.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", l1=f"{parts['l1']:.4f}", kl=f"{parts['kl']:.2f}", lr=f"{lr:.1e}")
        if planned is None and step == probe_from:
            t_probe = time.time()
        if planned is None and step == PROBE[1]:                      # cut the schedule to the budget
            per_step = (time.time() - t_probe) / (PROBE[1] - probe_from)
            left = 0.97 * (t.minutes * 60 - (time.time() - t_start))    # 3%: evaluations, checkpoints
            planned = min(t.steps, step + max(0, int(left / per_step)))
            sched = replace(t, steps=planned)
            bar.total = planned
            bar.write(f"budget {t.minutes:g} min: {per_step * 1e3:.0f} ms per step -> {planned} steps")
        if step % t.eval_every == 0 or step == sched.steps:
            ev = evaluate_vae(model, test, t.eval_frames)
            history.append({"step": step, "loss": loss.item(), "minutes": (time.time() - t0) / 60, **ev})
            bar.write(f"step {step}: held-out PSNR {ev['psnr']:.2f} dB, LipCorr {ev['lip_corr']:.3f} "
                      f"(true frames {ev['lip_corr_true_frames']:.3f}), l1 {parts['l1']:.4f}")
        if step == sched.steps:                                       # fit the DiT's latent scaling
            model.eval()
            g = torch.Generator().manual_seed(t.seed + 1)
            model.fit_latent_norm(train.batch(g, t.batch_size, t.frames, device) for _ in range(16))
            model.train()
        if step % t.ckpt_every == 0 or step in (sched.steps, until):
            save()
    bar.close()
    return {"step": step, "planned_steps": sched.steps, "minutes": (time.time() - t0) / 60,
            "data_minutes": data_minutes, "checkpoint": str(ckpt_path),
            **(history[-1] if history else {})}
