"""SpeechAE: a causal 1D-conv autoencoder that turns speech into one latent per video latent frame.

READ (arXiv 2508.03457) pre-trains a speech autoencoder, self-supervised, that compresses
speech features in time so that speech latents line up one-to-one with the latent frames
of its temporal VAE. That much is the paper's. Everything below is our reconstruction
(DESIGN.md §5):

- Input: log-mel features computed here with `torch.stft` and a mel filterbank written
  in this module (16 kHz, 80 bins, 25 ms window, 10 ms hop), instead of the paper's
  frozen Whisper features (no pretrained weights can be downloaded here).
  The STFT is left-padded so mel frame i covers samples [160i - 240, 160i + 160): it
  ends at the end of its own hop, so the front end looks ahead by zero samples, and
  S samples give exactly S // 160 frames (one video frame = 640 samples = 4 mel frames).
- Encoder: causal 1D convolutions downsampling time by 4·s_t with the VAE's first-frame
  rule. The 4 mel frames of video frame 0 are preceded by 4·(s_t - 1) frames of silence,
  so audio for T = 1 + s_t·k video frames gives exactly 1 + k latents: latent 0 sees
  video frame 0 alone, latent j >= 1 ends with video frame s_t·j. Nothing in the
  encoder looks ahead, so audio after a frame never changes the latents before it.
- Decoder: the mirror image (nearest upsampling + causal convolutions) back to log-mel.
- Deterministic latents, no KL, but training adds Gaussian noise to them (half of each
  channel's std): the decoder must then rely on the coarse, robust part of each latent,
  which made the latents more phonetic (in a sweep on an earlier toy set the held-out
  mouth-opening probe rose from r 0.73 to 0.77 at the same cost; a narrower Da 16, a
  wider or deeper net, or an extra head predicting the next latent's mel helped less).
- A linear read-out term: a training-only `nn.Linear(Da, n_mels)` must recover, from each
  (noisy) latent, the mean log-mel of that latent's own span of 4·s_t mel frames. The
  mean spectrum of a span is a strong, linearly readable summary of what was said (its
  formants say how open the vowel is); the decoder alone is free to bury it in a
  nonlinear code. On data_toy this lifted the held-out probe from r 0.69 to 0.73 at
  the same step count and cost. With `span_parts` = s_t the read-out recovers the mean
  log-mel of each video frame of the span instead (4 x 80 values from one latent): the
  latent must then say how the spectrum moves inside its span, as the mouth does
  (tiny preset; see `tiny()` for the read-outs that chose it). The DiT gets the latents
  standardised per channel with buffers fitted after training (`speech_latents`).
- Training (`train_speech_ae`): self-supervised log-mel reconstruction on the toy
  speech, then the model is frozen. Mouth labels are never used in training; the
  benchmark (`python -m minread.bench speech_ae`) probes the latents for them.
"""

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from minread.data import load_checkpoint, save_checkpoint

SAMPLE_RATE = 16000
HOP = 160                    # 10 ms: 100 mel frames per second
WIN = 400                    # 25 ms analysis window (also the FFT size: 201 bins, 40 Hz apart)
SAMPLES_PER_FRAME = 640      # one video frame at 25 fps
MELS_PER_FRAME = SAMPLES_PER_FRAME // HOP  # 4
LOG_FLOOR = -5.0             # log10 of the smallest mel power kept; also the value of "silence"


@dataclass
class SpeechAEConfig:
    n_mels: int = 80          # log-mel bins in and out
    s_t: int = 4              # video frames per speech latent after the first (the VAE's temporal stride)
    latent_dim: int = 32      # Da, width of one speech latent
    width: int = 64           # channels at 100 Hz; doubled at each downsampling, up to max_width
    max_width: int = 128
    depth: int = 1            # residual blocks per resolution
    # training
    latent_noise: float = 0.5  # Gaussian noise on the latents in training, in units of each channel's std
    span_weight: float = 1.0  # weight of the linear read-out loss: each latent -> mean log-mel of its span
    span_parts: int = 1       # ... of each of this many equal parts of its span (s_t: one per video frame)
    train_frames: int = 33    # video frames per training crop, 1 + s_t*k
    batch_size: int = 32
    steps: int = 800
    lr: float = 2e-3
    warmup: int = 50          # linear warm-up steps, then cosine decay to lr / 10
    grad_clip: float = 1.0
    eval_every: int = 200
    seed: int = 0

    def __post_init__(self):
        if self.s_t < 1 or self.s_t & (self.s_t - 1):
            raise ValueError(f"s_t must be a power of two (got {self.s_t}): time is halved 2·log2(2·s_t) times")
        if (self.train_frames - 1) % self.s_t:
            raise ValueError(f"train_frames must be 1 + s_t*k (s_t={self.s_t}); got {self.train_frames}")

    @property
    def downs(self):
        """Number of stride-2 stages: 4·s_t mel frames per latent frame."""
        return int(math.log2(MELS_PER_FRAME * self.s_t))

    def channels(self, level):
        return min(self.width * 2 ** level, self.max_width)


# Settings that change the network; a checkpoint must agree on all of them to load.
MODEL_FIELDS = ("n_mels", "s_t", "latent_dim", "width", "max_width", "depth")


def tiny():
    """Matches the VAE's tiny preset (s_t = 4): Da 128 at 25/4 = 6.25 Hz, each latent also read
    out as the mean log-mel of each of its 4 video frames (span_parts). Wide latents, little
    latent noise and the per-frame read-out, because the DiT reads the mouth from them.
    Read-outs of the held-out mouth opening of latent frame f's 4 video frames from latents
    f-1..f+1, fitted on the train split (linear ridge / an MLP with two hidden layers of
    256), after 800 steps each: Da 32, noise 0.5: r 0.74 / -; Da 64, noise 0.25: 0.78 / 0.77;
    the same + per-frame read-out: 0.78 / 0.78; Da 128: 0.79 / 0.75; Da 128 + per-frame
    read-out: 0.80 / 0.80; the log-mel of the same span itself: 0.76 / 0.82. Training on
    4x more speech (extra eSpeak clips) changed nothing (0.78 / 0.76 at Da 64)."""
    return SpeechAEConfig(s_t=4, latent_dim=128, width=64, max_width=128, depth=1, train_frames=33,
                          latent_noise=0.25, span_parts=4)


def small():
    """Matches the VAE's small preset (s_t = 8): Da 64 at 25/8 = 3.125 Hz."""
    return SpeechAEConfig(s_t=8, latent_dim=64, width=128, max_width=256, depth=2, train_frames=65,
                          steps=20000, lr=1e-3)


PRESETS = {"tiny": tiny, "small": small}


def num_latents(num_frames, s_t):
    """Latent frames for T video frames: 1 + ceil((T - 1) / s_t) (T = 1 + s_t*k gives 1 + k)."""
    return 1 + -(-(num_frames - 1) // s_t)


# ----------------------------------------------------------------------------- audio front end

def check_audio(wave, sample_rate=SAMPLE_RATE, allow_silent=False):
    """Validate a mono 16 kHz float waveform, (S,) or (B, S) (or (B, 1, S)); return a float32 (B, S) tensor.

    Every failure is a ValueError that names the problem and the fix.
    """
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(wave)
    if not isinstance(wave, torch.Tensor):
        raise ValueError(f"audio must be a numpy array or torch tensor, got {type(wave).__name__}")
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"audio is at {sample_rate} Hz but minread needs {SAMPLE_RATE} Hz: resample it first "
                         f"(minread.data.load_audio(path) loads any file as 16 kHz mono)")
    if not wave.is_floating_point():
        raise ValueError(f"audio must be float in [-1, 1], got {wave.dtype}: for 16-bit PCM divide by 32768")
    if wave.dim() == 3:
        if wave.shape[1] != 1:
            raise ValueError(f"audio has {wave.shape[1]} channels (shape {tuple(wave.shape)}): downmix to mono "
                             f"first, e.g. wave.mean(1)")
        wave = wave[:, 0]
    if wave.dim() == 2 and 1 < wave.shape[1] <= 8 < wave.shape[0]:
        raise ValueError(f"audio of shape {tuple(wave.shape)} looks like (samples, channels) with "
                         f"{wave.shape[1]} channels: downmix to mono first, e.g. wave.mean(-1)")
    if wave.dim() == 1:
        wave = wave[None]
    if wave.dim() != 2:
        raise ValueError(f"audio must be (S,) or (B, S) mono samples, got shape {tuple(wave.shape)}")
    S = wave.shape[1]
    if S < SAMPLES_PER_FRAME:
        raise ValueError(f"audio is {S} samples ({1000 * S / SAMPLE_RATE:.0f} ms) long; at least one video "
                         f"frame ({SAMPLES_PER_FRAME} samples = 40 ms at 16 kHz) is needed")
    if not torch.isfinite(wave).all():
        raise ValueError("audio contains NaN or infinite samples")
    peak = wave.abs().max().item()
    if peak > 2.0:
        raise ValueError(f"audio peaks at {peak:.1f}, expected floats in [-1, 1]: if these are 16-bit PCM "
                         f"values divide by 32768")
    if not allow_silent and peak < 1e-4:
        raise ValueError(f"audio is silent (peak {peak:.1e} < 1e-4): check the file or the channel you picked")
    return wave.float()


def mel_frequencies(n_mels=80, f_min=0.0, f_max=SAMPLE_RATE / 2):
    """n_mels + 2 band edges on the HTK mel scale, m = 2595·log10(1 + f/700), in Hz."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
    m = torch.linspace(mel(f_min), mel(f_max), n_mels + 2, dtype=torch.float64)
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels=80, n_fft=WIN, sample_rate=SAMPLE_RATE):
    """Triangular filters (n_mels, n_fft // 2 + 1); filter m peaks at edge m + 1 of mel_frequencies.

    Filters are area-normalised (Slaney style) so a narrow low band and a wide high band
    give the same value for the same power density.
    """
    edges = mel_frequencies(n_mels)                                               # (n_mels + 2,)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # FFT bin centres
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (bins - lo) / (mid - lo)
    down = (hi - bins) / (hi - mid)
    fb = torch.clamp(torch.minimum(up, down), min=0.0)                            # (n_mels, n_fft//2+1)
    return (fb * (2.0 / (hi - lo))).float()


_FILTERBANKS = {}


def log_mel(wave, sample_rate=SAMPLE_RATE, n_mels=80):
    """Log10 mel power spectrogram, causal: (B, S) -> (B, n_mels, S // 160); (S,) -> (n_mels, S // 160).

    Mel frame i depends on samples [160i - 240, 160i + 160) only (zero look-ahead).
    """
    squeeze = isinstance(wave, (torch.Tensor, np.ndarray)) and wave.ndim == 1
    wave = check_audio(wave, sample_rate, allow_silent=True)                      # (B, S)
    key = (n_mels, wave.device)
    if key not in _FILTERBANKS:
        _FILTERBANKS[key] = mel_filterbank(n_mels).to(wave.device)
    x = F.pad(wave, (WIN - HOP, 0))                                               # (B, S + 240)
    spec = torch.stft(x, n_fft=WIN, hop_length=HOP, window=torch.hann_window(WIN, device=wave.device),
                      center=False, return_complex=True)                          # (B, 201, S // 160)
    mel = _FILTERBANKS[key] @ spec.abs().square()                                  # (B, n_mels, A)
    out = torch.log10(mel.clamp_min(10.0 ** LOG_FLOOR))
    return out[0] if squeeze else out


# ----------------------------------------------------------------------------- the network

class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only: output t sees inputs up to t·stride + stride - 1."""

    def forward(self, x):
        return super().forward(F.pad(x, (self.kernel_size[0] - self.stride[0], 0)))


class FrameNorm(nn.Module):
    """LayerNorm over channels at each time step: it never mixes frames, so it keeps causality."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.transpose(1, 2)).transpose(1, 2)  # (B, C, A)


class ResBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.norm1, self.conv1 = FrameNorm(channels), CausalConv1d(channels, channels, 3)
        self.norm2, self.conv2 = FrameNorm(channels), CausalConv1d(channels, channels, 3)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.conv_in = CausalConv1d(cfg.n_mels, cfg.channels(0), 3)
        self.stages = nn.ModuleList()
        for level in range(cfg.downs):
            blocks = [ResBlock(cfg.channels(level)) for _ in range(cfg.depth)]
            blocks.append(CausalConv1d(cfg.channels(level), cfg.channels(level + 1), 4, stride=2))
            self.stages.append(nn.Sequential(*blocks))
        c = cfg.channels(cfg.downs)
        self.mid = nn.Sequential(*[ResBlock(c) for _ in range(cfg.depth)])
        self.norm_out, self.conv_out = FrameNorm(c), nn.Conv1d(c, cfg.latent_dim, 1)

    def forward(self, x):
        """(B, n_mels, 4·s_t·F) normalised log-mel -> (B, Da, F)."""
        x = self.conv_in(x)
        for stage in self.stages:
            x = stage(x)                                # time halves at each stage
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg.channels(cfg.downs)
        self.conv_in = CausalConv1d(cfg.latent_dim, c, 3)
        self.mid = nn.Sequential(*[ResBlock(c) for _ in range(cfg.depth)])
        self.stages = nn.ModuleList()
        for level in reversed(range(cfg.downs)):
            blocks = [CausalConv1d(cfg.channels(level + 1), cfg.channels(level), 3)]
            blocks += [ResBlock(cfg.channels(level)) for _ in range(cfg.depth)]
            self.stages.append(nn.Sequential(*blocks))
        self.norm_out, self.conv_out = FrameNorm(cfg.channels(0)), nn.Conv1d(cfg.channels(0), cfg.n_mels, 1)

    def forward(self, z):
        """(B, Da, F) -> (B, n_mels, 4·s_t·F) normalised log-mel."""
        x = self.mid(self.conv_in(z))
        for stage in self.stages:
            x = stage(x.repeat_interleave(2, dim=-1))   # nearest upsampling, then causal convs
        return self.conv_out(F.silu(self.norm_out(x)))


class SpeechAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        # per-bin log-mel statistics (fitted on the training audio before training)
        self.register_buffer("mel_mean", torch.full((cfg.n_mels,), -2.0))
        self.register_buffer("mel_std", torch.full((cfg.n_mels,), 1.5))
        # per-channel latent statistics (fitted after training) for the DiT
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_dim))
        self.register_buffer("latent_std", torch.ones(cfg.latent_dim))

    @property
    def pad(self):
        """Silent mel frames put before video frame 0 so it fills a whole latent frame."""
        return MELS_PER_FRAME * (self.cfg.s_t - 1)

    def encode(self, mel):
        """Log-mel (B, n_mels, A), A = 4·(1 + s_t·k) -> latents (B, F, Da), F = 1 + k."""
        B, M, A = mel.shape
        step = MELS_PER_FRAME * self.cfg.s_t
        if M != self.cfg.n_mels or A < MELS_PER_FRAME or (A - MELS_PER_FRAME) % step:
            raise ValueError(f"encode needs log-mel (B, {self.cfg.n_mels}, 4*(1 + {self.cfg.s_t}*k)) for a clip "
                             f"of 1 + {self.cfg.s_t}*k video frames, got {tuple(mel.shape)}; "
                             f"speech_latents(wave) pads the audio for you")
        mel = F.pad(mel, (self.pad, 0), value=LOG_FLOOR)                          # (B, M, 4·s_t·F)
        x = (mel - self.mel_mean[:, None]) / self.mel_std[:, None]
        return self.encoder(x).transpose(1, 2)                                    # (B, F, Da)

    def decode(self, z):
        """Latents (B, F, Da) -> log-mel (B, n_mels, A), A = 4·(1 + s_t·(F - 1))."""
        x = self.decoder(z.transpose(1, 2))[:, :, self.pad:]                     # (B, M, A)
        return x * self.mel_std[:, None] + self.mel_mean[:, None]

    def forward(self, mel):
        return self.decode(self.encode(mel))

    @torch.no_grad()
    def speech_latents(self, wave, sample_rate=SAMPLE_RATE):
        """Waveform (B, S) at 16 kHz -> standardised speech latents (B, F, Da) for the DiT.

        Audio for T = 1 + s_t·k video frames (T·640 samples) gives F = 1 + k latents. Any
        other length is padded with silence at the end up to the next such T; since the
        encoder is causal this never changes the latents of the audio that is there.
        """
        wave = check_audio(wave, sample_rate)                                    # (B, S)
        T = -(-wave.shape[1] // SAMPLES_PER_FRAME)
        T = 1 + self.cfg.s_t * (num_latents(T, self.cfg.s_t) - 1)
        wave = F.pad(wave, (0, T * SAMPLES_PER_FRAME - wave.shape[1]))            # (B, T·640)
        z = self.encode(log_mel(wave.to(self.mel_mean.device), n_mels=self.cfg.n_mels))
        return (z - self.latent_mean) / self.latent_std                           # (B, F, Da)


# ----------------------------------------------------------------------------- checkpoints

def load_speech_ae(path, cfg=None, device="cpu"):
    """Load a trained, frozen SpeechAE. With cfg (a config or a preset name), refuse a checkpoint of another config."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no SpeechAE checkpoint at {path}: train one with "
                                f"`python -m minread train --stage speech_ae --preset tiny` or train_speech_ae(cfg, out=...)")
    ckpt = load_checkpoint(path, map_location=device)
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a SpeechAE checkpoint (no 'config'/'model' entries)")
    stored = SpeechAEConfig(**ckpt["config"])
    if isinstance(cfg, str):
        if cfg not in PRESETS:
            raise ValueError(f"unknown preset {cfg!r}; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[cfg]()
    if cfg is not None:
        diff = [f"{k}: checkpoint {getattr(stored, k)} vs requested {getattr(cfg, k)}"
                for k in MODEL_FIELDS if getattr(stored, k) != getattr(cfg, k)]
        if diff:
            raise ValueError(f"{path} was trained with another SpeechAE config ({'; '.join(diff)}): "
                             f"use a checkpoint trained with this preset or pass its own config")
    model = SpeechAE(stored).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- training

def toy_speech(data_root="data_toy", split="train"):
    """The speech of every clip of a data_toy split, as a list of 1D float32 tensors."""
    from minread.data import ToyClipDataset
    return [c["audio"] for c in ToyClipDataset(data_root, split, frames=1).clips]   # whole clips


def lr_at(step, cfg, steps):
    """Linear warm-up, then cosine decay from lr to lr / 10."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def clip_mels(waves, cfg, min_frames=1):
    """Log-mel of whole clips, each trimmed to 1 + s_t·k video frames: list of (n_mels, A)."""
    mels = []
    for w in waves:
        T = len(w) // SAMPLES_PER_FRAME
        T = 1 + cfg.s_t * ((T - 1) // cfg.s_t)
        if T >= min_frames:
            mels.append(log_mel(w[: T * SAMPLES_PER_FRAME], n_mels=cfg.n_mels))
    return mels


def sample_crops(mels, cfg, gen):
    """A batch of random crops of train_frames video frames, starting on a video frame: (B, n_mels, A)."""
    A = MELS_PER_FRAME * cfg.train_frames
    clip = torch.randint(len(mels), (cfg.batch_size,), generator=gen)
    crops = []
    for c in clip.tolist():
        frames = mels[c].shape[1] // MELS_PER_FRAME
        start = torch.randint(frames - cfg.train_frames + 1, (1,), generator=gen).item() * MELS_PER_FRAME
        crops.append(mels[c][:, start:start + A])
    return torch.stack(crops)                                                     # (B, n_mels, A)


def span_means(model, mel, parts=1):
    """Normalised log-mel averaged over each of `parts` equal pieces of the 4·s_t mel frames
    of each latent: (B, n_mels, A) -> (B, F, parts*n_mels), piece-major."""
    x = (F.pad(mel, (model.pad, 0), value=LOG_FLOOR) - model.mel_mean[:, None]) / model.mel_std[:, None]
    B, M, A = x.shape
    L = 4 * model.cfg.s_t                                                        # mel frames per latent
    x = x.reshape(B, M, A // L, parts, L // parts).mean(-1)                       # (B, M, F, parts)
    return x.permute(0, 2, 3, 1).reshape(B, A // L, parts * M)                    # (B, F, parts*M)


def ae_loss(model, span_head, mel, cfg):
    """Reconstruction from noisy latents + linear read-out of each latent's mean log-mel (per-bin std units).

    The noise (latent_noise x each channel's std) makes the decoder rely on the coarse,
    robust part of each latent. The read-out asks one linear map to recover the mean
    spectrum of the latent's own span: that keeps the spectral envelope (formants, so
    vowel openness) linearly readable, as the DiT reads latents through linear projections.
    """
    target = (mel - model.mel_mean[:, None]) / model.mel_std[:, None]            # (B, n_mels, A)
    z = model.encode(mel)                                                         # (B, F, Da)
    z = z + cfg.latent_noise * z.detach().std(dim=(0, 1)) * torch.randn_like(z)
    pred = (model.decode(z) - model.mel_mean[:, None]) / model.mel_std[:, None]
    loss = F.mse_loss(pred, target)
    if cfg.span_weight:
        spans, target = span_head(z), span_means(model, mel, cfg.span_parts)      # (B, F, parts*n_mels)
        if spans.shape != target.shape:
            raise ValueError(f"the span read-out gives {tuple(spans.shape)} but span_parts={cfg.span_parts} needs "
                             f"{tuple(target.shape)}: make it nn.Linear(latent_dim, n_mels * span_parts)")
        loss = loss + cfg.span_weight * F.mse_loss(spans, target)
    return loss


@torch.no_grad()
def evaluate(model, mels):
    """Held-out reconstruction of whole clips: MSE in log10 units² and mean absolute error in dB."""
    se = ae = n = 0.0
    for mel in mels:
        rec = model(mel[None])[0]
        se += (rec - mel).square().sum().item()
        ae += (rec - mel).abs().sum().item()
        n += mel.numel()
    return {"mse": se / n, "mae_db": 10 * ae / n}


@torch.no_grad()
def fit_latent_stats(model, mels):
    """Per-channel mean and std of the latents over the training clips (buffers for speech_latents)."""
    z = torch.cat([model.encode(m[None])[0] for m in mels])                      # (sum F, Da)
    model.latent_mean.copy_(z.mean(0))
    model.latent_std.copy_(z.std(0).clamp_min(1e-4))


def train_speech_ae(cfg, steps=None, out="runs/speech_ae_tiny/ckpt.pt", data_root="data_toy", seed=None,
                    resume=True, train_audio=None, eval_audio=None, until=None, log=None):
    """Stage 1: train the SpeechAE to reconstruct log-mel (no labels), then fit its latent statistics.

    train_audio / eval_audio: lists of 1D waveforms (default: the data_toy train / test
    splits). Resumes exactly from `out` if it exists and `resume`; `until` stops early
    (after that step, with a checkpoint) to test resuming. Returns a dict of figures.
    """
    import time
    steps = cfg.steps if steps is None else steps
    seed = cfg.seed if seed is None else seed
    cfg = dataclasses.replace(cfg, steps=steps, seed=seed)
    out = os.fspath(out)
    log = log or tqdm.write
    train_audio = toy_speech(data_root, "train") if train_audio is None else train_audio
    eval_audio = toy_speech(data_root, "test") if eval_audio is None else eval_audio
    train_mels = clip_mels(train_audio, cfg, min_frames=cfg.train_frames)
    eval_mels = clip_mels(eval_audio, cfg)
    if not train_mels:
        raise ValueError(f"no training clip has {cfg.train_frames} video frames; lower train_frames")

    torch.manual_seed(seed)
    model = SpeechAE(cfg)
    frames = torch.cat(train_mels, dim=1)                                         # (n_mels, all frames)
    model.mel_mean.copy_(frames.mean(1))
    model.mel_std.copy_(frames.std(1).clamp_min(1e-2))
    # training-only linear read-out of each latent's span (kept in the checkpoint for exact resume)
    span_head = nn.Linear(cfg.latent_dim, cfg.n_mels * cfg.span_parts)
    params = list(model.parameters()) + list(span_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    step, history = 0, []
    if resume and os.path.exists(out):
        ckpt = load_checkpoint(out)
        stored = {k: ckpt["config"][k] for k in MODEL_FIELDS}
        if stored != {k: getattr(cfg, k) for k in MODEL_FIELDS}:
            raise ValueError(f"{out} holds a SpeechAE of another config ({stored}); pass resume=False or another out")
        if "span_head" not in ckpt:
            raise ValueError(f"{out} was written before the span read-out was added and cannot resume exactly; "
                             f"pass resume=False (`--restart` for `python -m minread train`) to train afresh")
        model.load_state_dict(ckpt["model"])
        span_head.load_state_dict(ckpt["span_head"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["rng"]["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        step, history = ckpt["step"], ckpt["history"]

    def checkpoint():
        save_checkpoint(out, dict(model=model.state_dict(), span_head=span_head.state_dict(),
                                  optimizer=opt.state_dict(), step=step,
                                  rng={"sampler": gen.get_state(), "torch": torch.get_rng_state()},
                                  config=dataclasses.asdict(cfg), history=history))

    t0, last = time.time(), until if until is not None else steps
    bar = tqdm(total=steps, initial=step, desc="speech_ae", dynamic_ncols=True)
    model.train()
    while step < min(steps, last):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, steps)
        mel = sample_crops(train_mels, cfg, gen)                                  # (B, n_mels, A)
        loss = ae_loss(model, span_head, mel, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.eval_every == 0 or step == steps:
            model.eval()
            ev = evaluate(model, eval_mels)
            model.train()
            history.append({"step": step, "train_loss": loss.item(), **ev})
            log(f"step {step}: train loss {loss.item():.4f}, held-out log-mel MSE {ev['mse']:.4f} "
                f"(MAE {ev['mae_db']:.2f} dB)")
            checkpoint()
    bar.close()
    if step < steps:  # stopped early by `until`
        checkpoint()
        return {"step": step, "history": history}
    model.eval()
    fit_latent_stats(model, train_mels)
    checkpoint()
    ev = evaluate(model, eval_mels)
    return {"step": step, "seconds": time.time() - t0, "params": sum(p.numel() for p in model.parameters()),
            "eval_mse": ev["mse"], "eval_mae_db": ev["mae_db"], "history": history}
