"""A2V-DiT: the audio-to-video diffusion transformer (DESIGN §6).

The denoising backbone. One call sees a window of video latents whose latent frames
carry their own noise levels, the speech latents aligned with them frame by frame, and
a reference image latent; it predicts the clean latents x̂₀ (or the velocity) of every
frame.

From the READ paper (arXiv 2508.03457): a diffusion transformer over the highly
compressed video latents, conditioned on speech latents that line up 1:1 with the video
latent frames, trained and sampled with asynchronous (per-frame) noise levels.
Our reconstruction (the paper publishes no layer details):
- tokens: each latent frame is patchified (patch p, N = h·w/p² tokens per frame);
  3D rotary positions (frame, y, x) with frame indices relative to the window, so a
  video of any length only ever meets trained positions;
- per-frame adaLN-Zero: every latent frame f has its own τ_f; the shift/scale/gate
  vectors are computed once per frame, (B, 1+F, 6D) per block, and broadcast to its N
  tokens by a view (per token it costs ~16x more, DESIGN §11);
- the reference latent is one extra clean frame (τ = 0) in front of the window with its
  own learned frame embedding; every token attends to it; motion anchors are simply the
  first clean frames of x (the model knows them only through their levels);
- speech enters through attention with the audio-window mask of attention.py: in every
  block the queries of latent frame f also attend, in a softmax of their own, to the
  speech tokens g with |f - g| <= r (IP-Adapter's decoupled cross-attention: the same
  queries, separate keys/values, outputs summed before the shared projection); rotary
  frame positions on those keys tell the centre g = f from its neighbours. We chose this
  over joint attention (speech tokens in the self-attention sequence) and over a separate
  cross-attention layer: speech is a condition, not content, so its tokens are never
  updated and "frame f hears only speech f±r" holds exactly in every layer (tested); the
  self-attention stays unmasked (the fastest kernel); and it adds no per-token matmul
  (a cross-attention layer's q and output projections cost ~15% more compute at this
  size). The reference's queries see no speech: attention.py returns zeros for rows with
  no visible key instead of SDPA's NaN;
- speech also enters the per-frame adaLN: frame f's conditioning is the level embedding
  of τ_f plus a linear map of speech tokens f-k..f+k (k = cond_radius, zero at init,
  zeros past the window's edges). A short equal-step test on the tiny preset (500 steps,
  same seed and held-out clips) gave LipCorr 0.52 with token f against 0.22 with the
  attention path alone: the mouth state is a per-frame quantity, and modulating every
  layer of the frame carries it faster than attention learns to. k = 1 because speech
  latents are causal (token f has heard the audio up to frame f only) while lips move
  ahead of the sound: a linear read-out of the mouth from tokens f-1..f+1 beats one
  from token f alone (r 0.77 vs 0.75 on held-out clips). With `cond_hidden` (tiny: 512)
  the map from tokens f-1..f+1 to the conditioning is an MLP, not one linear map: the
  mouth is a nonlinear function of the speech around it (a read-out of the 4 openings
  of a latent frame from speech latents f-1..f+1, fitted on 1440 clips, reached r 0.81
  linear against 0.88 with an MLP: `python -m minread.bench speech_ae --extra-clips
  1280`). In equal-step runs on the tiny preset (1000 steps, 2720 clips, 16 held-out
  clips, S = 2, guidance 1.5) held-out / training-clip LipCorr went from 0.764 / 0.765
  (linear) to 0.776 / 0.800 (hidden 512; 1024: 0.774 / 0.785; 512 over f-2..f+2:
  0.763 / 0.784), and to 0.780 / 0.815 with the peak learning rate doubled to 1e-3
  (the tiny preset's);
- classifier-free guidance: learned null audio and null reference tokens replace the
  condition for the samples whose drop flag is set;
- output: x̂₀ per video token (default; the velocity for sampling is
  v̂ = (x_τ - x̂₀)/τ, see ans.py) or v̂ directly (`prediction="v"`). With `ref_skip`
  (both presets) x̂₀ is the reference latent plus the network's output, which starts
  at zero: a talking head is mostly its reference, so the network predicts only what
  moves. Equal-step test on the tiny preset (1000 steps, 16 held-out clips, S = 2,
  cfg 1): identity error 0.061 against 0.109 without it, LipCorr 0.735 against 0.704,
  amplitude 0.57 against 0.41; without it the frames drifted toward the data set's
  average colours, which also washed out the mouth interior that the metrics read. The default
  follows DESIGN §7's pixel-space calibration (x̂₀: lip-sync r 0.95 after 9 minutes,
  v̂: 0.63 after 28). A short equal-compute run on a latent proxy
  (`python -m minread.bench dit --compare 300`: 283 steps each, 1 CPU thread) was not
  decisive: neither learned lip-sync yet (probe r 0.08 for x̂₀, 0.12 for v̂, against a
  probe ceiling of 0.92), and v̂ reached the lower latent error (0.014 against 0.185),
  so the switch stays, to be settled by a full training run.

Two paths compute the same model (tests/test_dit.py compares outputs and gradients):
`run_blocks` and the blocks' `forward`, written for reading, and `run_blocks_fused`, the
default, which does the same work in fewer, larger ops (tokens kept frame-major so the
per-frame vectors broadcast without views, the adaLN vectors and the speech keys/values
of all blocks each from one matmul, SDPA called directly). `A2VDiT(cfg, compile=True)`
also runs the fused path through torch.compile for calls without gradients (sampling),
falling back to eager if compilation fails: at the tiny size per-op overhead is a large
share of a forward pass, and compiling also fuses the elementwise ops (GELU, rotary,
modulation) that the matmuls leave. On a GPU, calls without gradients replay the fused
forward from CUDA graphs (`forward_graphed`, one per input shape): the small preset's
forward is a few hundred small kernels whose launches, one by one from Python, took
longer than the kernels (11.6 -> 2.4 ms per call on an H200).
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.functional import layer_norm, linear, scaled_dot_product_attention

from minread.attention import attention, audio_window, dense_mask


@dataclass
class DiTConfig:
    latent_channels: int = 16  # C, from the VAE
    audio_dim: int = 32  # Da, from the SpeechAE
    patch: int = 1  # p: latent pixels per token side; N = (h/p)(w/p) tokens per frame
    width: int = 128  # D
    depth: int = 6  # transformer blocks
    heads: int = 4  # nh; head dim hd = D/nh
    mlp_ratio: float = 4.0
    audio_radius: int = 1  # r: latent frame f hears speech frames |f - g| <= r
    cond_radius: int = 1  # frame f's adaLN conditioning hears speech frames |f - g| <= this
    cond_hidden: int = 0  # > 0: speech f±k -> adaLN through an MLP with this hidden width (0: one linear map)
    ref_skip: bool = False  # x0: predict the reference latent plus a correction (zero at init)
    rope_theta: float = 100.0  # positions are small (a window of ~10 frames, a 4x4 grid)
    prediction: str = "x0"  # "x0" (clean-latent prediction) or "v" (velocity)
    p_drop_audio: float = 0.1  # CFG: probability a training sample drops the speech
    p_drop_ref: float = 0.05  # CFG: probability a training sample drops the reference
    attn_impl: str = "sdpa"  # attention.py impl; sdpa is the fastest at tiny size on CPU


def tiny():
    """CPU / CI / workshop preset (DESIGN §8): 32x32 frames, C=16, 4x4 latent grid. The MLP
    is 2x wide, not 4x: a third fewer FLOPs per block for the same held-out lip-sync in an
    equal-step test (1000 steps, 16 held-out clips: LipCorr 0.707 with a 2x MLP and one
    anchor frame, 0.712 with a 4x MLP and two; 0.5 vs 0.78 s per step on one thread)."""
    return DiTConfig(latent_channels=16, audio_dim=128, width=128, depth=6, heads=4, mlp_ratio=2.0, ref_skip=True,
                     cond_hidden=512)


def small():
    """One-GPU preset: 128x128 frames, C=64, 4x4 latent grid."""
    return DiTConfig(latent_channels=64, audio_dim=64, width=512, depth=12, heads=8, ref_skip=True)


# ---- positions and conditioning --------------------------------------------------

def rope_tables(pos, head_dim, theta):
    """Rotary tables for positions pos (L, 3) = (frame, y, x) -> cos, sin (L, hd).

    The hd/2 rotation pairs are split between the axes: a quarter each to y and x, the
    rest to the frame axis. `sin` carries the sign of rotate-half, so applying the
    rotation is x*cos + swap_halves(x)*sin.
    """
    n_space = head_dim // 8
    n_frame = head_dim // 2 - 2 * n_space
    freqs = [theta ** (-torch.arange(n, dtype=torch.float64) / n) for n in (n_frame, n_space, n_space)]
    angles = torch.cat([pos[:, i:i + 1].double() * f for i, f in enumerate(freqs)], 1)  # (L, hd/2)
    cos, sin = angles.cos().float(), angles.sin().float()
    return torch.cat([cos, cos], 1), torch.cat([-sin, sin], 1)  # (L, hd) each


def apply_rope(x, cos, sin):
    """Rotate (..., L, hd) by tables (L, hd): pairs (i, i + hd/2) turn by their angle."""
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], -1)
    return x * cos + swapped * sin


def apply_rope_fused(x, cos, sin):
    """apply_rope in three ops: swapping the two halves of hd is a roll by hd/2."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def timestep_embedding(levels, dim):
    """Sinusoidal features of the noise levels (B, F) -> (B, F, dim), as in DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=levels.device) / half)
    args = 1000.0 * levels[..., None].float() * freqs  # (B, F, dim/2)
    return torch.cat([args.cos(), args.sin()], -1)


class LevelEmbedder(nn.Module):
    """Noise level of each latent frame -> conditioning vector c_f (B, F, D)."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, levels):
        return self.mlp(timestep_embedding(levels, self.freq_dim))


def modulate(x, shift, scale, frames):
    """adaLN per frame: x (B, L, D) with L = frames*N; shift, scale (B, frames, 1, D)."""
    B, L, D = x.shape
    x = x.view(B, frames, L // frames, D)  # (B, F, N, D)
    return torch.addcmul(shift, x, 1 + scale).view(B, L, D)


def gate(x, g, out, frames):
    """Residual with a per-frame gate: x + g*out; x, out (B, L, D), g (B, frames, 1, D)."""
    B, L, D = x.shape
    x, out = x.view(B, frames, L // frames, D), out.view(B, frames, L // frames, D)
    return torch.addcmul(x, g, out).view(B, L, D)


# ---- the block -------------------------------------------------------------------

class Attention(nn.Module):
    """Self-attention over reference + window tokens plus a decoupled speech
    attention (as IP-Adapter's): the same queries of the window tokens also attend,
    in a softmax of their own, to the speech tokens within ±r frames; the two results
    are summed before the shared output projection. Fused qkv, 3D rotary."""

    def __init__(self, cfg):
        super().__init__()
        self.heads, self.impl = cfg.heads, cfg.attn_impl
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.speech_kv = nn.Linear(cfg.width, 2 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x, speech, rope, rope_speech, mask):
        """x (B, (1+F)*N, D) tokens, speech (B, F, D) speech tokens -> (B, (1+F)*N, D)."""
        B, L, D = x.shape
        nh, hd, F = self.heads, D // self.heads, speech.shape[1]
        qkv = self.qkv(x).view(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, hd)
        qk = apply_rope(qkv[:2], *rope)  # (2, B, nh, L, hd)
        y = attention(qk[0], qk[1], qkv[2], None, self.impl)  # (B, nh, L, hd)
        # speech: its own softmax over the speech tokens g within ±r of the query's frame;
        # the reference rows see no speech (audio_window's q_offset) and get zeros
        kv = self.speech_kv(speech).view(B, F, 2, nh, hd).permute(2, 0, 3, 1, 4)  # (2, B, nh, F, hd)
        y = y + attention(qk[0], apply_rope(kv[0], *rope_speech), kv[1], mask, self.impl)  # (B, nh, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))

    def fused(self, x, k_speech, v_speech, rope, speech_mask):
        """forward with SDPA called directly: x (B, 1+F, N, D) frame-major tokens; this
        block's speech keys (rotated, scaled by 1/√hd) and values (B, nh, F, hd), computed
        for all blocks at once; speech_mask: additive (L, F) mask and (L, 1) row keep
        -> (B, 1+F, N, D)."""
        B, frames, N, D = x.shape
        L, nh, hd = frames * N, self.heads, D // self.heads
        qkv = self.qkv(x).view(B, L, 3, nh, hd).permute(2, 0, 3, 1, 4)  # (3, B, nh, L, hd)
        qk, v = qkv.split([2, 1])  # split, not slices: its backward is one cat, not zero-fills
        q, k = apply_rope_fused(qk, *rope)                               # (B, nh, L, hd) each
        y = scaled_dot_product_attention(q, k, v[0])                     # (B, nh, L, hd)
        bias, keep = speech_mask  # keep zeroes the reference rows, which see no speech
        if torch.is_grad_enabled():  # training: written out, for a handful of keys it beats SDPA's kernel
            speech = (torch.matmul(q, k_speech.transpose(-2, -1)) + bias).softmax(-1) @ v_speech
        else:                        # sampling: one kernel instead of four ops (keys are pre-scaled)
            speech = scaled_dot_product_attention(q, k_speech, v_speech, attn_mask=bias, scale=1.0)
        y = torch.addcmul(y, speech, keep)                               # (B, nh, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, frames, N, D))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1, self.act, self.fc2 = nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """DiT block with per-frame adaLN-Zero; attention includes the speech path."""

    def __init__(self, cfg):
        super().__init__()
        self.attn, self.mlp = Attention(cfg), MLP(cfg)

    def forward(self, x, m, speech, rope, rope_speech, mask):
        """x (B, (1+F)*N, D) reference + window tokens, m: this block's shift, scale, gate
        for attention and MLP, 6 x (B, 1+F, 1, D) -> (B, (1+F)*N, D)."""
        B, L, D = x.shape
        frames = m[0].shape[1]
        h = self.attn(modulate(layer_norm(x, (D,)), m[0], m[1], frames), speech, rope, rope_speech, mask)
        x = gate(x, m[2], h, frames)
        return gate(x, m[5], self.mlp(modulate(layer_norm(x, (D,)), m[3], m[4], frames)), frames)

    def fused(self, x, m, *attn_args):
        """forward in the frame-major layout x (B, 1+F, N, D), where the per-frame vectors
        broadcast without views; m: shift, 1 + scale, gate for attention and MLP,
        (6, B, 1+F, 1, D)."""
        D = x.shape[-1]
        shift, scale1, g, shift2, scale2, g2 = m
        x = torch.addcmul(x, g, self.attn.fused(torch.addcmul(shift, layer_norm(x, (D,)), scale1), *attn_args))
        return torch.addcmul(x, g2, self.mlp(torch.addcmul(shift2, layer_norm(x, (D,)), scale2)))


# ---- the model -------------------------------------------------------------------

class A2VDiT(nn.Module):
    """Window of noisy latents + levels + speech latents + reference -> x̂₀ (or v̂)."""

    def __init__(self, cfg, compile=False):
        super().__init__()
        if cfg.prediction not in ("x0", "v"):
            raise ValueError(f"DiTConfig.prediction must be 'x0' or 'v', got {cfg.prediction!r}")
        if cfg.ref_skip and cfg.prediction != "x0":
            raise ValueError("DiTConfig.ref_skip needs prediction='x0' (the reference is a clean latent)")
        if cfg.width % cfg.heads or (cfg.width // cfg.heads) % 8:
            raise ValueError(f"width {cfg.width} / heads {cfg.heads} must give a head dim divisible by 8")
        self.cfg, self.prediction = cfg, cfg.prediction
        C, D, p = cfg.latent_channels, cfg.width, cfg.patch
        self.patch_embed = nn.Linear(C * p * p, D)
        self.ref_frame = nn.Parameter(torch.zeros(D))  # learned frame embedding of the reference
        self.null_ref = nn.Parameter(torch.zeros(D))  # replaces every reference token when dropped
        self.audio_embed = nn.Sequential(nn.Linear(cfg.audio_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.null_audio = nn.Parameter(torch.zeros(D))  # replaces every speech token when dropped
        if cfg.cond_hidden:  # speech f±k -> frame f's adaLN
            self.audio_cond = nn.Sequential(nn.Linear((2 * cfg.cond_radius + 1) * D, cfg.cond_hidden), nn.SiLU(),
                                            nn.Linear(cfg.cond_hidden, D))
        else:
            self.audio_cond = nn.Linear((2 * cfg.cond_radius + 1) * D, D)
        self.level_embed = LevelEmbedder(D)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # adaLN of all blocks in one matmul: 6 vectors (shift, scale, gate for attention
        # and MLP) per block and frame; zero at init, so every gate is 0 and every block
        # starts as the identity (adaLN-Zero)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(D, cfg.depth * 6 * D))
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.final = nn.Linear(D, C * p * p)
        self._masks, self._ropes, self._speech_masks = {}, {}, {}
        # fused: the same computation in fewer, larger ops (run_blocks_fused, tested equal
        # to run_blocks); compile_inference: torch.compile that path for calls without
        # gradients (first call per shape compiles, ~20 s on CPU; falls back to eager)
        self.fused, self.compile_inference = True, compile
        # cuda_graphs: on a GPU, calls without gradients replay the fused forward from CUDA
        # graphs (forward_graphed); a non-persistent buffer keeps a constant on the device
        self.cuda_graphs, self._graphs = True, {}
        self.register_buffer("scale_one", torch.tensor([0.0, 1, 0, 0, 1, 0]).view(6, 1, 1, 1, 1), persistent=False)
        self.initialize()
        print(f"A2VDiT: {self.num_params() / 1e6:.2f}M parameters")

    def initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.null_ref, std=0.02)
        nn.init.normal_(self.null_audio, std=0.02)
        nn.init.normal_(self.ref_frame, std=0.02)
        for lin in self.level_embed.mlp[0], self.level_embed.mlp[2]:
            nn.init.normal_(lin.weight, std=0.02)
        cond_out = self.audio_cond[-1] if self.cfg.cond_hidden else self.audio_cond
        for lin in self.ada[1], self.final_ada[1], self.final, cond_out:  # adaLN-Zero
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # -- tokens <-> latents
    def patchify(self, z):
        """(B, C, F, h, w) -> (B, F*N, C*p*p), tokens frame-major then row-major."""
        B, C, F, h, w = z.shape
        p = self.cfg.patch
        z = z.reshape(B, C, F, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)  # (B, F, h/p, w/p, C, p, p)
        return z.reshape(B, F * (h // p) * (w // p), C * p * p)

    def unpatchify(self, tokens, F, h, w):
        """(B, F*N, C*p*p) -> (B, C, F, h, w)."""
        B, p, C = tokens.shape[0], self.cfg.patch, self.cfg.latent_channels
        z = tokens.reshape(B, F, h // p, w // p, C, p, p).permute(0, 4, 1, 2, 5, 3, 6)  # (B, C, F, h/p, p, w/p, p)
        return z.reshape(B, C, F, h, w)

    def positions(self, F, hp, wp):
        """(frame, y, x) of every token, (L, 3): the reference sits at frame -1, the
        window at 0..F-1 (relative to the window, whatever its place in the video)."""
        frame = torch.arange(-1, F).repeat_interleave(hp * wp)  # (L,)
        y = torch.arange(hp).repeat_interleave(wp).repeat(F + 1)
        x = torch.arange(wp).repeat(hp * (F + 1))
        return torch.stack([frame, y, x], 1)  # (L, 3)

    def rope(self, pos, N):
        """Rotary tables for all tokens and for the speech keys (speech frame g sits at
        (g, 0, 0)): cos, sin (L, hd) and (F, hd)."""
        hd = self.cfg.width // self.cfg.heads
        theta = self.cfg.rope_theta
        cos, sin = rope_tables(pos, hd, theta)
        F = pos.shape[0] // N - 1
        speech = torch.stack([pos[N::N, 0], torch.zeros(F), torch.zeros(F)], 1)  # (F, 3)
        return (cos, sin), rope_tables(speech, hd, theta)

    def cached_rope(self, F, hp, wp, device):
        key = (F, hp, wp, device)
        if key not in self._ropes:  # plain tensors even when first built under inference_mode
            with torch.inference_mode(False), torch.no_grad():
                ropes = self.rope(self.positions(F, hp, wp), hp * wp)
                self._ropes[key] = tuple(tuple(t.to(device) for t in r) for r in ropes)
        return self._ropes[key]

    def audio_mask_for(self, N):
        if N not in self._masks:  # queries: N reference tokens first, then frame f's N tokens
            self._masks[N] = audio_window(N, self.cfg.audio_radius, q_offset=N)
        return self._masks[N]

    def speech_mask_for(self, N, F, device, dtype=torch.float32):
        """The audio mask for the fused path: additive (L, F) with -inf where hidden, and a
        (L, 1) keep that zeroes the rows with no visible speech (the reference's), as
        attention.py does; their additive rows are left open so the softmax stays finite."""
        key = (N, F, device, dtype)
        if key not in self._speech_masks:
            with torch.inference_mode(False), torch.no_grad():
                visible = dense_mask(self.audio_mask_for(N), (1 + F) * N, F, device)  # (L, F)
                keep = visible.any(-1, keepdim=True)                                  # (L, 1)
                bias = torch.zeros(visible.shape, device=device, dtype=dtype)
                self._speech_masks[key] = bias.masked_fill(~(visible | ~keep), float("-inf")), keep.to(dtype)
        return self._speech_masks[key]

    def check_inputs(self, x, levels, audio, reference):
        C, p, Da = self.cfg.latent_channels, self.cfg.patch, self.cfg.audio_dim
        if x.ndim != 5 or x.shape[1] != C:
            raise ValueError(f"x must be latents (B, {C}, F, h, w), got {tuple(x.shape)}")
        B, _, F, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"latent grid {h}x{w} is not divisible by the patch size {p}")
        if tuple(levels.shape) != (B, F):
            raise ValueError(f"levels must be (B, F) = ({B}, {F}), one per latent frame, got {tuple(levels.shape)}")
        if tuple(audio.shape) != (B, F, Da):
            raise ValueError(f"audio must be speech latents (B, F, Da) = ({B}, {F}, {Da}) aligned with x, "
                             f"got {tuple(audio.shape)}")
        if tuple(reference.shape) != (B, C, 1, h, w):
            raise ValueError(f"reference must be one latent frame (B, C, 1, h, w) = ({B}, {C}, 1, {h}, {w}), "
                             f"got {tuple(reference.shape)}")

    def embed(self, x, levels, audio, reference, drop_audio=None, drop_ref=None):
        """Inputs -> tokens (B, (1+F)*N, D), per-frame conditioning c (B, 1+F, D),
        speech tokens (B, F, D)."""
        B = x.shape[0]
        ref = self.patch_embed(self.patchify(reference))  # (B, N, D)
        if drop_ref is not None:
            ref = torch.where(drop_ref.view(B, 1, 1), self.null_ref, ref)
        tokens = torch.cat([ref + self.ref_frame, self.patch_embed(self.patchify(x))], 1)  # (B, (1+F)*N, D)
        speech = self.audio_embed(audio)  # (B, F, D)
        if drop_audio is not None:
            speech = torch.where(drop_audio.view(B, 1, 1), self.null_audio, speech)
        c = self.level_embed(torch.cat([levels.new_zeros(B, 1), levels], 1))  # (B, 1+F, D); reference is clean
        c = c + nn.functional.pad(self.audio_cond(self.speech_context(speech)), (0, 0, 1, 0))  # f hears f±k
        return tokens, c, speech

    def speech_context(self, speech):
        """Speech tokens (B, F, D) -> each frame's own and its neighbours' within ±cond_radius,
        concatenated (B, F, (2k+1)*D); zeros beyond the window's edges."""
        B, F, D = speech.shape
        k = self.cfg.cond_radius
        padded = nn.functional.pad(speech, (0, 0, k, k))                    # (B, F+2k, D)
        return torch.cat([padded[:, j:j + F] for j in range(2 * k + 1)], -1)  # (B, F, (2k+1)*D)

    def modulation(self, c):
        """Per-frame conditioning c (B, 1+F, D) -> depth*6 x (B, 1+F, 1, D): computed once
        per frame, broadcast to the frame's N tokens inside the blocks."""
        return self.ada(c).unsqueeze(2).chunk(6 * self.cfg.depth, -1)

    def run_blocks(self, tokens, c, speech, ropes, mask):
        """The transformer proper: tokens (B, (1+F)*N, D) -> video outputs (B, F*N, C*p*p)."""
        B, L, D = tokens.shape
        frames = c.shape[1]
        N = L // frames
        m = self.modulation(c)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, m[6 * i:6 * i + 6], speech, ropes[0], ropes[1], mask)
        shift, scale = self.final_ada(c[:, 1:]).unsqueeze(2).chunk(2, -1)  # (B, F, 1, D) each
        return self.final(modulate(layer_norm(tokens[:, N:], (D,)), shift, scale, frames - 1))

    def run_blocks_fused(self, tokens, c, speech, ropes, speech_mask):
        """run_blocks in fewer, larger ops (equal up to float rounding, tested): the tokens
        stay frame-major (B, 1+F, N, D); the adaLN vectors of all blocks, 1 + scale
        included, come from one matmul and one add; since speech tokens never change, the
        speech keys and values of all blocks come from one matmul, rotated once;
        speech_mask: from speech_mask_for. -> video outputs (B, F*N, C*p*p)."""
        B, L, D = tokens.shape
        frames, F = c.shape[1], speech.shape[1]
        N, nh, depth = L // frames, self.cfg.heads, self.cfg.depth
        m = self.ada(c).view(B, frames, 1, depth, 6, D).permute(3, 4, 0, 1, 2, 5) + self.scale_one  # (depth, 6, B, 1+F, 1, D)
        kv_weight = torch.cat([block.attn.speech_kv.weight for block in self.blocks])   # (depth*2D, D)
        kv_bias = torch.cat([block.attn.speech_kv.bias for block in self.blocks])
        kv = linear(speech, kv_weight, kv_bias).view(B, F, depth, 2, nh, D // nh)         # (B, F, depth, 2, nh, hd)
        kv = kv.permute(2, 3, 0, 4, 1, 5)                                                 # (depth, 2, B, nh, F, hd)
        k_speech = apply_rope_fused(kv[:, 0], *ropes[1]) / math.sqrt(D // nh)             # (depth, B, nh, F, hd)
        x = tokens.view(B, frames, N, D)                                                  # (B, 1+F, N, D)
        for i, block in enumerate(self.blocks):
            x = block.fused(x, m[i], k_speech[i], kv[i, 1], ropes[0], speech_mask)
        shift, scale = self.final_ada(c[:, 1:]).unsqueeze(2).chunk(2, -1)               # (B, F, 1, D) each
        out = self.final(torch.addcmul(shift, layer_norm(x[:, 1:], (D,)), 1 + scale))   # (B, F, N, C*p*p)
        return out.view(B, F * N, -1)

    def forward(self, x, levels, audio, reference, drop_audio=None, drop_ref=None):
        """x (B, C, F, h, w) anchors + window, levels (B, F), audio (B, F, Da), reference
        (B, C, 1, h, w), drop_* (B,) bool -> x̂₀ or v̂ (B, C, F, h, w)."""
        self.check_inputs(x, levels, audio, reference)
        B, C, F, h, w = x.shape
        p = self.cfg.patch
        ropes = self.cached_rope(F, h // p, w // p, x.device)
        # the fused path calls SDPA itself; other attention impls run the reference path
        if not (self.fused and all(block.attn.impl == "sdpa" for block in self.blocks)):
            tokens, c, speech = self.embed(x, levels, audio, reference, drop_audio, drop_ref)
            out = self.run_blocks(tokens, c, speech, ropes, self.audio_mask_for((h // p) * (w // p)))
            return self.skip(self.unpatchify(out, F, h, w), reference, drop_ref)
        args = (x, levels, audio, reference, drop_audio, drop_ref, ropes,
                self.speech_mask_for((h // p) * (w // p), F, x.device, x.dtype))
        if self.cuda_graphs and x.is_cuda and not torch.is_grad_enabled():
            return self.forward_graphed(*args)
        if self.compile_inference and not torch.is_grad_enabled():
            try:
                return _forward_fused_compiled(self, *args)
            except Exception as e:  # no compiler, unsupported op, ...: stay correct, eager
                warnings.warn(f"A2VDiT: torch.compile failed, running eager from now on ({type(e).__name__}: {e})")
                self.compile_inference = False
        return self.forward_fused(*args)

    def forward_fused(self, x, levels, audio, reference, drop_audio, drop_ref, ropes, speech_mask):
        """forward's fused path, from checked inputs and cached tables (what is compiled)."""
        B, C, F, h, w = x.shape
        tokens, c, speech = self.embed(x, levels, audio, reference, drop_audio, drop_ref)
        out = self.unpatchify(self.run_blocks_fused(tokens, c, speech, ropes, speech_mask), F, h, w)
        return self.skip(out, reference, drop_ref)

    def _apply(self, fn, *args, **kwargs):
        self._graphs = {}  # recorded with the old tensors' addresses: .to(), .half(), ... record anew
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # copies and pickles start without graphs (they hold this model's addresses)
        return {**self.__dict__, "_graphs": {}}

    def forward_graphed(self, *args):
        """forward_fused replayed from a CUDA graph (calls without gradients on a GPU). At
        the small preset's size a forward is a few hundred small kernels, and launching them
        one by one from Python takes longer than running them: a CUDA graph records the
        launches once per input signature (shapes, dtypes, which drop flags are given) and
        replays them as one. The inputs are copied into the graph's own tensors and the
        output is copied out, so callers see a plain function. Tested equal to
        forward_fused (tests/test_dit.py, on CUDA); `model.cuda_graphs = False` turns it off."""
        inputs, tables = args[:6], args[6:]                              # tables: cached rope and mask
        key = tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in inputs)
        if key not in self._graphs:
            self._graphs[key] = self.capture(inputs, tables)
        graph, static, out = self._graphs[key]
        for s, t in zip(static, inputs):
            if s is not None:
                s.copy_(t)
        graph.replay()
        return out.clone()

    def capture(self, inputs, tables):
        """Record forward_fused on copies of `inputs` in a CUDA graph -> (graph, copies, output)."""
        static = [None if t is None else t.clone() for t in inputs]
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                                    # warm up outside the graph:
            for _ in range(2):                                           # lazy inits, kernel choices
                self.forward_fused(*static, *tables)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: generate() may decode on another thread while the sampler records
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = self.forward_fused(*static, *tables)
        return graph, static, out

    def skip(self, out, reference, drop_ref):
        """With ref_skip, x̂₀ = reference + out (B, C, F, h, w): a talking head is mostly its
        reference, so the network only has to predict what moves; a dropped reference adds 0."""
        if not self.cfg.ref_skip:
            return out
        if drop_ref is not None:
            reference = torch.where(drop_ref.view(-1, 1, 1, 1, 1), 0.0, reference)
        return out + reference  # (B, C, F, h, w), the reference broadcast over frames


# One compiled fused forward per process, shared by all models (dynamo guards on the
# model and the shapes; attention.py raises the recompile limit). Static shapes: each new
# (B, F) compiles once, and a generation run meets only a few.
_forward_fused_compiled = torch.compile(A2VDiT.forward_fused, dynamic=False)


def dit_loss(model, batch, levels):
    """Rectified-flow loss on the window frames (anchors excluded), DESIGN §7.

    x_τ = (1 - τ) x₀ + τ ε per latent frame; the target is x₀ ("x0") or v = ε - x₀
    ("v"); mean squared error over the non-anchor frames, weighted per latent cell by
    `batch["weight"]` (B, 1, 1, h, w) if given. Why weight: the reference fixes most of
    a window, so the part that moves (the mouth) holds ~2% of the latent variance and an
    unweighted loss barely sees it (train.py's `motion_weight`).
    """
    x0 = batch["latents"]  # (B, C, F, h, w)
    B, C, F, h, w = x0.shape
    n_anchors = int(batch.get("n_anchors", 0))
    if not 0 <= n_anchors < F:
        raise ValueError(f"n_anchors must be in [0, F) = [0, {F}), got {n_anchors}")
    if tuple(levels.shape) != (B, F):
        raise ValueError(f"levels must be (B, F) = ({B}, {F}), got {tuple(levels.shape)}")
    noise = batch.get("noise")
    if noise is None:
        noise = torch.randn_like(x0)
    tau = levels.view(B, 1, F, 1, 1).to(x0.dtype)
    x_t = (1 - tau) * x0 + tau * noise  # (B, C, F, h, w)
    pred = model(x_t, levels, batch["audio"], batch["reference"], batch.get("drop_audio"), batch.get("drop_ref"))
    target = x0 if model.prediction == "x0" else noise - x0
    err = (pred - target)[:, :, n_anchors:].pow(2)  # (B, C, F - n_anchors, h, w)
    weight = batch.get("weight")
    return (err if weight is None else err * weight).mean()
