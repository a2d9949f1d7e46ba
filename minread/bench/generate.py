"""Generation benchmark: the READ-style results table, ANS against its two baselines.

`python -m minread.bench generate [--ckpt PATH] [--identities N --sentences K --seed S --threads T]`

READ's claim (arXiv 2508.03457) is speed at equal quality: its asynchronous noise
scheduler generates a long video with fewer model calls than clip-by-clip baselines.
The comparison below is our reconstruction (DESIGN §7, §9): the three schedules of
`minread.generate` run on the same bundle, the same held-out inputs (N test identities
of data_toy x K of their sentences, a reference frame from another clip of the same
identity, the same noise seed per input) and are measured side by side in one run,
in rotating order so that machine noise hits all of them alike:

- model calls (counted by wrapping the DiT, and checked against `ans.count_calls` of the
  schedule matrix) and wall time per second of video, real-time factor: wall time runs
  from the speech waveform and reference frame to the decoded frames (speech encoding,
  sampling and streaming VAE decoding; no file writing), with sampling overlapped with
  decoding as `generate` runs it (`--sequential`: one after the other);
- lip sync and identity against the toy truth (`metrics.clip_metrics`: LipCorr, amplitude
  ratio, LipMAE, audio-visual offset and confidence, closure F1, identity error) and the
  seam ratio at the clip boundaries of the schedule (all three emit clips of n latent
  frames, so they share the boundaries);
- peak memory of a generation: on CUDA `torch.cuda.max_memory_allocated` above the
  allocation at the start; on the CPU the peak resident set size above its level at the
  start (sampled from /proc/self/statm every millisecond, after `malloc_trim` hands freed
  heap back to the system; `ru_maxrss` deltas where /proc is missing). The method is
  recorded in the JSON.

Ratios against `synchronous_overlap` are printed beside the figures; the calls ratio is
also given for the long run (extra calls per extra second of video, exactly 1/W), since
a short clip pays the asynchronous pipeline's warm-up and tail, S(W-1)/W calls, once.
"""

import argparse
import ctypes
import math
import os
import resource
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from minread import ans, metrics
from minread import generate as gen
from minread.bench import machine, report

SCHEDULES = ("synchronous", "synchronous_overlap", "asynchronous")
BASE = "synchronous_overlap"
METRICS = ("lip_corr", "amplitude_ratio", "lip_mae", "av_offset", "av_confidence", "closure_f1",
           "closure_f1_frames", "identity_error", "seam_ratio")


# ----------------------------------------------------------------------------- memory

def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """`with PeakMemory(device) as mem: ...` -> mem.mb, the peak memory the block added (MB).

    CUDA: max_memory_allocated above memory_allocated at entry. CPU: peak resident set
    above the level at entry, sampled by a thread every `interval` seconds (freed heap is
    first handed back with malloc_trim, so memory cached by an earlier run does not hide
    this one's); ru_maxrss delta (only growth of the process's all-time peak) without /proc.
    """

    def __init__(self, device="cpu", interval=1e-3):
        self.cuda = str(device).startswith("cuda")
        self.device, self.interval, self.mb = device, interval, float("nan")
        if self.cuda:
            self.method = "cuda max_memory_allocated above the start"
        elif Path("/proc/self/statm").exists():
            self.method = "cpu peak RSS above the start (sampled each 1 ms after malloc_trim)"
        else:
            self.method = "cpu ru_maxrss delta"

    def _watch(self):
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method.startswith("cpu peak RSS"):
            _malloc_trim()
            self._base = self._peak = _rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("cpu peak RSS"):
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.mb = max(0, peak - self._base) / 2**20


# ----------------------------------------------------------------------------- one generation

def clip_starts(frames, n, s_t):
    """Video frames where a new latent clip of n frames starts (latent frame c*n, c >= 1,
    begins at video frame 1 + s_t*(c*n - 1): latent frame 0 is video frame 0 alone)."""
    return [1 + s_t * (c * n - 1) for c in range(1, frames) if 1 + s_t * (c * n - 1) < frames]


def run(models, reference, wave, schedule, seed=0, steps=None, cfg=None, on_chunk=None, overlap=True):
    """Generate one video with a counted DiT, timed and memory-metered; `overlap` as in
    `generate` (the DiT samples the next clip while the last one is decoded).

    Returns (video (3, T, H, W) on the CPU, or None when on_chunk consumes the chunks, and
    {"frames", "seconds", "wall_s", "calls", "peak_mem_mb", "memory_method"}).
    """
    device = models.vae.latent_mean.device
    counted = replace(models, dit=ans.CountCalls(models.dit))
    kept, frames = [], 0
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for chunk in gen.stream_frames(counted, reference, wave, schedule, steps, cfg, seed, overlap=overlap):
            chunk = chunk.cpu()                                         # (3, t, H, W); syncs CUDA
            frames += chunk.shape[1]
            if on_chunk is None:
                kept.append(chunk)
            else:
                on_chunk(chunk)
        wall = time.perf_counter() - t0
    video = torch.cat(kept, dim=1) if kept else None                    # (3, T, H, W)
    return video, {"frames": frames, "seconds": frames / gen.FPS, "wall_s": wall, "calls": counted.dit.calls,
                   "peak_mem_mb": mem.mb, "memory_method": mem.method}


def window_metrics(video, truth, reference, starts):
    """clip_metrics of a video (3, T, H, W) against truth tracks (opening, closed, viseme)
    plus the seam ratio at the given clip starts (nan when none falls inside)."""
    out = metrics.clip_metrics(video, {**truth, "reference": reference})
    inside = [t for t in starts if 1 <= t < video.shape[1]]
    out["seam_ratio"] = metrics.seam_ratio(video, inside) if inside else float("nan")
    return out


def ceilings(models, inputs):
    """What the metrics give on these inputs without generating: the true frames, and the
    VAE's reconstruction of them (the most a perfect DiT could reach in this latent space).
    Averaged like the schedules' rows; frames trimmed to 1 + s_t*k for the VAE."""
    s_t = models.vae.cfg.temporal
    rows = {"true frames": [], "VAE reconstruction": []}
    for _, c, ref in inputs:
        T = 1 + (min(c["video"].shape[1], len(c["opening"])) - 1) // s_t * s_t
        video, truth = c["video"][:, :T], {k: c[k][:T] for k in ("opening", "closed", "viseme")}
        rows["true frames"].append(metrics.clip_metrics(video, {**truth, "reference": ref}))
        rows["VAE reconstruction"].append(gen.reconstruction_metrics(models, video, truth, ref))
    return {name: {k: float(np.nanmean([r[k] for r in rs if k in r])) for k in METRICS if k in rs[0]}
            for name, rs in rows.items()}


def expected_calls(models, frames, schedule, steps=None):
    """Model calls the schedule matrix costs for a video of `frames` frames (ans.count_calls)."""
    F = 1 + math.ceil((gen.model_frames(frames, models.vae.cfg.temporal) - 1) / models.vae.cfg.temporal)
    return ans.count_calls(gen.make_schedule(schedule, F, models.sampler, steps))


def long_run_calls_ratio(models, schedule, steps=None, seconds=60.0):
    """Extra calls per extra second of video, `schedule` over synchronous_overlap, between a
    video of `seconds` and one twice as long (warm-up and tail cancel out)."""
    T1, T2 = round(gen.FPS * seconds), round(2 * gen.FPS * seconds)
    extra = lambda name: expected_calls(models, T2, name, steps) - expected_calls(models, T1, name, steps)  # noqa: E731
    return extra(schedule) / extra(BASE)


# ----------------------------------------------------------------------------- inputs

def held_out_inputs(clips, identities, sentences, seed=0):
    """The first `identities` test identities x their first `sentences` clips: a list of
    (clip index, clip dict, reference frame (3, H, W) from another clip of that identity)."""
    ids = sorted({c["identity"] for c in clips})
    if identities < 1 or sentences < 1:
        raise ValueError(f"--identities and --sentences must be >= 1, got {identities}, {sentences}")
    if identities > len(ids):
        raise ValueError(f"the test split has {len(ids)} identities, asked for {identities}: use --identities <= {len(ids)}")
    picks = []
    for i in ids[:identities]:
        own = [j for j, c in enumerate(clips) if c["identity"] == i]
        if sentences > len(own):
            raise ValueError(f"identity {i} has {len(own)} held-out clips, asked for {sentences}: "
                             f"use --sentences <= {len(own)}")
        picks += [(j, clips[j], gen.reference_frame(clips, j, seed)) for j in own[:sentences]]
    return picks


def load(ckpt, data, device):
    """(models, held-out clips) or a clear error."""
    from minread.data import ToyClipDataset
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"generation bundle {ckpt} not found: pass --ckpt PATH (a model.pt written "
                                f"by `python -m minread train`)")
    models = gen.load_models(ckpt, device)
    clips = ToyClipDataset(data, "test", size=models.vae.cfg.image_size, frames=1).clips
    return models, clips


# ----------------------------------------------------------------------------- the table

COLUMNS = [("calls/s", "calls_per_s", "{:.1f}"), ("wall s/s", "wall_per_s", "{:.3f}"), ("RTF", "rtf", "{:.1f}x"),
           ("LipCorr", "lip_corr", "{:.3f}"), ("amp", "amplitude_ratio", "{:.2f}"),
           ("closure F1", "closure_f1", "{:.3f}"), ("offset", "av_offset", "{:+.2f}"),
           ("id err", "identity_error", "{:.3f}"), ("seam", "seam_ratio", "{:.2f}"),
           ("peak MB", "peak_mem_mb", "{:.1f}"), ("calls x ovl", "calls_vs_overlap", "{:.3f}"),
           ("wall x ovl", "wall_vs_overlap", "{:.3f}")]


def table(rows, columns=COLUMNS):
    """A markdown table: one row per schedule."""
    lines = ["| schedule | " + " | ".join(c[0] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, r in rows.items():
        cells = [fmt.format(r[key]) if r.get(key) is not None and np.isfinite(r[key]) else "n/a"
                 for _, key, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows, long_run, device="cpu"):
    """The issue's targets as (text, met) pairs (real time: >= 10x for the tiny preset on a
    CPU, >= 25x for the small preset on one GPU)."""
    a, o, s = rows["asynchronous"], rows[BASE], rows["synchronous"]
    rtf = 25 if str(device).startswith("cuda") else 10
    return [(f"asynchronous calls <= 0.5x overlap (long run): {long_run:.3f}", long_run <= 0.5 + 1e-9),
            (f"asynchronous calls <= 0.5x overlap (these clips, warm-up + tail included): "
             f"{a['calls_vs_overlap']:.3f}", a["calls_vs_overlap"] <= 0.5 + 1e-9),
            (f"asynchronous wall <= 0.6x overlap (these clips; long videos: bench long): {a['wall_vs_overlap']:.3f}",
             a["wall_vs_overlap"] <= 0.6),
            (f"asynchronous LipCorr >= overlap - 0.02: {a['lip_corr']:.3f} vs {o['lip_corr']:.3f}",
             a["lip_corr"] >= o["lip_corr"] - 0.02),
            (f"asynchronous seam ratio no worse than overlap (|seam - 1|): {a['seam_ratio']:.3f} vs "
             f"{o['seam_ratio']:.3f}", abs(a["seam_ratio"] - 1) <= abs(o["seam_ratio"] - 1) + 1e-9),
            (f"asynchronous seam closer to 1 than synchronous: {a['seam_ratio']:.3f} vs {s['seam_ratio']:.3f}",
             abs(a["seam_ratio"] - 1) < abs(s["seam_ratio"] - 1)),
            (f"asynchronous real-time factor >= {rtf}x ({device}): {a['rtf']:.1f}x", a["rtf"] >= rtf)]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minread.bench generate", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=str(gen.DEFAULT_CKPT), help="generation bundle (default: the shipped tiny model)")
    p.add_argument("--data", default="data_toy", help="toy data set whose test split gives the held-out inputs")
    p.add_argument("--identities", type=int, default=3, help="held-out identities")
    p.add_argument("--sentences", type=int, default=2, help="held-out sentences (clips) per identity")
    p.add_argument("--seed", type=int, default=0, help="noise seed (input j uses seed + j) and reference choice")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per clip (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="audio guidance scale (default: the model's)")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES),
                   help=f"schedules to compare ({BASE} is always included as the base)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--sequential", action="store_true",
                   help="sample and decode one after the other (default: overlapped, as `generate` runs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [s for s in SCHEDULES if s in set(args.schedules) | {BASE}]
    models, clips = load(args.ckpt, args.data, args.device)
    inputs = held_out_inputs(clips, args.identities, args.sentences, args.seed)
    n, s_t = models.sampler["n"], models.vae.cfg.temporal
    print(f"bundle {args.ckpt}: {models.vae.cfg.image_size} px, sampler {models.sampler}; {len(inputs)} held-out "
          f"inputs ({args.identities} identities x {args.sentences} sentences), device {args.device}, "
          f"{torch.get_num_threads()} threads, " + ("sequential" if args.sequential else "sampling overlapped with decoding"))

    # one untimed run first, so one-off costs (allocator, kernels, caches) hit no schedule
    j0, c0, r0 = inputs[0]
    run(models, r0, c0["audio"][:gen.HOP * 9].numpy(), BASE, args.seed, args.steps, args.cfg, overlap=not args.sequential)
    acc = {name: {"calls": 0, "expected_calls": 0, "wall_s": 0.0, "seconds": 0.0, "peak_mem_mb": 0.0, "rows": []}
           for name in names}
    method = None
    for i, (j, c, ref) in enumerate(inputs):
        T = min(len(c["opening"]), len(c["audio"]) // gen.HOP)         # frames with both speech and truth
        wave = c["audio"][:T * gen.HOP].numpy()
        truth = {k: c[k][:T] for k in ("opening", "closed", "viseme")}
        for name in names[i % len(names):] + names[:i % len(names)]:   # rotate the order per input
            video, fig = run(models, ref, wave, name, args.seed + i, args.steps, args.cfg,
                             overlap=not args.sequential)                  # (3, T, H, W)
            a = acc[name]
            a["calls"] += fig["calls"]
            a["expected_calls"] += expected_calls(models, T, name, args.steps)
            a["wall_s"] += fig["wall_s"]
            a["seconds"] += fig["seconds"]
            a["peak_mem_mb"] = max(a["peak_mem_mb"], fig["peak_mem_mb"])
            a["rows"].append(window_metrics(video, truth, ref, clip_starts(T, n, s_t)))
            method = fig["memory_method"]
        print(f"  input {i + 1}/{len(inputs)}: {c['name']} ({c['video'].shape[1]} frames) done", flush=True)

    rows = {}
    for name in names:
        a = acc[name]
        row = {"calls": a["calls"], "expected_calls": a["expected_calls"], "seconds": a["seconds"],
               "wall_s": a["wall_s"], "calls_per_s": a["calls"] / a["seconds"],
               "wall_per_s": a["wall_s"] / a["seconds"], "rtf": a["seconds"] / a["wall_s"],
               "peak_mem_mb": a["peak_mem_mb"]}
        for k in METRICS:
            vals = [r[k] for r in a["rows"] if k in r]
            row[k] = float(np.nanmean(vals)) if vals and not np.isnan(vals).all() else float("nan")
        rows[name] = row
    for name in names:
        rows[name]["calls_vs_overlap"] = rows[name]["calls"] / rows[BASE]["calls"]
        rows[name]["wall_vs_overlap"] = rows[name]["wall_s"] / rows[BASE]["wall_s"]
        rows[name]["lip_corr_minus_overlap"] = rows[name]["lip_corr"] - rows[BASE]["lip_corr"]
        rows[name]["seam_minus_overlap"] = rows[name]["seam_ratio"] - rows[BASE]["seam_ratio"]
        rows[name]["calls_vs_overlap_long_run"] = long_run_calls_ratio(models, name, args.steps)

    seconds = rows[BASE]["seconds"]
    print(f"\n{seconds:.1f} s of video per schedule; wall time = speech + reference encoding, sampling, "
          f"streaming decode (no file writing); peak memory: {method}\n")
    print(table(rows))
    ceiling = ceilings(models, inputs)
    for name, r in ceiling.items():
        print(f"{name} of the same inputs (no generation): LipCorr {r['lip_corr']:.3f}, amplitude "
              f"{r['amplitude_ratio']:.2f}, closure F1 {r['closure_f1']:.3f} (per frame "
              f"{r['closure_f1_frames']:.3f}), offset {r['av_offset']:+.2f}, id err {r['identity_error']:.3f}")
    print(f"\ncommand: python -m minread.bench generate --ckpt {args.ckpt} --identities {args.identities} "
          f"--sentences {args.sentences} --seed {args.seed}" + (f" --threads {args.threads}" if args.threads else "")
          + (" --sequential" if args.sequential else ""))
    figures = {"ckpt": str(args.ckpt), "inputs": [c["name"] for _, c, _ in inputs], "seconds_per_schedule": seconds,
               "sampler": models.sampler, "image_size": models.vae.cfg.image_size, "device": args.device,
               "memory_method": method, "overlap": not args.sequential, "schedules": rows, "ceilings": ceiling,
               "machine": machine()}
    if "asynchronous" in rows:
        checks = targets(rows, rows["asynchronous"]["calls_vs_overlap_long_run"], args.device) if "synchronous" in rows else []
        for text, met in checks:
            print(f"target: {text} ({'met' if met else 'NOT met'})")
        figures["targets"] = {text.split(":")[0]: bool(met) for text, met in checks}
    report(figures)
    return 0
