"""A2V-DiT speed: `python -m minread.bench dit [--threads 2] [--impls sdpa,math]`.

Measures, on this machine and thread count:
- the forward pass of one ANS window at batch 1 (reference + M anchors + W clips of n
  latent frames; tiny: 1 + 2 + 2*2 = 7 latent frames, 112 tokens), under torch.no_grad,
  once per attention implementation (the target for tiny is <= 8 ms);
- one training step (dit_loss, backward, AdamW) at batch 32 (target <= 0.6 s).
Run it under the shared lock on a shared machine:
`flock /tmp/minread-cpu.lock python -m minread.bench dit`.
"""

import argparse
import os
import statistics
import time

import torch

from minread import bench, dit


def window(cfg, B, n_anchors, frames, grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = n_anchors + frames
    return dict(latents=torch.randn(B, cfg.latent_channels, F, grid, grid, generator=g),
                audio=torch.randn(B, F, cfg.audio_dim, generator=g),
                reference=torch.randn(B, cfg.latent_channels, 1, grid, grid, generator=g),
                n_anchors=n_anchors)


def time_forward(model, batch, repeats):
    F = batch["latents"].shape[2]
    levels = torch.rand(batch["latents"].shape[0], F)
    levels[:, :batch["n_anchors"]] = 0
    args = (batch["latents"], levels, batch["audio"], batch["reference"])
    with torch.no_grad():
        for _ in range(10):
            model(*args)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(*args)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, min(times) * 1e3


def time_train_step(model, batch, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, F = batch["latents"].shape[0], batch["latents"].shape[2]
    times = []
    for i in range(steps + 2):
        t = time.perf_counter()
        levels = torch.rand(B, F)
        levels[:, :batch["n_anchors"]] = 0
        loss = dit.dit_loss(model, batch, levels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i >= 2:  # the first steps allocate
            times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m minread.bench dit", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="DiT preset")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--impls", default="sdpa,math", help="attention impls to time for the forward "
                    "(comma list of sdpa, math, flex, flex_eager; flex compiles first)")
    ap.add_argument("--anchors", type=int, default=2, help="motion anchors M")
    ap.add_argument("--frames", type=int, default=4, help="window frames W*n")
    ap.add_argument("--batch", type=int, default=32, help="training batch size")
    ap.add_argument("--repeats", type=int, default=100, help="timed forward passes")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = getattr(dit, args.preset)()
    model = dit.A2VDiT(cfg)
    # random weights instead of the zero adaLN init, so every branch does real work
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    figures = {"bench": "dit", "preset": args.preset, "params": model.num_params(), **bench.machine()}

    step_ms, step_min = time_train_step(model.train(), window(cfg, args.batch, args.anchors, args.frames),
                                        args.steps)
    print(f"train step, batch {args.batch}: median {step_ms:.3f} s (min {step_min:.3f} s)  target <= 0.6 s")
    figures.update(train_step_s=step_ms, train_step_min_s=step_min)

    model.eval()
    one = window(cfg, 1, args.anchors, args.frames)
    tokens = (1 + args.anchors + args.frames) * 16
    for impl in args.impls.split(","):
        for block in model.blocks:
            block.attn.impl = impl
        med, low = time_forward(model, one, args.repeats)
        print(f"forward, 1 window ({tokens} tokens), impl={impl}: median {med:.2f} ms (min {low:.2f} ms)"
              f"  target <= 8 ms")
        figures[f"forward_ms_{impl}"] = med
        figures[f"forward_min_ms_{impl}"] = low
    bench.report(figures)
