"""SpeechAE benchmark: held-out reconstruction and a linear probe for phonetic content.

`python -m minread.bench speech_ae --ckpt runs/speech_ae_tiny/ckpt.pt`

- Reconstruction: log-mel MSE (log10 units²) and mean absolute error (dB) on the held-out
  clips of data_toy (voices and sentences never seen in training).
- Probe: a ridge regression from ONE speech latent (Da numbers) to the mean mouth opening
  of the video frames it covers (latent 0: frame 0; latent j: frames 1 + s_t(j-1) .. s_t·j),
  fitted on the train clips and scored (Pearson r) on the held-out clips. Next to it the
  same probe on raw frame energy: the log power of each of those s_t video frames. The
  SpeechAE never saw mouth labels; if the latent beats energy clearly, it carries
  phonetic content, not just loudness.
- Frame probe, what the DiT needs: the opening of each of the s_t video frames of latent
  f from latents f-1..f+1 (the DiT's adaLN hears those), scored like LipCorr (Pearson r
  per held-out clip, averaged), by ridge and by a small MLP (two hidden layers of 256,
  fitted on the train clips); beside it the same read-outs from the log-mel of the same
  span (the SpeechAE's input, 3·4·s_t mel frames): what the compression keeps of it.
  Read-outs fitted on data_toy's 160 training clips underrate the features: with
  `--extra-clips 1280` (speech and mouth tracks of new voices, no frames rendered; needs
  the `speech` extra) the frame probe is also fitted on those, as the DiT is trained on
  2720 clips. Tiny preset, held-out r on 160 / 1440 clips, ridge and MLP: latents 0.79, 0.80 /
  0.81, 0.88; log-mel 0.75, 0.81 / 0.78, 0.90.
"""

import argparse
import time

import numpy as np
import torch

from minread.bench import machine, report
from minread.speech_ae import SAMPLES_PER_FRAME, evaluate, clip_mels, load_speech_ae


def toy_clips(data_root, split):
    """(audio (S,), opening (T,)) of every clip of a data_toy split."""
    from minread.data import ToyClipDataset
    return [(c["audio"], c["opening"]) for c in ToyClipDataset(data_root, split, frames=1).clips]


def extra_clips(n):
    """(audio, opening) of the first n extra training clips (data.render_training_clips, no frames)."""
    if n <= 0:
        return []
    if n % 4:
        raise ValueError(f"--extra-clips must be a multiple of 4 (4 clips per new face, each its own voice), got {n}")
    from minread.data import render_training_clips
    clips = render_training_clips(n // 4, 4, progress=True, frames=False)
    return [(c["audio"], c["opening"]) for c in clips]


def spans(F, s_t):
    """Video frames covered by each latent: [(0, 1), (1, 1 + s_t), ...]."""
    return [(0, 1)] + [(1 + s_t * (j - 1), 1 + s_t * j) for j in range(1, F)]


@torch.no_grad()
def probe_features(model, clips):
    """Per latent: standardised latent (Da,), frame log-energies (s_t,), mean opening; stacked over clips."""
    s_t = model.cfg.s_t
    lat, energy, target = [], [], []
    for audio, opening in clips:
        audio, opening = torch.as_tensor(audio), torch.as_tensor(opening)
        T = 1 + s_t * ((len(opening) - 1) // s_t)
        audio, opening = audio[: T * SAMPLES_PER_FRAME], opening[:T]
        z = model.speech_latents(audio[None])[0]                                 # (F, Da)
        power = audio.reshape(T, SAMPLES_PER_FRAME).square().mean(1)
        log_e = torch.log10(power + 1e-8)                                         # (T,)
        for j, (a, b) in enumerate(spans(z.shape[0], s_t)):
            lat.append(z[j].cpu())
            e = log_e[a:b]
            energy.append((e.repeat(s_t)[:s_t] if len(e) < s_t else e).cpu())            # latent 0: frame 0 repeated
            target.append(opening[a:b].float().mean().cpu())
    return (torch.stack(lat).double().cpu(), torch.stack(energy).double().cpu(), torch.stack(target).double().cpu())


def ridge(X, y, lam=1.0):
    """Ridge regression on standardised features; returns a predict function."""
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-8)
    Xs = torch.cat([(X - mu) / sd, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    reg = lam * torch.eye(Xs.shape[1], dtype=X.dtype)
    reg[-1, -1] = 0                                                               # no penalty on the bias
    w = torch.linalg.solve(Xs.T @ Xs + reg, Xs.T @ y)
    return lambda Z: torch.cat([(Z - mu) / sd, torch.ones(len(Z), 1, dtype=Z.dtype)], 1) @ w


def pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))


def probe(model, train_clips, test_clips, lam=1.0):
    """Held-out Pearson r of the latent probe and of the energy probe."""
    lat_tr, en_tr, y_tr = probe_features(model, train_clips)
    lat_te, en_te, y_te = probe_features(model, test_clips)
    return {"probe_r_latent": pearson(ridge(lat_tr, y_tr, lam)(lat_te), y_te),
            "probe_r_energy": pearson(ridge(en_tr, y_tr, lam)(en_te), y_te),
            "probe_train_latents": len(y_tr), "probe_test_latents": len(y_te)}


@torch.no_grad()
def frame_probe_features(model, clips):
    """Per latent f >= 1: latents f-1..f+1 (3Da,), log-mel of the same span (80·3·4s_t,), the
    s_t openings (s_t,), the clip index."""
    from minread.speech_ae import LOG_FLOOR, log_mel
    s_t, Da = model.cfg.s_t, model.cfg.latent_dim
    lat, mel, target, clip = [], [], [], []
    for i, (audio, opening) in enumerate(clips):
        audio, opening = torch.as_tensor(audio), torch.as_tensor(opening)
        T = 1 + s_t * ((len(opening) - 1) // s_t)
        wave = audio[None, : T * SAMPLES_PER_FRAME]
        z = torch.nn.functional.pad(model.speech_latents(wave)[0], (0, 0, 1, 1))  # (F+2, Da), zeros at the ends
        m = log_mel(wave)[0]                                                      # (80, 4T)
        L = 4 * s_t                                                               # mel frames per latent
        m = torch.nn.functional.pad(m, (L - 4, L), value=LOG_FLOOR)              # latent f's span starts at L*f
        for f in range(1, z.shape[0] - 2):
            lat.append(z[f:f + 3].flatten())                                      # latents f-1, f, f+1
            mel.append(m[:, L * (f - 1):L * (f + 2)].flatten())                  # their spans
            target.append(opening[1 + s_t * (f - 1):1 + s_t * f].float())
            clip.append(i)
    return torch.stack(lat), torch.stack(mel), torch.stack(target), torch.tensor(clip)


def mlp_probe(X, Y, steps=3000, hidden=256, seed=0):
    """A small MLP read-out (dropout on the inputs, AdamW); returns a predict function."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = X.mean(0), X.std(0) + 1e-5
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(X.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, Y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-3)
    for _ in range(steps):
        idx = torch.randint(len(X), (256,), generator=g)
        loss = (net((X[idx] - mu) / sd) - Y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return lambda Z: net((Z - mu) / sd).detach()


def frame_probe(model, train_clips, test_clips, mlp=True):
    """LipCorr-style r of the frame read-outs: {source_method: r}."""
    lat, mel, y, _ = frame_probe_features(model, train_clips)
    lat_t, mel_t, y_t, clip_t = frame_probe_features(model, test_clips)
    def r(pred):
        return float(np.mean([pearson(pred[clip_t == i].flatten().double(), y_t[clip_t == i].flatten().double())
                              for i in clip_t.unique()]))
    out = {}
    for name, X, Xt, lam in (("latents", lat, lat_t, 25.0), ("logmel", mel, mel_t, 250.0)):
        X, Xt = X.double(), Xt.double()
        out[f"frame_probe_{name}_ridge"] = r(ridge(X, y.double(), lam)(Xt))
        if mlp:
            out[f"frame_probe_{name}_mlp"] = r(mlp_probe(X.float(), y)(Xt.float()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minread.bench speech_ae", description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="runs/speech_ae_tiny/ckpt.pt", help="trained SpeechAE checkpoint")
    ap.add_argument("--data", default="data_toy", help="toy data root with train/ and test/ splits")
    ap.add_argument("--lam", type=float, default=1.0, help="ridge penalty on standardised features")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--no-mlp", action="store_true", help="ridge read-outs only (the MLPs take ~2 minutes)")
    ap.add_argument("--extra-clips", type=int, default=0,
                    help="also fit the frame probe on this many extra eSpeak clips (speech only, ~0.15 s each)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_speech_ae(args.ckpt)
    train_clips, test_clips = toy_clips(args.data, "train"), toy_clips(args.data, "test")
    rec = evaluate(model, clip_mels([a for a, _ in test_clips], model.cfg))
    figures = {"bench": "speech_ae", "ckpt": args.ckpt, "s_t": model.cfg.s_t, "Da": model.cfg.latent_dim,
               "latent_hz": 25 / model.cfg.s_t, "params": sum(p.numel() for p in model.parameters()),
               "heldout_logmel_mse": rec["mse"], "heldout_logmel_mae_db": rec["mae_db"],
               **probe(model, train_clips, test_clips, args.lam),
               **frame_probe(model, train_clips + extra_clips(args.extra_clips), test_clips, mlp=not args.no_mlp),
               "frame_probe_train_clips": len(train_clips) + args.extra_clips}
    figures["probe_margin"] = figures["probe_r_latent"] - figures["probe_r_energy"]
    figures["seconds"] = time.time() - t0
    figures["machine"] = machine()
    print(f"held-out log-mel reconstruction: MSE {rec['mse']:.4f} (log10 units²), MAE {rec['mae_db']:.2f} dB")
    print(f"probe r (one latent -> mean opening), held-out: latent {figures['probe_r_latent']:.3f}, "
          f"energy {figures['probe_r_energy']:.3f}, margin {figures['probe_margin']:+.3f}")
    for source in ("latents", "logmel"):
        print(f"frame probe from {source} f-1..f+1 -> the {model.cfg.s_t} openings of latent f, fitted on "
              f"{figures['frame_probe_train_clips']} clips, held-out r: "
              + ", ".join(f"{k.rsplit('_', 1)[1]} {v:.3f}" for k, v in figures.items()
                          if k.startswith(f"frame_probe_{source}_")))
    report(figures)
