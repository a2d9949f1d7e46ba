"""Schedule benchmark: model calls per second of video, and the sampler's own overhead.

`python -m minread.bench schedules [--seconds 60] [--model auto|dit|standin]`

1. Calls, from the level matrices alone (no model): for a video of --seconds at 25 fps
   (T = round(25·seconds) video frames, F = 1 + ⌈(T-1)/s_t⌉ latent frames: the first
   latent frame is one video frame, the others s_t = 4), every schedule of minread.ans at
   the tiny preset settings (train.TrainConfig: n = 2, W = 2, M = 1, S = 2): model calls, calls per second
   of video with warm-up and tail, the long-run rate (extra calls per extra second,
   between a video and one twice as long), and compute as frame units per second (each
   call costs its anchors + window frames + 1 reference frame, DESIGN §7).
2. Overhead: generate_latents runs a --overhead-seconds video with a model of the tiny
   DiT's cost: minread.dit.A2VDiT at the tiny preset (random weights) when importable,
   else a stand-in transformer over the same tokens (16 per latent frame, width 128,
   6 layers). Time inside model calls is measured; everything else (noise, slicing,
   levels, Euler updates, yields) is the sampler's overhead, reported as a fraction.
"""

import argparse
import math
import time

import torch
import torch.nn as nn

from minread import ans
from minread.bench import machine, report
from minread.train import TrainConfig

N, W, M, S = (getattr(TrainConfig(), k) for k in ("n", "W", "M", "S"))  # the tiny preset's
FPS, S_T = 25, 4


def latent_frames(seconds):
    T = round(FPS * seconds)
    return 1 + math.ceil((T - 1) / S_T)


def video_seconds(F):
    return (1 + S_T * (F - 1)) / FPS


def schedules(F):
    """name -> (levels, lookahead) at the tiny settings; rolling shares async's window."""
    return {"synchronous": (ans.synchronous(F, N, S), 0),
            "synchronous_overlap": (ans.synchronous_overlap(F, N, W, S), (W - 1) * N),
            "asynchronous": (ans.asynchronous(F, N, W, S), 0),
            "rolling": (ans.rolling(F, W * N, S), 0),
            "pyramid": (ans.pyramid(F, S, slope=1), 0)}


def cost(levels, lookahead):
    """(calls, frame units, widest model input in frames) of one Euler run of a schedule."""
    wins = [w for w in ans.step_windows(levels, M, lookahead) if w is not None]
    sizes = [w.frames.stop - w.frames.start for w in wins]
    return len(wins), sum(sizes) + len(sizes), max(sizes)


class StandIn(nn.Module):
    """A transformer over the DiT's tokens (16 per latent frame + a reference frame) with
    the tiny preset's width and depth; it predicts x̂₀ and costs about what the DiT costs."""

    prediction = "x0"

    def __init__(self, C=16, Da=64, width=128, depth=6, heads=4):
        super().__init__()
        self.audio_dim = Da
        self.inp, self.cond = nn.Linear(C, width), nn.Linear(Da + 1, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Linear(width, C)

    def forward(self, x, levels, audio, reference, drop_audio=None, drop_ref=None):
        B, C, F, h, w = x.shape
        seq = torch.cat([reference, x], dim=2).permute(0, 2, 3, 4, 1).reshape(B, (F + 1) * h * w, C)  # (B, L, C)
        c = self.cond(torch.cat([audio, levels[..., None]], -1))  # (B, F, D)
        c = torch.cat([c[:, :1] * 0, c], 1).repeat_interleave(h * w, dim=1)  # (B, L, D)
        out = self.out(self.blocks(self.inp(seq) + c))[:, h * w:]  # (B, F*h*w, C)
        return out.reshape(B, F, h, w, C).permute(0, 4, 1, 2, 3)  # (B, C, F, h, w)


def make_model(kind):
    """(model, description): the tiny A2V-DiT if asked for and importable, else the stand-in."""
    if kind in ("auto", "dit"):
        try:
            from minread.dit import A2VDiT, tiny
            return A2VDiT(tiny()).eval(), "minread.dit.A2VDiT, tiny preset, random weights"
        except Exception as e:  # noqa: BLE001 (any failure: fall back, and say so)
            if kind == "dit":
                raise
            print(f"minread.dit unavailable ({type(e).__name__}: {e}); using the stand-in")
    return StandIn().eval(), "stand-in transformer (16 tokens/frame, width 128, depth 6)"


class Timed:
    """Wraps a model; accumulates the wall time spent inside its calls."""

    def __init__(self, model):
        self.model, self.seconds, self.calls = model, 0.0, 0
        self.prediction = getattr(model, "prediction", "x0")

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.model(*args, **kwargs)
        if out.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


@torch.no_grad()
def overhead(model, F, name, levels, lookahead, repeats):
    """Best of `repeats` runs: (total s, model s, calls)."""
    Da = model.cfg.audio_dim if hasattr(model, "cfg") else model.audio_dim
    speech, ref = torch.randn(1, F, Da), torch.randn(1, 16, 1, 4, 4)
    best = None
    for _ in range(repeats):
        timed = Timed(model)
        t0 = time.perf_counter()
        for _ in ans.generate_latents(timed, speech, ref, levels, n_anchors=M, lookahead=lookahead, progress=False):
            pass
        total = time.perf_counter() - t0
        if best is None or total - timed.seconds < best[0] - best[1]:
            best = (total, timed.seconds, timed.calls)
    return best


def main(argv):
    p = argparse.ArgumentParser(prog="python -m minread.bench schedules", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="video length for the call counts")
    p.add_argument("--overhead-seconds", type=float, default=10.0, help="video length for the overhead runs")
    p.add_argument("--model", choices=["auto", "dit", "standin"], default="auto",
                   help="model of the overhead runs: the tiny A2V-DiT, the stand-in, or the DiT when importable")
    p.add_argument("--repeats", type=int, default=2, help="overhead runs per schedule (the best is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    F, F2 = latent_frames(args.seconds), latent_frames(2 * args.seconds)
    sec, sec2 = video_seconds(F), video_seconds(F2)
    print(f"calls per second of video: {sec:.2f} s at {FPS} fps = {F} latent frames; n={N} W={W} M={M} S={S}, Euler")
    print(f"{'schedule':<21}{'calls':>7}{'calls/s':>9}{'long-run/s':>12}{'frame units/s':>15}{'widest input':>14}")
    figures = {"seconds": sec, "latent_frames": F, "n": N, "W": W, "M": M, "S": S, "schedules": {}}
    long_ = schedules(F2)
    for name, (levels, la) in schedules(F).items():
        calls, units, widest = cost(levels, la)
        calls2, units2, _ = cost(*long_[name])
        row = {"calls": calls, "calls_per_s": calls / sec, "calls_per_s_long_run": (calls2 - calls) / (sec2 - sec),
               "frame_units_per_s": units / sec, "widest_input_frames": widest + 1}
        figures["schedules"][name] = row
        print(f"{name:<21}{calls:>7}{row['calls_per_s']:>9.2f}{row['calls_per_s_long_run']:>12.2f}"
              f"{row['frame_units_per_s']:>15.1f}{widest + 1:>14}")
    sch = figures["schedules"]
    for key in ("calls_per_s", "calls_per_s_long_run"):
        figures[f"async_over_overlap_{key}"] = sch["asynchronous"][key] / sch["synchronous_overlap"][key]
        figures[f"async_over_sync_{key}"] = sch["asynchronous"][key] / sch["synchronous"][key]
    figures["async_over_overlap_compute"] = (sch["asynchronous"]["frame_units_per_s"]
                                             / sch["synchronous_overlap"]["frame_units_per_s"])
    figures["async_over_sync_compute"] = sch["asynchronous"]["frame_units_per_s"] / sch["synchronous"]["frame_units_per_s"]
    print(f"asynchronous / synchronous_overlap calls: {figures['async_over_overlap_calls_per_s']:.3f} "
          f"({sec:.0f} s video), {figures['async_over_overlap_calls_per_s_long_run']:.3f} (long run); "
          f"compute {figures['async_over_overlap_compute']:.3f}")
    print(f"asynchronous / synchronous calls: {figures['async_over_sync_calls_per_s']:.3f}; "
          f"compute {figures['async_over_sync_compute']:.3f}")

    model, described = make_model(args.model)
    Fo = latent_frames(args.overhead_seconds)
    print(f"\nsampler overhead: {video_seconds(Fo):.2f} s video ({Fo} latent frames), batch 1, no guidance, "
          f"model: {described}; {torch.get_num_threads()} threads")
    print(f"{'schedule':<21}{'calls':>7}{'ms/call':>9}{'sampler ms/call':>17}{'overhead':>10}{'x real time':>13}")
    figures["model"], figures["overhead"] = described, {}
    for name, (levels, la) in schedules(Fo).items():
        total, in_model, calls = overhead(model, Fo, name, levels, la, args.repeats)
        row = {"calls": calls, "total_s": total, "model_s": in_model, "ms_per_call": 1e3 * in_model / calls,
               "sampler_ms_per_call": 1e3 * (total - in_model) / calls, "overhead_fraction": (total - in_model) / total,
               "real_time_factor": video_seconds(Fo) / total}
        figures["overhead"][name] = row
        print(f"{name:<21}{calls:>7}{row['ms_per_call']:>9.2f}{row['sampler_ms_per_call']:>17.3f}"
              f"{100 * row['overhead_fraction']:>9.2f}%{row['real_time_factor']:>13.2f}")
    figures["async_overhead_fraction"] = figures["overhead"]["asynchronous"]["overhead_fraction"]
    long_run, whole = figures["async_over_overlap_calls_per_s_long_run"], figures["async_over_overlap_calls_per_s"]
    print(f"\ntarget: asynchronous calls <= 0.5x synchronous_overlap: {long_run:.3f} in the long run "
          f"({'met' if long_run <= 0.5 + 1e-9 else 'NOT met'}), {whole:.3f} for the {sec:.0f} s video "
          f"(warm-up + tail add S(W-1)/W = {S * (W - 1) // W} calls once)")
    frac = figures["async_overhead_fraction"]
    print(f"target: sampler overhead < 5% of a tiny-preset generation: {100 * frac:.2f}% "
          f"({'met' if frac < 0.05 else 'NOT met'}; model: {described})")
    figures["machine"] = machine()
    report(figures)
