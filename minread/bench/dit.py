"""A2V-DiT speed: `python -m minread.bench dit [--threads 2] [--impls sdpa,math]`.

Measures, on this machine and thread count, side by side (calls interleaved, so load
from other jobs on a shared machine falls on every variant alike):
- the forward pass of one ANS window at batch 1 (reference + M anchors + W clips of n
  latent frames; tiny: 1 + 1 + 2*2 = 6 latent frames, 96 tokens) under
  torch.inference_mode, through the reference path (`model.fused = False`), the fused
  path (the default) and the torch.compile'd fused path (`A2VDiT(cfg, compile=True)`;
  its first call compiles, timed apart), plus the reference path with each other
  attention impl of --impls (the target for tiny is <= 8 ms);
- one training step (dit_loss, backward, AdamW) at batch 32, reference against fused
  path (target <= 0.6 s).
Wall times (median, min) and CPU time per thread: on a machine shared with other jobs
the CPU time at --threads 1 is the closest reading of the uncontended wall time.
Run it under the shared lock on a shared machine:
`flock /tmp/minread-cpu.lock python -m minread.bench dit`.

`--compare SECONDS` instead trains the tiny DiT twice with equal compute (x̂₀-prediction
for SECONDS, then v̂-prediction for as many steps; batch 32, ANS levels), on a *proxy* latent space that needs no trained VAE or
SpeechAE: toy frames averaged over the VAE's frame groups (frame 0 alone, then 4
frames), 4x4-pooled and folded 2x2 into 12 channels on a 4x4 grid; log-mel averaged per
latent frame and over pairs of bands (40 dims). It then generates held-out windows
(2 clean anchors + 4 frames from noise, 8 Euler steps) and reads the mouth opening
back with a ridge probe fitted on clean training latents: probe LipCorr is the Pearson
r of that read-back with the true opening, as `metrics.lip_corr` does in pixels. It
trains on CUDA when there is one.
"""

import argparse
import copy
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


def time_forward(models, batch, repeats):
    """{name: model} -> {name: (median ms, min ms, CPU ms per thread)} for one batch."""
    F = batch["latents"].shape[2]
    levels = torch.rand(batch["latents"].shape[0], F)
    levels[:, :batch["n_anchors"]] = 0
    args = (batch["latents"], levels, batch["audio"], batch["reference"])
    times, cpu = {name: [] for name in models}, dict.fromkeys(models, 0.0)
    with torch.inference_mode():
        for model in models.values():
            for _ in range(10):
                model(*args)
        for _ in range(repeats):
            for name, model in models.items():  # interleaved
                c, t = time.process_time(), time.perf_counter()
                model(*args)
                times[name].append(time.perf_counter() - t)
                cpu[name] += time.process_time() - c
    threads = torch.get_num_threads()
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3, cpu[name] / repeats / threads * 1e3)
            for name, t in times.items()}


def time_train_step(models, batch, steps):
    """{name: model} -> {name: (median s, min s, CPU s per thread)} per training step."""
    opts = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    B, F = batch["latents"].shape[0], batch["latents"].shape[2]
    times, cpu = {name: [] for name in models}, dict.fromkeys(models, 0.0)
    for i in range(steps + 2):
        levels = torch.rand(B, F)
        levels[:, :batch["n_anchors"]] = 0
        for name, model in models.items():  # interleaved
            c, t = time.process_time(), time.perf_counter()
            loss = dit.dit_loss(model, batch, levels)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            if i >= 2:  # the first steps allocate
                times[name].append(time.perf_counter() - t)
                cpu[name] += time.process_time() - c
    threads = torch.get_num_threads()
    return {name: (statistics.median(t), min(t), cpu[name] / steps / threads) for name, t in times.items()}


def proxy_latents(video, audio):
    """Toy clip -> proxy latents (12, F, 4, 4), speech features (F, 40); see the docstring."""
    from minread.speech_ae import log_mel
    T = 1 + (video.shape[1] - 1) // 4 * 4
    v = video[:, :T]
    frames = torch.cat([v[:, :1], v[:, 1:].reshape(3, -1, 4, 32, 32).mean(2)], 1)  # (3, F, 32, 32)
    F = frames.shape[1]
    z = frames.reshape(3, F, 8, 4, 8, 4).mean((3, 5))  # (3, F, 8, 8)
    z = z.reshape(3, F, 4, 2, 4, 2).permute(0, 3, 5, 1, 2, 4).reshape(12, F, 4, 4)  # (12, F, 4, 4)
    mel = log_mel(audio[None, :T * 640])[0]  # (80, 4T)
    a = torch.cat([mel[:, :4].mean(1, keepdim=True), mel[:, 4:].reshape(80, -1, 16).mean(2)], 1)  # (80, F)
    return z, a.reshape(40, 2, F).mean(1).t()  # (F, 40)


def proxy_set(split, data_root="data_toy"):
    from minread.data import ToyClipDataset
    clips = ToyClipDataset(data_root, split, size=32, frames=1).clips
    out = []
    for c in clips:
        z, a = proxy_latents(c["video"], c["audio"])
        T = 1 + (z.shape[1] - 1) * 4
        op = c["opening"][:T]
        opening = torch.cat([op[:1], op[1:].reshape(-1, 4).mean(1)])  # (F,) per latent frame
        out.append((z, a, opening, c["identity"]))
    return out


def compare(seconds, threads_note, data_root="data_toy", seed=0, cache=None):
    """Equal-time x0 vs v training on the proxy; returns a dict of figures. `cache`: a .pt
    file holding the proxy sets (written if missing), for machines without the video reader."""
    import dataclasses
    from pathlib import Path
    from minread import ans
    if cache and Path(cache).exists():
        sets = torch.load(cache, weights_only=True)
    else:
        sets = {"train": proxy_set("train", data_root), "test": proxy_set("test", data_root)}
        if cache:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            torch.save(sets, cache)
    train, test = sets["train"], sets["test"]
    zs = torch.cat([z for z, *_ in train], 1)  # (12, sum F, 4, 4)
    zmean, zstd = zs.mean((1, 2, 3), keepdim=True), zs.std((1, 2, 3), keepdim=True)
    aa = torch.cat([a for _, a, *_ in train])
    amean, astd = aa.mean(0), aa.std(0)
    norm = lambda s: [((z - zmean) / zstd, (a - amean) / astd, o, i) for z, a, o, i in s]  # noqa: E731
    train, test = norm(train), norm(test)
    # ridge probe: clean latent frame -> mouth opening
    X = torch.cat([z.permute(1, 0, 2, 3).reshape(z.shape[1], -1) for z, *_ in train])
    y = torch.cat([o for *_, o, _ in train])
    X1 = torch.cat([X, torch.ones(len(X), 1)], 1)
    w = torch.linalg.solve(X1.t() @ X1 + 1.0 * torch.eye(X1.shape[1]), X1.t() @ y)
    probe = lambda z: torch.cat([z.permute(0, 2, 1, 3, 4).flatten(2), torch.ones(*z.shape[:1], z.shape[2], 1)], 2) @ w  # noqa: E731
    Fw, M = 6, 2
    g = torch.Generator().manual_seed(seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"

    def batch(B):
        lat, au, ref = [], [], []
        for _ in range(B):
            z, a, _, _ = train[int(torch.randint(len(train), (1,), generator=g))]
            s = int(torch.randint(z.shape[1] - Fw + 1, (1,), generator=g))
            r = int(torch.randint(z.shape[1], (1,), generator=g))
            lat.append(z[:, s:s + Fw]), au.append(a[s:s + Fw]), ref.append(z[:, r:r + 1])
        return dict(latents=torch.stack(lat).to(dev), audio=torch.stack(au).to(dev), reference=torch.stack(ref).to(dev))

    figures = {}
    for prediction in ("x0", "v"):
        torch.manual_seed(seed)
        cfg = dataclasses.replace(dit.tiny(), latent_channels=12, audio_dim=40, prediction=prediction,
                                  ref_skip=prediction == "x0")
        model = dit.A2VDiT(cfg).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
        t0, steps, losses = time.time(), 0, []
        # equal compute: x0 trains for `seconds`, v for as many steps (the same cost per
        # step), so a machine shared with other jobs cannot tilt the comparison
        while (time.time() - t0 < seconds) if prediction == "x0" else steps < figures["x0"]["steps"]:
            draw = ans.sample_levels(32, 2, 2, M, generator=g)
            b = batch(32)
            Fd = draw.levels.shape[1]
            b = {k: v[:, :, :Fd] if k == "latents" else (v[:, :Fd] if k == "audio" else v) for k, v in b.items()}
            b.update(n_anchors=draw.n_anchors, drop_audio=draw.drop_audio.to(dev), drop_ref=draw.drop_ref.to(dev))
            loss = dit.dit_loss(model, b, draw.levels.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            if dev == "cuda" and steps % 50 == 0:
                torch.cuda.synchronize()
            losses.append(loss.item())
        train_s = time.time() - t0
        model.eval()
        read, truth, err = [], [], []
        with torch.no_grad():
            tg = torch.Generator().manual_seed(seed + 1)
            for z, a, o, _ in test:
                for s in range(0, z.shape[1] - Fw + 1, Fw - M):
                    x0 = z[None, :, s:s + Fw].to(dev)
                    x = torch.cat([x0[:, :, :M], torch.randn(1, 12, Fw - M, 4, 4, generator=tg).to(dev)], 2)
                    ref = z[None, :, :1].to(dev)
                    for k in range(8):
                        tau, nxt = 1 - k / 8, 1 - (k + 1) / 8
                        lv = torch.tensor([[0.0] * M + [tau] * (Fw - M)], device=dev)
                        pred = model(x, lv, a[None, s:s + Fw].to(dev), ref)
                        v = ans.to_velocity(x, pred, lv) if prediction == "x0" else pred
                        x = ans.euler_step(x, v, lv, torch.tensor([[0.0] * M + [nxt] * (Fw - M)], device=dev))
                    read.append(probe(x[:, :, M:].cpu())[0]), truth.append(o[s + M:s + Fw])
                    err.append((x - x0)[:, :, M:].pow(2).mean().item())
        read, truth = torch.cat(read), torch.cat(truth)
        r = torch.corrcoef(torch.stack([read, truth]))[0, 1].item()
        figures[prediction] = {"steps": steps, "seconds": train_s, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                               "probe_lip_corr": r, "amplitude_ratio": (read.std() / truth.std()).item(),
                               "latent_mse": sum(err) / len(err)}
        print(f"prediction={prediction} on {dev}: {steps} steps in {figures[prediction]['seconds']:.0f} s, probe LipCorr {r:.3f}, "
              f"amplitude {figures[prediction]['amplitude_ratio']:.2f}, latent MSE {figures[prediction]['latent_mse']:.3f}")
    clean = torch.cat([probe(z[None])[0] for z, *_ in test]), torch.cat([o for *_, o, _ in test])
    figures["probe_ceiling"] = torch.corrcoef(torch.stack(clean))[0, 1].item()
    print(f"probe on clean held-out latents (ceiling): r = {figures['probe_ceiling']:.3f}; {threads_note}")
    return figures


def main(argv):
    ap = argparse.ArgumentParser(prog="python -m minread.bench dit", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="DiT preset")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--impls", default="math", help="other attention impls to time the reference path's "
                    "forward with (comma list of math, flex, flex_eager; flex compiles first; empty: none)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd forward (~20 s to compile)")
    ap.add_argument("--anchors", type=int, default=1, help="motion anchors M (1 in both presets)")
    ap.add_argument("--frames", type=int, default=4, help="window frames W*n")
    ap.add_argument("--batch", type=int, default=32, help="training batch size")
    ap.add_argument("--repeats", type=int, default=100, help="timed forward passes")
    ap.add_argument("--steps", type=int, default=6, help="timed training steps")
    ap.add_argument("--compare", type=float, default=0, metavar="SECONDS",
                    help="instead: train x0- and v-prediction for SECONDS each on the toy proxy and compare")
    ap.add_argument("--data", default="data_toy", help="toy data set for --compare")
    ap.add_argument("--proxy-cache", default=None, help="--compare: .pt file caching the proxy latents")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compare:
        figures = compare(args.compare, f"threads {torch.get_num_threads()}", args.data, cache=args.proxy_cache)
        bench.report({"bench": "dit", "compare": figures, **bench.machine()})
        return 0
    torch.manual_seed(0)
    cfg = getattr(dit, args.preset)()
    model = dit.A2VDiT(cfg)
    # random weights instead of the zero adaLN init, so every branch does real work
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    figures = {"bench": "dit", "preset": args.preset, "params": model.num_params(), **bench.machine()}

    def variant(fused=True, compile=False, impl="sdpa"):  # the same weights, another path
        m = copy.deepcopy(model)
        m.fused, m.compile_inference = fused, compile
        for block in m.blocks:
            block.attn.impl = impl
        return m

    steps = time_train_step({"reference": variant(fused=False).train(), "fused": variant().train()},
                            window(cfg, args.batch, args.anchors, args.frames), args.steps)
    for name, (med, low, cpu) in steps.items():
        print(f"train step, batch {args.batch}, {name} path: median {med:.3f} s (min {low:.3f} s, "
              f"CPU time per thread {cpu:.3f} s)  target <= 0.6 s")
    figures.update(train_step_s=steps["fused"][0], train_step_min_s=steps["fused"][1],
                   train_step_cpu_s=steps["fused"][2], train_step_reference_s=steps["reference"][0])

    one = window(cfg, 1, args.anchors, args.frames)
    tokens = (1 + args.anchors + args.frames) * 16
    models = {"reference": variant(fused=False), "fused": variant()}
    if not args.no_compile:
        models["compiled"] = variant(compile=True).eval()
        t = time.perf_counter()
        with torch.inference_mode():
            models["compiled"](one["latents"], torch.zeros(1, one["latents"].shape[2]), one["audio"], one["reference"])
        figures["compile_s"] = time.perf_counter() - t
        print(f"compiling the fused forward took {figures['compile_s']:.1f} s (once per shape and process)")
    models.update({f"reference impl={impl}": variant(fused=False, impl=impl)
                   for impl in args.impls.split(",") if impl and impl != "sdpa"})
    for name, (med, low, cpu) in time_forward({k: m.eval() for k, m in models.items()}, one, args.repeats).items():
        print(f"forward, 1 window ({tokens} tokens), {name} path: median {med:.2f} ms (min {low:.2f} ms, "
              f"CPU time per thread {cpu:.2f} ms)  target <= 8 ms")
        key = {"fused": "sdpa"}.get(name, name.replace("reference impl=", "").replace(" ", "_"))
        figures.update({f"forward_ms_{key}": med, f"forward_min_ms_{key}": low, f"forward_cpu_ms_{key}": cpu})
    bench.report(figures)
