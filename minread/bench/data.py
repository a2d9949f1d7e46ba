"""Toy-world benchmark: `python -m minread.bench data [--root data_toy]`.

Is lip-sync learnable from the toy speech, and is it more than loudness? A ridge
regression from log-spectral audio features (+-3 frames of context) to the mouth
opening is fitted on the train clips and scored on held-out clips (unseen identities
and sentences), next to the same regression on frame energy alone. Also: read-back r of
the ground-truth frames at 32 and 64 px, rendering speed and the size of the set.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from minread import data, metrics
from minread.bench import machine, report

BANDS, CONTEXT = 40, 3


def frame_features(audio):
    """Per-video-frame log band energies: audio (T*640,) -> (T, BANDS) and log energy (T, 1)."""
    T = len(audio) // data.HOP
    pad = np.pad(audio, (192, 192))                                       # 1024-sample windows
    idx = np.arange(T)[:, None] * data.HOP + np.arange(1024)[None]        # (T, 1024)
    spec = np.abs(np.fft.rfft(pad[idx] * np.hanning(1024), axis=1)) ** 2  # (T, 513)
    edges = np.unique(np.geomspace(2, 513, BANDS + 1).astype(int))
    bands = np.stack([spec[:, a:b].sum(1) for a, b in zip(edges[:-1], edges[1:])], 1)
    return np.log(bands + 1e-8), np.log(spec.sum(1, keepdims=True) + 1e-8)


def with_context(x):
    """Stack +-CONTEXT neighbouring frames (edge-padded): (T, D) -> (T, (2*CONTEXT+1)*D)."""
    T = len(x)
    padded = np.pad(x, ((CONTEXT, CONTEXT), (0, 0)), mode="edge")
    return np.concatenate([padded[k:k + T] for k in range(2 * CONTEXT + 1)], 1)


def ridge_r(train, test, lam=10.0):
    """Fit ridge on [(X, y)] train clips; Pearson r of predictions on the pooled test clips."""
    X = np.concatenate([x for x, _ in train]); y = np.concatenate([t for _, t in train])
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Xn = (X - mu) / sd
    w = np.linalg.solve(Xn.T @ Xn + lam * len(Xn) / 1000 * np.eye(Xn.shape[1]), Xn.T @ (y - y.mean()))
    Xt = np.concatenate([x for x, _ in test]); yt = np.concatenate([t for _, t in test])
    pred = (Xt - mu) / sd @ w + y.mean()
    return float(np.corrcoef(pred, yt)[0, 1])


def main(argv):
    p = argparse.ArgumentParser(prog="python -m minread.bench data", description=__doc__)
    p.add_argument("--root", default="data_toy", help="a rendered toy set")
    p.add_argument("--render-clips", type=int, default=12, help="clips rendered to time the renderer")
    args = p.parse_args(argv)

    sets = {s: data.ToyClipDataset(args.root, s, size=64, frames=1).clips for s in ("train", "test")}
    feats = {s: [(frame_features(c["audio"].numpy()), c["opening"].numpy()) for c in clips]
             for s, clips in sets.items()}
    spectral = {s: [(with_context(b), y) for (b, _), y in v] for s, v in feats.items()}
    energy = {s: [(with_context(e), y) for (_, e), y in v] for s, v in feats.items()}
    r_ridge, r_energy = ridge_r(spectral["train"], spectral["test"]), ridge_r(energy["train"], energy["test"])
    print(f"held-out audio->opening ridge r = {r_ridge:.3f} (log-spectral, +-{CONTEXT} frames); "
          f"energy only r = {r_energy:.3f}")

    readback, amplitude = {}, {}
    for size in (64, 32):
        rs, amps = [], []
        for c in sets["test"]:
            video = c["video"] if size == 64 else data.to_tensor(
                ((c["video"].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy(), size)
            read = metrics.read_opening(video, video[:, 0])
            rs.append(metrics.lip_corr(read, c["opening"]))
            amps.append(metrics.amplitude_ratio(read, c["opening"]))
        readback[size], amplitude[size] = float(np.mean(rs)), float(np.mean(amps))
        print(f"read-back of ground-truth frames (decoded mp4) at {size} px: r mean {readback[size]:.4f}, "
              f"min {min(rs):.4f}; amplitude ratio {amplitude[size]:.3f} over {len(rs)} held-out clips")

    speed = {}
    for source in ("espeak", "babble"):
        t0, seconds = time.perf_counter(), 0.0
        for k in range(args.render_clips):
            clip = data.render_clip(900_000 + k, data.SENTENCES[k], size=64, seed=k, source=source)
            seconds += len(clip["audio"]) / data.SAMPLE_RATE
        speed[source] = (time.perf_counter() - t0) / (seconds / 60)
        print(f"rendering ({source}, 64 px): {speed[source]:.2f} s per minute of speech")
    size_mb = sum(f.stat().st_size for f in Path(args.root).rglob("*") if f.is_file()) / 2 ** 20
    minutes = sum(c["video"].shape[1] for v in sets.values() for c in v) / data.FPS / 60
    print(f"{args.root}: {size_mb:.1f} MB, {minutes:.1f} min of speech, "
          f"{len(sets['train'])} train / {len(sets['test'])} held-out clips")
    report(dict(ridge_r=r_ridge, energy_r=r_energy, readback_r_64=readback[64], readback_r_32=readback[32],
                readback_amplitude_64=amplitude[64], readback_amplitude_32=amplitude[32],
                render_s_per_min_espeak=speed["espeak"], render_s_per_min_babble=speed["babble"],
                data_mb=size_mb, data_minutes=minutes, **machine()))
