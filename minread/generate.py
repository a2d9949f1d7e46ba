"""Generation: a face image and a speech file in, a lip-synced talking-head mp4 out.

The pipeline of DESIGN.md §2, run as a stream: speech -> log-mel -> SpeechAE latents,
face -> VAE reference latent, then the asynchronous noise scheduler (ANS) walks its
schedule matrix and hands over each latent clip as soon as it is clean; the causal VAE
decodes it with a carried cache and the frames go straight into the mp4. Nothing holds
more than a window of latents and one decoded clip, so memory does not grow with the
length of the audio. The components and the clip-by-clip asynchronous generation are
READ's; the streaming file pipeline, the frame-count rule and the checks are ours.

- Any image PyAV reads is cropped to a square and resized to the model's size; any audio
  PyAV reads is resampled to 16 kHz mono (`minread.data.load_image`, `load_audio`).
- Audio of S samples gives exactly round(S / 640) video frames (rounded half up, at
  least 1): the waveform is zero-padded to the next T = 1 + s_t*k frames the causal
  models need, and the video is trimmed back.
- The mp4 (speech muxed in) and a PNG filmstrip beside it are written to temp names and
  renamed on success: a failure leaves nothing half-written behind.
- `generate` returns (and prints) the real-time factor: seconds of video per second of
  wall time from reading the inputs to the finished mp4.
"""

import math
import os
import queue
import resource
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from minread.data import FPS, HOP, SAMPLE_RATE  # 25 fps, 640 samples (16 kHz) per video frame

MIN_SECONDS = 0.2
DEFAULT_CKPT = Path(__file__).parent / "assets" / "tiny.pt"
SCHEDULES = ("asynchronous", "synchronous", "synchronous_overlap")


@dataclass
class Models:
    vae: torch.nn.Module
    speech_ae: torch.nn.Module
    dit: torch.nn.Module
    sampler: dict               # ANS settings the DiT was trained for: n, W, M, S


def load_models(ckpt=None, device="cpu"):
    """Build the three models from a generation bundle (written by `minread.train.bundle`)."""
    from minread.dit import A2VDiT, DiTConfig
    from minread.speech_ae import SpeechAE, SpeechAEConfig
    from minread.data import load_checkpoint
    from minread.vae import VAE, VAEConfig
    path = Path(ckpt) if ckpt is not None else DEFAULT_CKPT
    pack = load_checkpoint(path)
    if not {"vae", "speech_ae", "dit", "sampler"} <= set(pack):
        raise ValueError(f"{path} is not a generation bundle (it holds {sorted(pack)}); pass the "
                         f"model.pt written at the end of `python -m minread train --stage dit`")
    models = []
    for key, cls, cfg_cls in (("vae", VAE, VAEConfig), ("speech_ae", SpeechAE, SpeechAEConfig),
                              ("dit", A2VDiT, DiTConfig)):
        try:
            model = cls(cfg_cls(**pack[key]["config"]))
        except TypeError as e:  # a setting this version of minread does not know
            raise ValueError(f"{path}: its {key} config does not fit this version of minread ({e}); "
                             f"retrain with `python -m minread train` or use a matching version") from None
        state = {k: v.float() if v.is_floating_point() else v for k, v in pack[key]["state"].items()}
        expected = model.state_dict().keys()
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise ValueError(f"{path}: its {key} weights were made by another version of the model "
                             f"(missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}); "
                             f"retrain with `python -m minread train` or use a matching version")
        model.load_state_dict(state)
        models.append(model.to(device).eval().requires_grad_(False))
    if torch.device(device).type == "cuda":
        # float32 matrix products on TF32 tensor cores, as nanoGPT samples: 1.7x faster
        # generation at 128 px on an H200 (27x -> 43x real time for 10 s)
        torch.backends.cuda.matmul.allow_tf32 = True
    return Models(*models, sampler=dict(pack["sampler"]))


# ----------------------------------------------------------------------------- frame counts

def output_frames(num_samples):
    """Video frames for S audio samples: round(S / 640) rounded half up, at least 1."""
    return max(1, (2 * num_samples + HOP) // (2 * HOP))


def model_frames(frames, s_t):
    """The smallest T = 1 + s_t*k >= frames (what the causal VAE and SpeechAE take)."""
    return 1 + s_t * math.ceil((frames - 1) / s_t)


def fit_audio(wave, frames):
    """Zero-pad (or trim the last < 320 samples of) a waveform to exactly frames*640 samples."""
    out = np.zeros(frames * HOP, dtype=np.float32)
    n = min(len(wave), len(out))
    out[:n] = wave[:n]
    return out


def make_schedule(name, F, sampler, steps=None):
    """The (steps+1, F) level matrix of a named schedule with the model's clip geometry."""
    from minread import ans
    n, W, S = sampler["n"], sampler["W"], steps or sampler["S"]
    if name == "asynchronous":
        return ans.asynchronous(F, n, W, S)
    if name == "synchronous":
        return ans.synchronous(F, n, S)
    if name == "synchronous_overlap":
        return ans.synchronous_overlap(F, n, W, S)
    raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}")


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_video(models, reference_latent, speech_latents, schedule="asynchronous", steps=None,
                 cfg=None, seed=0, progress=False, overlap=False):
    """Yield decoded video chunks (B, 3, t, H, W) in [-1, 1] as latent clips finish.

    reference_latent (B, C, 1, h, w) and speech_latents (B, F, Da) are standardised latents;
    the chunks add up to T = 1 + s_t*(F - 1) frames. steps and cfg (the audio guidance scale)
    default to the values stored with the model. With `overlap` the DiT samples in a worker
    thread, one clip ahead of the decoder and of whatever the caller does with each chunk
    (writing the mp4), the CPU's threads split between the two: the same frames, sooner.
    """
    from minread import ans
    F = speech_latents.shape[1]
    levels = make_schedule(schedule, F, models.sampler, steps)        # (steps+1, F)
    cfg = models.sampler.get("cfg", 1.0) if cfg is None else cfg
    # synchronous_overlap denoises (W-1)*n extra frames per window and throws them away
    n, W = models.sampler["n"], models.sampler["W"]
    lookahead = (W - 1) * n if schedule == "synchronous_overlap" else 0
    clips = ans.generate_latents(models.dit, speech_latents, reference_latent, levels,
                                 n_anchors=models.sampler["M"], lookahead=lookahead,
                                 cfg_scale=cfg, seed=seed, progress=progress)
    cache = {}                                                         # the decoder's carried past
    with split_threads(2 if overlap else 1):
        for _, clip in in_background(clips) if overlap else clips:
            yield models.vae.decode_latents(clip, cache).clamp(-1, 1)  # (B, 3, t, H, W)


@contextmanager
def split_threads(parts):
    """Give each of `parts` concurrent workers an equal share of torch's CPU threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // parts))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_background(items, ahead=1):
    """Iterate the generator `items` in a worker thread, at most `ahead` items ahead of the
    consumer (bounded memory). Torch ops release the GIL, so the two run on two cores. An
    exception in the worker is raised in the consumer; a consumer that stops early stops it."""
    q, stop, end = queue.Queue(ahead), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                return q.put(item, timeout=0.05)
            except queue.Full:
                pass

    def work():
        with torch.no_grad():                                          # grad mode is per thread
            try:
                for item in items:
                    put(item)
                    if stop.is_set():
                        return
                put(end)
            except BaseException as e:                                 # noqa: BLE001 (re-raised below)
                put(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


@torch.no_grad()
def encode_speech(speech_ae, wave, frames=None, chunk=64, context=16):
    """speech_ae.speech_latents of the waveform wave (B, S) zero-padded or trimmed to `frames`
    video frames (T = 1 + s_t*k; default S // 640), computed `chunk` latents at a time so
    that memory does not grow with the length of the audio: each piece is cut and padded
    on its own, the whole padded waveform is never built.

    The encoder is causal with a finite receptive field, so latents a..b-1 only need the
    audio from `context` latents earlier. A piece of audio that starts at video frame
    s_t*c puts its latent i >= 1 exactly on the whole clip's latent c + i (the first one,
    frame s_t*c alone, is thrown away). Tested equal to the one-pass encoding.
    """
    s_t = speech_ae.cfg.s_t                                            # video frames per latent
    T = wave.shape[1] // HOP if frames is None else frames
    if (T - 1) % s_t:
        raise ValueError(f"encode_speech needs 1 + {s_t}k video frames, got {T}")
    F = 1 + (T - 1) // s_t

    def piece(t0, t1):                                                 # video frames t0..t1-1 of audio
        cut = wave[:, t0 * HOP:t1 * HOP]
        return torch.nn.functional.pad(cut, (0, (t1 - t0) * HOP - cut.shape[1]))

    if F <= chunk + context:
        return speech_ae.speech_latents(piece(0, T))
    pieces = []
    for a in range(0, F, chunk):                                       # latents a..b-1 from frames s_t*c..s_t*(b-1)
        b, c = min(F, a + chunk), max(0, a - context)
        pieces.append(speech_ae.speech_latents(piece(s_t * c, s_t * (b - 1) + 1))[:, a - c:b - c])  # (B, b-a, Da)
    return torch.cat(pieces, 1)                                          # (B, F, Da)


@torch.no_grad()
def stream_frames(models, reference, wave, schedule="asynchronous", steps=None, cfg=None, seed=0,
                  progress=False, overlap=False):
    """reference (3, H, W) in [-1, 1], wave (S,) 16 kHz -> video chunks (3, t, H, W), exactly
    output_frames(S) frames in all. The building block of `generate` and the benchmarks;
    `overlap`: see sample_video."""
    device = models.vae.latent_mean.device
    frames = output_frames(len(wave))
    T = model_frames(frames, models.vae.cfg.temporal)
    audio = torch.as_tensor(np.asarray(wave, dtype=np.float32))[None].to(device)       # (1, S), no copy on the CPU
    speech = encode_speech(models.speech_ae, audio, T)                                  # (1, F, Da)
    ref = models.vae.encode_latents(reference[None, :, None].to(device))                # (1, C, 1, h, w)
    left = frames
    for chunk in sample_video(models, ref, speech, schedule, steps, cfg, seed, progress, overlap):
        chunk = chunk[0, :, :left]                                     # (3, t, H, W)
        left -= chunk.shape[1]
        if chunk.shape[1]:                                             # the padding is dropped
            yield chunk


def to_uint8(video):
    """(3, t, H, W) in [-1, 1] -> (t, H, W, 3) uint8 frames."""
    return ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


# ----------------------------------------------------------------------------- files

def read_inputs(image, audio, size):
    """Check and load the face image and the speech file: (reference (3, H, W), wave (S,))."""
    from minread.data import load_audio, load_image
    for path, what in ((image, "image"), (audio, "audio")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} file {path} not found: check the path")
    try:
        reference = load_image(image, size)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"could not read {image} as an image ({str(e).splitlines()[0][:200]}): "
                         f"pass a PNG, JPEG or any other still image PyAV decodes") from None
    try:
        wave = np.asarray(load_audio(audio), dtype=np.float32)
    except Exception as e:
        raise ValueError(f"could not read {audio} as audio ({str(e).splitlines()[0][:200]}): "
                         f"pass a WAV, MP3, FLAC or any other audio file PyAV decodes") from None
    seconds = len(wave) / SAMPLE_RATE
    if len(wave) == 0:
        raise ValueError(f"{audio} holds no audio samples: pass a file with speech in it")
    if seconds < MIN_SECONDS:
        raise ValueError(f"{audio} is {seconds:.3f} s long; minread needs at least {MIN_SECONDS} s "
                         f"of speech (one video frame is 40 ms)")
    if not np.isfinite(wave).all() or np.abs(wave).max() < 1e-4:
        raise ValueError(f"{audio} is silent (peak amplitude {np.abs(wave).max():.1e}): "
                         f"pass a file with audible speech")
    return reference, wave


def write_png(path, rgb):
    """Write an (H, W, 3) uint8 image as PNG with PyAV (image2 muxer, png encoder)."""
    import av
    with av.open(str(path), mode="w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.height, stream.width = rgb.shape[:2]
        stream.pix_fmt = "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def filmstrip(frames, height=96):
    """Frames (K, H, W, 3) uint8 side by side, scaled up by an integer factor to >= `height`."""
    s = max(1, -(-height // frames.shape[1]))
    strip = np.concatenate(list(frames), axis=1)                      # (H, K*W, 3)
    return strip.repeat(s, axis=0).repeat(s, axis=1)


def peak_memory_mb(device):
    """Peak device memory (CUDA) or the process's peak resident memory (CPU), in MB."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(image, audio, out, schedule="asynchronous", steps=None, cfg=None, ckpt=None, seed=0,
             device="cpu", models=None, strip_frames=8, keep_video=False, verbose=True, overlap=True):
    """Generate a talking-head mp4 of `image` speaking `audio`; returns figures of the run.

    Writes `out` (speech muxed in) and a filmstrip of `strip_frames` frames beside it
    (same name, .png). `models` (from `load_models`) skips loading `ckpt`. With
    keep_video the returned dict also holds the generated video (3, T, H, W). `overlap`
    samples the next clip while this one is decoded and written (see sample_video).
    """
    from minread.ans import CountCalls
    from minread.data import VideoWriter
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    out = Path(out)
    strip_path, strip_tmp = out.with_suffix(".png"), out.with_name(out.stem + ".png.tmp")
    t_load = time.perf_counter()
    models = models or load_models(ckpt, device)
    t0 = time.perf_counter()
    reference, wave = read_inputs(image, audio, models.vae.cfg.image_size)
    frames = output_frames(len(wave))
    picks = set(np.linspace(0, frames - 1, min(strip_frames, frames)).round().astype(int).tolist())
    counted = replace(models, dit=CountCalls(models.dit))
    kept, strip, done = [], [], 0
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with VideoWriter(out, fps=FPS, audio=wave) as writer:
            for chunk in stream_frames(counted, reference, wave, schedule, steps, cfg, seed, verbose, overlap):
                rgb = to_uint8(chunk)                                  # (t, H, W, 3)
                writer.write(rgb)
                strip += [rgb[i - done] for i in range(done, done + len(rgb)) if i in picks]
                kept += [chunk.cpu()] if keep_video else []
                done += len(rgb)
            write_png(strip_tmp, filmstrip(np.stack(strip)))
        os.replace(strip_tmp, strip_path)
    finally:
        strip_tmp.unlink(missing_ok=True)
    wall, seconds, calls = time.perf_counter() - t0, frames / FPS, counted.dit.calls
    stats = {"frames": frames, "seconds": seconds, "wall_s": wall, "rtf": seconds / wall,
             "model_calls": calls, "calls_per_second": calls / seconds, "load_s": t0 - t_load,
             "peak_mem_mb": peak_memory_mb(device), "schedule": schedule, "out": str(out),
             "filmstrip": str(strip_path)}
    if verbose:
        print(f"wrote {out} ({frames} frames, {seconds:.2f} s) and {strip_path.name}: {wall:.2f} s, "
              f"{stats['rtf']:.1f}x real time ({schedule}, {calls} model calls)")
    if keep_video:
        stats["video"] = torch.cat(kept, dim=1)                        # (3, T, H, W)
    return stats


# ----------------------------------------------------------------------------- toy evaluation

def reconstruction_metrics(models, video, truth, reference):
    """metrics.clip_metrics of the VAE's reconstruction of true frames video (3, T, H, W),
    trimmed to 1 + s_t*k frames with their truth tracks: the ceiling of a latent model."""
    from minread import metrics
    s_t, device = models.vae.cfg.temporal, models.vae.latent_mean.device
    T = 1 + (video.shape[1] - 1) // s_t * s_t
    with torch.no_grad():
        rec = models.vae.decode_latents(models.vae.encode_latents(video[None, :, :T].to(device)))[0].clamp(-1, 1)
    return metrics.clip_metrics(rec.cpu(), {**{k: v[:T] for k, v in truth.items()}, "reference": reference})


def reference_frame(clips, j, seed=0):
    """A frame (3, H, W) from another clip of clip j's identity: its mouth state is not j's."""
    others = [k for k, c in enumerate(clips) if c["identity"] == clips[j]["identity"] and k != j] or [j]
    rng = np.random.default_rng([seed, j])
    video = clips[others[rng.integers(len(others))]]["video"]                # (3, T, H, W)
    return video[:, int(rng.integers(video.shape[1]))]


@torch.no_grad()
def evaluate(models, clips, schedule="asynchronous", steps=None, cfg=None, seed=0, max_frames=None):
    """Generate toy clips (dicts of data.ToyClipDataset(...).clips) from their speech and a
    reference of their identity; the mean of metrics.clip_metrics over the clips."""
    from minread import metrics
    rows = []
    for j, c in enumerate(clips):
        T = c["video"].shape[1] if max_frames is None else min(max_frames, c["video"].shape[1])
        ref = reference_frame(clips, j, seed)
        chunks = stream_frames(models, ref, c["audio"][:T * HOP].numpy(), schedule, steps, cfg, seed + j)
        video = torch.cat([x.cpu() for x in chunks], dim=1)              # (3, T, H, W)
        truth = {k: c[k][:T] for k in ("opening", "closed", "viseme")}
        rows.append(metrics.clip_metrics(video, {**truth, "reference": ref}))
    return {k: float(np.nanmean([r[k] for r in rows if k in r])) for k in rows[0]}


def demo(ckpt=None, out="out/demo.mp4", data_root="data_toy", clip=0, schedule="asynchronous",
         steps=None, cfg=None, seed=0):
    """A held-out identity speaking a held-out sentence of data_toy, generated with the shipped
    model from an image file and a speech file; prints the metrics against the toy truth,
    next to those of the VAE's own reconstruction of the true clip (the latent model's ceiling)."""
    from minread import metrics
    from minread.data import ToyClipDataset
    models = load_models(ckpt)
    ds = ToyClipDataset(data_root, "test", size=models.vae.cfg.image_size, frames=1)
    c = ds.clips[clip]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = out.with_name(out.stem + "_reference.png")
    ref = reference_frame(ds.clips, clip, seed)
    write_png(image, to_uint8(ref[:, None])[0])
    audio = Path(data_root) / f"{c['name']}.wav"
    text = next(m["text"] for m in ds.manifest["clips"] if m["name"] == c["name"])
    print(f"held-out identity {c['identity']}, clip {c['name']}: {text!r}")
    run = generate(image, audio, out, schedule, steps, cfg, seed=seed, models=models, keep_video=True)
    T = run["frames"]
    truth = {k: c[k][:T] for k in ("opening", "closed", "viseme")}
    figures = metrics.clip_metrics(run.pop("video"), {**truth, "reference": ref})
    ceiling = reconstruction_metrics(models, c["video"][:, :T], truth, ref)
    fmt = lambda d: {k: round(v, 3) for k, v in d.items()}  # noqa: E731
    print(f"generated vs toy truth:      {fmt(figures)}")
    print(f"VAE reconstruction vs truth: {fmt(ceiling)}")
    return {"generated": figures, "vae_reconstruction": ceiling, "run": run}
