"""Command line: `python -m minread COMMAND [options]`; `python -m minread --help` lists them.

One subparser and one small function per command; all argument parsing lives here.
"""

import argparse
import importlib.util
import os
import json
import sys
from pathlib import Path

DATA_TOY_COMMAND = ("python -m minread render-data --out data_toy --train-identities 20 "
                    "--test-identities 6 --clips 8 --test-clips 4 --size 64 --seed 0 --source espeak --crf 12")


def cmd_render(args):
    """Render one held-out toy clip with its speech to an mp4 and print its metrics."""
    import torch
    from minread import data, metrics
    ident = data.sample_identity(args.identity)
    if args.source == "espeak" and importlib.util.find_spec("parselmouth") is None:
        print("praat-parselmouth is not installed (pip install 'minread[speech]'): "
              "using the numpy babble voice instead of eSpeak")
        args.source = "babble"
    _, test_sentences = data._split_sentences(0, 0.25)
    text = args.text or data.SENTENCES[test_sentences[args.seed % len(test_sentences)]]
    clip = data.render_clip(ident, text if args.source == "espeak" else None, size=args.size,
                            seed=args.seed, source=args.source)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with data.VideoWriter(out, audio=clip["audio"]) as w:
        w.write(clip["video"])
    back = data.to_tensor(data.read_video(out), args.size)                    # (3, T, H, W)
    ref = data.to_tensor(data.render_frames(ident, clip["opening"][:1] * 0, clip["spread"][:1] * 0,
                                            clip["blink"][:1] * 0, clip["head"][:1] * 0, args.size), args.size)[:, 0]
    sample = {k: torch.as_tensor(clip[k]) for k in ("opening", "closed", "viseme")}
    sample["reference"] = ref
    figures = metrics.clip_metrics(back, sample)
    print(f"wrote {out}: {len(clip['video'])} frames at {args.size} px, {len(clip['audio']) / data.SAMPLE_RATE:.2f} s, "
          f"voice {clip['voice']['language']} / {clip['voice']['variant']}, text {text!r}")
    print("metrics of the decoded mp4 against the true mouth track (a perfect generator's scores):")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


def cmd_render_data(args):
    """Render a toy data set (data_toy/ or a larger one for training)."""
    from minread import data
    test_clips = args.clips if args.test_clips is None else args.test_clips
    command = (f"python -m minread render-data --out {args.out} --train-identities {args.train_identities} "
               f"--test-identities {args.test_identities} --clips {args.clips} --test-clips {test_clips} "
               f"--size {args.size} --seed {args.seed} --source {args.source} --crf {args.crf}")
    m = data.render_dataset(args.out, args.train_identities, args.test_identities, args.clips,
                            size=args.size, seed=args.seed, source=args.source,
                            test_clips=test_clips, crf=args.crf, command=command)
    seconds = sum(c["frames"] for c in m["clips"]) / data.FPS
    print(f"rendered {len(m['clips'])} clips ({seconds / 60:.1f} min of speech) into {args.out}")


def cmd_train(args):
    """Train one stage or all three; under torchrun the DiT stage runs data-parallel."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # 2-core machines stall without it
    from dataclasses import replace
    from minread.train import presets, train
    overrides = {k: v for k, v in (("steps", args.dit_steps), ("vae_steps", args.vae_steps),
                                   ("vae_minutes", args.vae_minutes), ("speech_steps", args.speech_steps),
                                   ("batch_size", args.batch_size), ("data_root", args.data_root),
                                   ("seed", args.seed)) if v is not None}
    tc = replace(presets(args.preset)[3], **overrides)
    import torch.distributed as dist
    try:
        train(args.stage, args.preset, out_dir=args.out_dir, resume=not args.restart, bundle_path=args.bundle, tc=tc)
    finally:  # under torchrun: close the process group before exit, or gloo's threads may abort it
        if dist.is_initialized():
            dist.destroy_process_group()


def cmd_generate(args):
    """Generate a talking-head mp4 (+ PNG filmstrip) from a face image and a speech file."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from minread.generate import generate
    generate(args.image, args.audio, args.out, args.schedule, args.steps, args.cfg, args.ckpt,
             seed=args.seed, device=args.device, overlap=not args.sequential)


def cmd_demo(args):
    """A held-out toy identity speaking a held-out sentence, with metrics against the truth."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from minread.generate import demo
    demo(args.ckpt, args.out, args.data, args.clip, args.schedule, args.steps, args.cfg)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m minread", description=(
        "minread: a compact, teachable implementation of READ (audio-driven talking heads)."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("render", help="render a held-out toy clip with its speech to an mp4 and print its metrics")
    p.add_argument("--out", default="out/toy_clip.mp4", help="mp4 file to write")
    p.add_argument("--identity", type=int, default=20, help="identity seed (default 20: a held-out face of data_toy)")
    p.add_argument("--seed", type=int, default=1, help="seed for the voice, blinks and head motion")
    p.add_argument("--text", default=None, help="sentence to speak (default: a held-out sentence)")
    p.add_argument("--size", type=int, default=128, help="frame size in pixels (square, even)")
    p.add_argument("--source", choices=["espeak", "babble"], default="espeak", help="speech source")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("render-data", help="render a toy data set; "
                       f"data_toy/ is rebuilt bit-identically by: {DATA_TOY_COMMAND}")
    p.add_argument("--out", required=True, help="output folder (e.g. data_toy or runs/toy_large)")
    p.add_argument("--train-identities", type=int, default=20, help="number of training identities")
    p.add_argument("--test-identities", type=int, default=6, help="number of held-out identities")
    p.add_argument("--clips", type=int, default=8, help="clips (sentences) per training identity")
    p.add_argument("--test-clips", type=int, default=None, help="clips per held-out identity (default: --clips)")
    p.add_argument("--size", type=int, default=64, help="frame size in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole set")
    p.add_argument("--source", choices=["espeak", "babble"], default="espeak", help="speech source")
    p.add_argument("--crf", type=int, default=12, help="H.264 quality (lower = larger, truer colours)")
    p.set_defaults(func=cmd_render_data)
    p = sub.add_parser("train", help="train the VAE, the SpeechAE and the A2V-DiT (one stage or all)")
    p.add_argument("--stage", choices=["vae", "speech_ae", "dit", "all"], default="all", help="stage(s) to run, in order")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="model and recipe size (small: one GPU)")
    p.add_argument("--out-dir", default=None, help="checkpoints, latent cache and log (default runs/PRESET)")
    p.add_argument("--bundle", default=None, help="where the generation checkpoint goes (default OUT_DIR/model.pt)")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints instead of resuming")
    p.add_argument("--dit-steps", type=int, default=None, help="A2V-DiT optimiser steps (default: the preset's)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: vae.py's recipe; with a budget, at most)")
    p.add_argument("--vae-minutes", type=float, default=None,
                   help="VAE time budget, rendering included (default: vae.py's recipe, 19; 0: exactly --vae-steps)")
    p.add_argument("--speech-steps", type=int, default=None, help="SpeechAE steps (default: speech_ae.py's recipe)")
    p.add_argument("--batch-size", type=int, default=None, help="DiT windows per step and process (default: the preset's)")
    p.add_argument("--data-root", default=None, help="toy data set to train on (default data_toy)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice (default 0)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate a lip-synced talking-head mp4 from a face image and speech")
    p.add_argument("--image", required=True, help="face image (any format PyAV reads; cropped and resized)")
    p.add_argument("--audio", required=True, help="speech (any format PyAV reads; resampled to 16 kHz mono)")
    p.add_argument("--out", required=True, help="mp4 to write; a PNG filmstrip goes beside it")
    p.add_argument("--schedule", choices=["asynchronous", "synchronous", "synchronous_overlap"],
                   default="asynchronous", help="long-video noise schedule")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per clip (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="audio guidance scale (default: the model's)")
    p.add_argument("--ckpt", default=None, help="generation bundle (default: the shipped tiny model)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--sequential", action="store_true",
                   help="sample, decode and write one after the other (default: sample the next clip "
                        "while the last one is decoded and written, on another CPU thread)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="generate a held-out toy face speaking a held-out sentence and print its metrics")
    p.add_argument("--ckpt", default=None, help="generation bundle (default: the shipped tiny model)")
    p.add_argument("--out", default="out/demo.mp4", help="mp4 to write")
    p.add_argument("--data", default="data_toy", help="toy data set holding the held-out clips")
    p.add_argument("--clip", type=int, default=0, help="index of the held-out clip")
    p.add_argument("--schedule", choices=["asynchronous", "synchronous", "synchronous_overlap"],
                   default="asynchronous", help="long-video noise schedule")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per clip (default: the model's)")
    p.add_argument("--cfg", type=float, default=None, help="audio guidance scale (default: the model's)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
