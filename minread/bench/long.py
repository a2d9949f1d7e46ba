"""Long-video stability benchmark: every metric per 10 s window over a minute of speech.

`python -m minread.bench long [--ckpt PATH] [--seconds 60 --window 10 --identities N]
[--curves curves.json --plot curves.png --video DIR]`

READ claims stable metrics over long generation (arXiv 2508.03457); how it is measured
here is ours (DESIGN §9, §10). Per held-out identity of data_toy, the held-out sentences
are concatenated into --seconds of speech (the identity's own sentences first, then the
other test clips', cycled if needed), with their toy truth (opening, lips-closed frames,
visemes) concatenated likewise, and the reference frame comes from another clip of the
identity. Each schedule generates the whole video in one stream; the frames are scored
as they arrive, one --window at a time, and dropped, so the benchmark itself holds one
window of frames (plus the 60 s opening track: 1500 floats):

- per window: LipCorr, amplitude ratio, LipMAE, offset and confidence, closure F1,
  identity error, seam ratio at the schedule's clip boundaries (`bench.generate`);
- drift: last window minus first window, per metric (identity error also relative);
- peak memory of a --window generation against a --seconds generation of the same input
  (`bench.generate.PeakMemory`: CUDA allocator peak, or sampled CPU RSS), the same
  frame scoring (and mp4 writing with --video) running in both.

The per-window curves (mean over identities and per identity) go to --curves as JSON
and to --plot as a PNG (`plot_curves`, also used by notebook 08).
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from minread import generate as gen
from minread.bench import machine, report
from minread.bench.generate import BASE, METRICS, SCHEDULES, clip_starts, expected_calls, load, run, window_metrics

PLOTTED = ("lip_corr", "amplitude_ratio", "closure_f1", "identity_error", "seam_ratio", "av_offset")


def long_input(clips, identity, seconds, seed=0):
    """--seconds of held-out speech for one identity: (wave (S,) float32 numpy, truth dict of
    (T,) tracks, reference (3, H, W), names of the clips used). T = round(25 * seconds)."""
    own = [j for j, c in enumerate(clips) if c["identity"] == identity]
    if not own:
        raise ValueError(f"identity {identity} has no held-out clip")
    order = own + [j for j in range(len(clips)) if j not in own]
    T = round(gen.FPS * seconds)
    waves, tracks, names, total, k = [], {"opening": [], "closed": [], "viseme": []}, [], 0, 0
    while total < T:
        c = clips[order[k % len(order)]]
        t = min(len(c["opening"]), len(c["audio"]) // gen.HOP, T - total)
        waves.append(c["audio"][:t * gen.HOP])
        for key in tracks:
            tracks[key].append(c[key][:t])
        names.append(c["name"])
        total, k = total + t, k + 1
    wave = torch.cat(waves).numpy().astype(np.float32)                   # (T*640,)
    truth = {key: torch.cat(v) for key, v in tracks.items()}             # (T,) each
    return wave, truth, gen.reference_frame(clips, own[0], seed), names


class WindowScorer:
    """Takes decoded chunks (3, t, H, W) in order; scores each full window of `window`
    frames with `window_metrics` and drops it. `finish()` scores a last partial window of
    at least half a window (and > 18 frames, for the offset) and returns the rows."""

    def __init__(self, truth, reference, starts, window, writer=None):
        self.truth, self.reference, self.starts, self.window = truth, reference, starts, window
        self.writer, self.buf, self.at, self.rows = writer, [], 0, []

    def __call__(self, chunk):
        if self.writer is not None:
            self.writer.write(gen.to_uint8(chunk))
        self.buf.append(chunk)
        while sum(c.shape[1] for c in self.buf) >= self.window:
            self._score(self.window)

    def _score(self, t):
        frames = torch.cat(self.buf, dim=1)                              # (3, >= t, H, W)
        video, self.buf = frames[:, :t], [frames[:, t:]]
        w0 = self.at
        truth = {k: v[w0:w0 + t] for k, v in self.truth.items()}
        starts = [s - w0 for s in self.starts if w0 < s < w0 + t]
        row = window_metrics(video, truth, self.reference, starts)
        self.rows.append({"start_s": w0 / gen.FPS, "end_s": (w0 + t) / gen.FPS, **row})
        self.at += t

    def finish(self):
        left = sum(c.shape[1] for c in self.buf)
        if left >= max(self.window / 2, 19):
            self._score(left)
        return self.rows


def generate_scored(models, wave, truth, reference, schedule, window, seed=0, video=None, overlap=True):
    """One streamed generation scored window by window: (rows, run figures)."""
    from minread.data import VideoWriter
    T = gen.output_frames(len(wave))
    starts = clip_starts(T, models.sampler["n"], models.vae.cfg.temporal)
    if video is None:
        scorer = WindowScorer(truth, reference, starts, window)
        _, fig = run(models, reference, wave, schedule, seed, on_chunk=scorer, overlap=overlap)
        return scorer.finish(), fig
    Path(video).parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(video, fps=gen.FPS, audio=wave) as writer:
        scorer = WindowScorer(truth, reference, starts, window, writer)
        _, fig = run(models, reference, wave, schedule, seed, on_chunk=scorer, overlap=overlap)
    return scorer.finish(), fig


def drift(rows):
    """Per metric: last window minus first (and relative, for identity error)."""
    first, last = rows[0], rows[-1]
    out = {k: last[k] - first[k] for k in METRICS if k in first and k in last}
    if "identity_error" in out and first["identity_error"] > 0:
        out["identity_error_relative"] = out["identity_error"] / first["identity_error"]
    return out


def mean_curves(per_identity):
    """Windows averaged over identities: a list of rows (the shortest run's window count)."""
    n = min(len(rows) for rows in per_identity)
    return [{k: float(np.nanmean([rows[w][k] for rows in per_identity if k in rows[w]]))
             for k in per_identity[0][w]} for w in range(n)]


def plot_curves(curves, path=None, metrics=PLOTTED):
    """Metric against time, one line per schedule: curves {schedule: [window rows]}. Returns
    the figure; with `path` it is also saved as a PNG."""
    import matplotlib.pyplot as plt
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(metrics) / cols), cols, figsize=(4 * cols, 2.8 * math.ceil(len(metrics) / cols)))
    for ax, k in zip(np.ravel(axes), metrics):
        for name, rows in curves.items():
            t = [(r["start_s"] + r["end_s"]) / 2 for r in rows]
            ax.plot(t, [r.get(k, float("nan")) for r in rows], "o-", label=name)
        ax.set_title(k)
        ax.set_xlabel("time (s)")
    np.ravel(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
    return fig


def run_long(models, clips, identities=2, seconds=60.0, window=10.0, schedules=SCHEDULES, seed=0, video_dir=None,
             log=print, overlap=True):
    """The benchmark without the command line: per schedule, the per-window curves (mean and
    per identity), drift, calls, real-time factor, and peak memory of --window vs --seconds.
    `overlap` as in `generate` (False: sample and decode one after the other)."""
    ids = sorted({c["identity"] for c in clips})
    if not 1 <= identities <= len(ids):
        raise ValueError(f"--identities must be in 1..{len(ids)} (held-out identities), got {identities}")
    if window <= 0 or seconds < window:
        raise ValueError(f"need 0 < --window <= --seconds, got window {window}, seconds {seconds}")
    W = round(gen.FPS * window)
    warm = long_input(clips, ids[0], 0.4, seed)                          # one-off costs hit no measured run
    for name in schedules:
        generate_scored(models, *warm[:3], name, W, seed, overlap=overlap)
    out = {name: {"per_identity": [], "calls": 0, "expected_calls": 0, "wall_s": 0.0, "seconds": 0.0,
                  "peak_mem_mb_window": 0.0, "peak_mem_mb_long": 0.0} for name in schedules}
    for i, ident in enumerate(ids[:identities]):
        wave, truth, ref, names = long_input(clips, ident, seconds, seed)
        short = wave[:W * gen.HOP]
        log(f"identity {ident}: {len(wave) / gen.SAMPLE_RATE:.1f} s from {len(names)} held-out sentences")
        for name in schedules:
            video = None if video_dir is None else Path(video_dir) / f"long_id{ident}_{name}.mp4"
            tmp = None if video_dir is None else Path(video_dir) / f".short_id{ident}_{name}.mp4"
            _, fig_w = generate_scored(models, short, truth, ref, name, W, seed + i, tmp, overlap)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            rows, fig = generate_scored(models, wave, truth, ref, name, W, seed + i, video, overlap)
            o = out[name]
            o["per_identity"].append(rows)
            o["calls"] += fig["calls"]
            o["expected_calls"] += expected_calls(models, fig["frames"], name)
            o["wall_s"] += fig["wall_s"]
            o["seconds"] += fig["seconds"]
            o["peak_mem_mb_window"] = max(o["peak_mem_mb_window"], fig_w["peak_mem_mb"])
            o["peak_mem_mb_long"] = max(o["peak_mem_mb_long"], fig["peak_mem_mb"])
            o["memory_method"] = fig["memory_method"]
            log(f"  {name:<20} {fig['calls']:>5} calls, {fig['wall_s']:6.1f} s ({fig['seconds'] / fig['wall_s']:.1f}x "
                f"real time), peak +{fig_w['peak_mem_mb']:.1f} MB ({window:g} s) vs +{fig['peak_mem_mb']:.1f} MB "
                f"({seconds:g} s); LipCorr per window " + " ".join(f"{r['lip_corr']:.2f}" for r in rows))
    for name, o in out.items():
        o["curve"] = mean_curves(o["per_identity"])
        o["drift"] = drift(o["curve"])
        o["drift_per_identity"] = [drift(rows) for rows in o["per_identity"]]
        o["rtf"] = o["seconds"] / o["wall_s"]
        o["calls_per_s"] = o["calls"] / o["seconds"]
        o["memory_long_over_window"] = (o["peak_mem_mb_long"] / o["peak_mem_mb_window"]
                                        if o["peak_mem_mb_window"] > 0 else float("nan"))
    if BASE in out:
        for name, o in out.items():
            o["calls_vs_overlap"] = o["calls"] / out[BASE]["calls"]
            o["wall_vs_overlap"] = o["wall_s"] / out[BASE]["wall_s"]
    return out


def summary_table(out):
    """Markdown: one row per schedule, first and last window, drift, memory."""
    lines = ["| schedule | RTF | calls x ovl | LipCorr first → last | id err first → last (rel.) | "
             "seam first → last | peak MB window → long (x) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, o in out.items():
        f, l, d = o["curve"][0], o["curve"][-1], o["drift"]
        lines.append(f"| {name} | {o['rtf']:.1f}x | {o.get('calls_vs_overlap', float('nan')):.3f} | "
                     f"{f['lip_corr']:.3f} → {l['lip_corr']:.3f} | {f['identity_error']:.3f} → "
                     f"{l['identity_error']:.3f} ({d.get('identity_error_relative', float('nan')):+.0%}) | "
                     f"{f['seam_ratio']:.2f} → {l['seam_ratio']:.2f} | {o['peak_mem_mb_window']:.1f} → "
                     f"{o['peak_mem_mb_long']:.1f} ({o['memory_long_over_window']:.2f}x) |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minread.bench long", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=str(gen.DEFAULT_CKPT), help="generation bundle (default: the shipped tiny model)")
    p.add_argument("--data", default="data_toy", help="toy data set whose test split gives the held-out speech")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the long video per identity")
    p.add_argument("--window", type=float, default=10.0, help="window length (s) of the per-window metrics")
    p.add_argument("--identities", type=int, default=2, help="held-out identities")
    p.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES), help="schedules to run")
    p.add_argument("--seed", type=int, default=0, help="noise seed (identity i uses seed + i) and reference choice")
    p.add_argument("--curves", default=None, help="write the per-window curves here (JSON)")
    p.add_argument("--plot", default=None, help="write a PNG of metric against time here")
    p.add_argument("--video", default=None, help="folder for the long mp4s (one per identity and schedule)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--sequential", action="store_true",
                   help="sample and decode one after the other (default: overlapped, as `generate` runs)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models, clips = load(args.ckpt, args.data, args.device)
    print(f"bundle {args.ckpt}: {models.vae.cfg.image_size} px, sampler {models.sampler}; {args.seconds:g} s per "
          f"identity, {args.window:g} s windows, device {args.device}, {torch.get_num_threads()} threads")
    out = run_long(models, clips, args.identities, args.seconds, args.window, args.schedules, args.seed, args.video,
                   overlap=not args.sequential)
    method = next(iter(out.values()))["memory_method"]
    print(f"\nmean over {args.identities} identities; peak memory: {method}\n")
    print(summary_table(out))
    for name, o in out.items():
        print(f"{name} drift (last - first window): " + ", ".join(f"{k} {v:+.3f}" for k, v in o["drift"].items()))
    if "asynchronous" in out:
        a = out["asynchronous"]
        f, l = a["curve"][0], a["curve"][-1]
        checks = [(f"LipCorr last window within 0.05 of first: {l['lip_corr'] - f['lip_corr']:+.3f}",
                   abs(l["lip_corr"] - f["lip_corr"]) <= 0.05),
                  (f"identity error last window within 20% of first: "
                   f"{a['drift'].get('identity_error_relative', float('nan')):+.1%}",
                   abs(a["drift"].get("identity_error_relative", float("inf"))) <= 0.2),
                  (f"peak memory {args.seconds:g} s <= 1.2x {args.window:g} s: {a['memory_long_over_window']:.2f}x",
                   a["memory_long_over_window"] <= 1.2)]
        if BASE in out:  # the per-second-of-video comparison, on long videos (fixed costs paid once)
            checks.append((f"wall time <= 0.6x {BASE}: {a['wall_vs_overlap']:.3f} "
                           f"(calls {a['calls_vs_overlap']:.3f}, warm-up and tail included)", a["wall_vs_overlap"] <= 0.6))
        for text, met in checks:
            print(f"target (asynchronous): {text} ({'met' if met else 'NOT met'})")
    curves = {name: o["curve"] for name, o in out.items()}
    if args.curves:
        Path(args.curves).parent.mkdir(parents=True, exist_ok=True)
        Path(args.curves).write_text(json.dumps({"window_s": args.window, "seconds": args.seconds, "curves": curves,
                                                 "per_identity": {n: o["per_identity"] for n, o in out.items()}},
                                                default=float, indent=1))
        print(f"wrote {args.curves}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        plot_curves(curves, args.plot)
        print(f"wrote {args.plot}")
    figures = {"ckpt": str(args.ckpt), "seconds": args.seconds, "window_s": args.window,
               "identities": args.identities, "device": args.device, "memory_method": method,
               "schedules": {n: {k: v for k, v in o.items() if k != "per_identity"} for n, o in out.items()},
               "machine": machine()}
    report(figures)
    return 0
