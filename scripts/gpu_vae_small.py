"""The small-preset VAE (128 px, 32x32x8, C = 64) on one GPU: held-out PSNR and LipCorr
against training time.

    python scripts/gpu_vae_small.py                         # 400 faces, 1400 steps at batch 32, Muon
    python scripts/gpu_vae_small.py --minutes 5             # as many steps as 5 minutes hold
    python scripts/gpu_vae_small.py --optimizer adamw       # the optimiser of the figures below
    python scripts/gpu_vae_small.py --identities 1600 --steps 6000 --out runs/vae_small
    python scripts/gpu_vae_small.py --device cpu --identities 4 --steps 2 --workers 1   # smoke run

The faces are rendered in memory first, on every core (`ClipBank.render(workers=...)`),
before anything touches the GPU. The held-out evaluation is data_toy's test split
(identities no face bank holds). Prints one line per evaluation and a summary.

Measured on an H200 (torch 2.11) with AdamW, before Muon became the recipe's optimiser
(not yet measured on a GPU): a run whose schedule held 1394 steps at batch 32
(`--steps 1394 --optimizer adamw` repeats that schedule and its evaluations; GPU
shared with other jobs, 3.6 min of training + 0.4 min rendering) reached held-out PSNR
30.03 dB and LipCorr 0.934 (true frames 0.994); alone, a step takes 27 ms. A longer
schedule on the same 400 faces overfits: 9374 steps in 5.2 min ended at 29.49 dB (29.53 at
best; training L1 0.019 against 0.045), so longer runs want more faces (--identities).
On data_toy's few training faces alone (--identities 0) the previous small VAE reached
14.8 dB in 5000 steps.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minread import vae as V  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--identities", type=int, default=400, help="faces rendered to train on")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="processes rendering them")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps (default 1400; with --minutes, at most)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="fit the run to this many minutes of training: train_vae times steps 20-60 and cuts "
                         "the schedule to the steps that fit (at most --steps)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--optimizer", default=V.VAETrainConfig.optimizer, choices=["muon", "adamw"],
                    help="Muon for the conv filters (the recipe's) or AdamW for everything")
    ap.add_argument("--evals", type=int, default=4, help="held-out evaluations along a run of --steps")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between evaluations with --minutes")
    ap.add_argument("--data", default="data_toy", help="toy set whose test split is held out")
    ap.add_argument("--out", default="runs/vae_small_gpu", help="folder of the checkpoint")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run")
    args = ap.parse_args()
    cfg, t = V.small(), V.VAETrainConfig()
    t0 = time.time()
    train = V.ClipBank.render(args.identities, cfg.image_size, t.seed, workers=args.workers)
    test = V.ClipBank.load(args.data, "test", cfg.image_size)
    render_min = (time.time() - t0) / 60
    print(f"rendered {args.identities} faces at {cfg.image_size} px in {render_min:.1f} min ({args.workers} workers)",
          flush=True)
    steps = args.steps or (10**6 if args.minutes else 1400)
    t1 = time.time()
    stats = V.train_vae(cfg, out_dir=args.out, device=args.device, resume=False, banks=(train, test),
                        progress=False, identities=args.identities, steps=steps, minutes=args.minutes or 0.0,
                        batch_size=args.batch, optimizer=args.optimizer, ckpt_every=steps,
                        eval_every=args.eval_every if args.minutes else max(1, steps // args.evals))
    train_min = (time.time() - t1) / 60
    print(f"small VAE ({args.optimizer}): {stats['step']} steps at batch {args.batch} in {train_min:.1f} min (+ {render_min:.1f} min "
          f"rendering): held-out PSNR {stats['psnr']:.2f} dB, LipCorr {stats['lip_corr']:.3f} (true frames "
          f"{stats['lip_corr_true_frames']:.3f}); targets PSNR >= 30 dB, LipCorr >= 0.90 in <= 10 min of training")


if __name__ == "__main__":
    main()
