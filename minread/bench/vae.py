"""Temporal VAE benchmark: `python -m minread.bench vae --ckpt runs/vae_tiny/ckpt.pt`.

Held-out-identity reconstruction quality (PSNR, LipCorr of the mouth opening read back
from reconstructed frames against the true track), encode and decode throughput in
frames per second (whole clips and streaming chunk by chunk), and parameter counts of
the tiny, small and paper-geometry configs. Last line: one JSON object.
"""

import argparse
import time
from dataclasses import asdict

import torch

from minread import vae as V
from minread.bench import machine, report


def throughput(fn, frames, repeats):
    """Frames per second of fn(), after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return frames * repeats / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m minread.bench vae", description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", default="runs/vae_tiny/ckpt.pt", help="trained VAE checkpoint")
    ap.add_argument("--data", default="data_toy", help="toy set whose test split (held-out identities) is scored")
    ap.add_argument("--frames", type=int, default=49, help="frames per held-out clip (trimmed to 1 + s_t*k)")
    ap.add_argument("--batch", type=int, default=8, help="clips per call in the throughput runs")
    ap.add_argument("--clip-frames", type=int, default=33, help="frames per clip in the throughput runs")
    ap.add_argument("--chunk", type=int, default=2, help="latent frames per streaming decode call")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per throughput figure")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = V.load_vae(args.ckpt, device=device)
    cfg = model.cfg
    figures = {"bench": "vae", "ckpt": args.ckpt, "config": asdict(cfg), **machine()}

    ev = V.evaluate_vae(model, V.ClipBank.load(args.data, "test", cfg.image_size), args.frames)
    figures.update({"heldout_psnr_db": ev["psnr"], "heldout_lip_corr": ev["lip_corr"],
                    "heldout_lip_corr_true_frames": ev["lip_corr_true_frames"], "heldout_clips": ev["clips"]})
    print(f"held-out ({args.data} test, {ev['clips']} clips): PSNR {ev['psnr']:.2f} dB, "
          f"LipCorr {ev['lip_corr']:.3f} (true frames {ev['lip_corr_true_frames']:.3f})")

    T = 1 + (args.clip_frames - 1) // cfg.temporal * cfg.temporal
    B, n = args.batch, args.batch * T
    video = torch.rand(B, 3, T, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        z = model.encode_latents(video)

        def encode():
            model.encode(video), sync()

        def decode():
            model.decode_latents(z), sync()

        def decode_streaming():
            for _ in V.decode_stream(model, z.split(args.chunk, dim=2), normalised=True):
                pass
            sync()

        figures["encode_fps"] = throughput(encode, n, args.repeats)
        figures["decode_fps"] = throughput(decode, n, args.repeats)
        figures["decode_stream_fps"] = throughput(decode_streaming, n, args.repeats)
    figures.update({"throughput_batch": B, "throughput_frames": T, "stream_chunk_latents": args.chunk})
    print(f"throughput ({B} clips x {T} frames, {torch.get_num_threads()} threads, {device}): "
          f"encode {figures['encode_fps']:.0f} fps, decode {figures['decode_fps']:.0f} fps, "
          f"streaming decode ({args.chunk} latent frames per call) {figures['decode_stream_fps']:.0f} fps")

    for name, preset in V.PRESETS.items():
        c = preset()
        enc, dec, total = V.count_parameters(c)
        tokens = (c.image_size // c.spatial) ** 2
        figures[f"params_{name}"] = {"encoder": enc, "decoder": dec, "total": total, "tokens_per_latent_frame": tokens}
        print(f"{name:6s} {c.image_size} px, {c.spatial}x{c.spatial}x{c.temporal}, C={c.latent_channels}: "
              f"{total / 1e6:.2f} M parameters (encoder {enc / 1e6:.2f} M, decoder {dec / 1e6:.2f} M), "
              f"{tokens} tokens per latent frame")
    report(figures)
