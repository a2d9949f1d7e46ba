"""Training: the three stages (VAE -> SpeechAE -> A2V-DiT), checkpoints, resume, DDP.

READ trains a temporal VAE and a speech autoencoder first and then, with both frozen,
the audio-to-video diffusion transformer on their latents with asynchronous add-noise
(DESIGN.md §4-§7). The order of the stages and the frozen encoders are the paper's;
the recipe here (AdamW with warm-up and cosine decay, EMA weights for sampling, latents
cached once, the window sampler, the evaluation) is our reconstruction.

- `train(stage, preset)` runs one stage or all of them; the VAE and SpeechAE stages call
  their modules' own loops (`train_vae`, `train_speech_ae`), the DiT stage is below.
- Checkpoints are written atomically (temp file + os.replace) and hold everything an
  exact resume needs: model, optimizer, EMA, step, the data sampler's RNG state and the
  global RNG states, plus the configs as plain dicts, so they load with
  `torch.load(weights_only=True)` and never run code. A checkpoint made for another
  config is refused with the list of settings that differ.
- Several processes through `torchrun` train the DiT with DistributedDataParallel, as
  nanoGPT does: gloo on CPU, NCCL on CUDA, logging and checkpoints on rank 0 only.
- The DiT trains on the toy set's training clips plus `extra_clips` clips rendered in
  memory at the start of the stage (`data.render_training_clips`: new faces with new
  eSpeak voices speaking the training sentences; needs the `speech` extra). More data is
  what moved held-out lip sync; on 16 held-out clips (S = 2, guidance 1.5), same
  encoders, LipCorr on held-out / training clips: data_toy alone, 1000 steps 0.746 / 0.817
  (4000 steps scored lower: the DiT learned the training clips); + 640 clips, 2000 steps
  0.768 / 0.803; + 1280, 2000 steps 0.774 / 0.799; + 2560, 3000 steps 0.783 / 0.811 (the
  tiny preset's data); + 5120, 3000 steps 0.782 / 0.810 (no further gain, 18 more minutes).
  Settings that scored lower held out: at 640 clips motion_weight 12 (0.760 / 0.801) and
  width 192 with 6 heads (0.762 / 0.833: it fits the training voices); at 2560 clips a
  speech window of +-2 latent frames (audio_radius = cond_radius = 2: 0.773 / 0.828, the same).
  What moved it past 0.80 was the DiT's speech conditioning, not data: an MLP (hidden 512)
  from speech latents f-1..f+1 to frame f's adaLN instead of one linear map, and the peak
  learning rate doubled to 1e-3 (dit.py has the equal-step runs); with both, 2560 clips and
  3000 steps: held-out LipCorr 0.811 on the 16 clips, 0.821 on all 24 (was 0.783 / 0.792).
  The same recipe on the latents of the rebuilt VAE (vae.py: PSNR 23.2 -> 27.6 dB): 0.814 /
  0.830, amplitude 0.73 -> 0.86, identity error 0.058 -> 0.037; on those of its next recipe
  (28.0 dB): 0.822 / 0.841, amplitude 0.89, identity error 0.042; on those of the Muon-trained
  VAE (30.6 dB): 0.836 / 0.844, amplitude 1.00, identity error 0.019 (the shipped model).
- `bundle` packs the three trained models (EMA weights for the DiT) into the one
  checkpoint that generation loads.
"""

import copy
import hashlib
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minread.data import load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    preset: str = "tiny"
    out_dir: str = "runs/tiny"      # stage checkpoints, latent cache and log go here
    data_root: str = "data_toy"
    seed: int = 0
    # DiT stage
    steps: int = 2000               # DiT steps (with the extra clips; on data_toy alone 4000 overfit)
    batch_size: int = 32            # per process
    lr: float = 5e-4                # peak learning rate
    min_lr: float = 5e-5            # end of the cosine decay
    warmup: int = 100               # linear warm-up steps
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    log_every: int = 50             # steps between loss records in the history
    ckpt_every: int = 250           # steps between checkpoints
    eval_every: int = 500           # steps between held-out generations
    eval_clips: int = 4             # held-out clips generated at each evaluation
    eval_frames: int = 50           # frames (2 s) generated per evaluation clip
    # ANS geometry of a training window: M anchors + W clips of n latent frames
    n: int = 2
    W: int = 2
    M: int = 1                      # one anchor frame (4 video frames) of motion context
    S: int = 2                      # denoising steps per clip (tiny: lip-sync as good as S = 4 or 8)
    cfg_scale: float = 1.5          # audio guidance at evaluation and the bundle's default
    refs_per_clip: int = 4          # cached reference frames per clip
    extra_clips: int = 0            # extra eSpeak training clips rendered in memory (4 per new face)
    extra_salad: float = 0.0        # share of them speaking random sequences of training-sentence words
    motion_weight: float = 4.0      # extra loss weight on latent cells that move (0 = plain MSE)
    # the component stages keep their own recipes; None = the module's default steps
    vae_steps: int = None
    vae_minutes: float = None       # the VAE's time budget (None: vae.py's; 0: exactly vae_steps)
    speech_steps: int = None


# settings that change nothing a resumed run computes, so they may differ on resume
RESUME_FREE = {"out_dir", "log_every", "ckpt_every", "eval_every", "eval_clips"}


def presets(preset):
    """(vae_cfg, speech_cfg, dit_cfg, train_cfg) of a named preset: "tiny" or "small"."""
    from minread import dit, speech_ae, vae
    if preset == "tiny":
        return vae.tiny(), speech_ae.tiny(), dit.tiny(), TrainConfig(extra_clips=2560, steps=3000, lr=1e-3)
    if preset == "small":
        tc = TrainConfig(preset="small", out_dir="runs/small", steps=20000, batch_size=16,
                         lr=2e-4, min_lr=2e-5, warmup=500, ema_decay=0.9995, M=1, S=16,
                         extra_clips=640)
        return vae.small(), speech_ae.small(), dit.small(), tc
    raise ValueError(f"unknown preset {preset!r}: use 'tiny' or 'small'")


# ----------------------------------------------------------------------------- checkpoints
# (written and read by data.save_checkpoint / load_checkpoint: atomic, weights only)

def config_diff(saved, current, ignore=()):
    """Settings whose values differ between two config dicts: ['width: 128 (checkpoint) vs 192']."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k, '<missing>')!r} (checkpoint) vs {current.get(k, '<missing>')!r}"
            for k in keys if k not in ignore and norm(saved.get(k)) != norm(current.get(k))]


def check_config(saved, current, what, path, ignore=()):
    """Refuse a checkpoint made for another config, naming every setting that differs."""
    diff = config_diff(saved, current, ignore)
    if diff:
        raise ValueError(f"checkpoint {path} was made for another {what} config; differing "
                         f"settings: " + "; ".join(diff) +
                         ". Use the same settings, or a fresh --out-dir to start over.")


def rng_state(gen):
    """All RNG state a resumed run needs, as tensors (weights_only-safe)."""
    state = {"torch": torch.get_rng_state(), "data": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, gen):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- optimisation

def get_lr(step, tc):
    """Linear warm-up to tc.lr, then cosine decay to tc.min_lr at tc.steps (nanoGPT)."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    ratio = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.lr - tc.min_lr)


def make_optimizer(model, tc):
    """AdamW; matrices decay, biases, norms and embeddings-as-vectors do not (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameters and buffers (DiT's update_ema)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    ddp: bool = False
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(device=None):
    """Read torchrun's env vars (RANK, LOCAL_RANK, WORLD_SIZE) and join the process group."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Dist(device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():  # long timeout: other ranks wait while rank 0 trains the VAE
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(hours=3))
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    return Dist(True, rank, int(os.environ["WORLD_SIZE"]), f"cuda:{local}" if cuda else "cpu")


# ----------------------------------------------------------------------------- DiT stage

@torch.no_grad()
def encode_clips(vae, speech_ae, clips, device, refs_per_clip=4):
    """Encode whole toy clips once with the frozen VAE and SpeechAE (the DiT's training set).

    Per clip: latents (C, F, h, w) of its longest 1 + s_t*k frames, speech latents (F, Da),
    and reference latents (R, C, 1, h, w) of R of its frames, each a 1-frame video.
    """
    s_t = vae.cfg.temporal
    cache = {"latents": [], "audio": [], "refs": [], "identity": []}
    for c in clips:
        T = 1 + (c["video"].shape[1] - 1) // s_t * s_t
        video = c["video"][None, :, :T].to(device)                            # (1, 3, T, H, W)
        cache["latents"].append(vae.encode_latents(video)[0].cpu())           # (C, F, h, w)
        wave = c["audio"][None, :T * 640].to(device)                          # (1, T*640)
        cache["audio"].append(speech_ae.speech_latents(wave)[0].cpu())        # (F, Da)
        picks = torch.linspace(0, T - 1, refs_per_clip).round().long()
        frames = video[0][:, picks].transpose(0, 1)[:, :, None]               # (R, 3, 1, H, W)
        cache["refs"].append(vae.encode_latents(frames).cpu())                # (R, C, 1, h, w)
        cache["identity"].append(int(c["identity"]))
    return cache


def fingerprint(vae, speech_ae, tc):
    """A digest of the frozen encoders' weights and the data: a stale cache is re-encoded."""
    h = hashlib.sha1((Path(tc.data_root) / "manifest.json").read_bytes())
    h.update(repr((tc.extra_clips, tc.extra_salad, tc.seed)).encode())
    for m in (vae, speech_ae):
        for v in m.state_dict().values():
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_cache(vae, speech_ae, tc, d):
    """The training set's latents, encoded once by rank 0 and cached beside the checkpoints."""
    from minread.data import ToyClipDataset, render_training_clips
    path, key = Path(tc.out_dir) / "latents_train.pt", fingerprint(vae, speech_ae, tc)
    if d.master and (not path.exists() or load_checkpoint(path)["key"] != key):
        clips = ToyClipDataset(tc.data_root, "train", size=vae.cfg.image_size, frames=1).clips
        if tc.extra_clips:
            clips += render_training_clips(math.ceil(tc.extra_clips / 4), 4, vae.cfg.image_size,
                                           seed=tc.seed, salad=tc.extra_salad,
                                           workers=torch.get_num_threads())[:tc.extra_clips]
        save_checkpoint(path, {**encode_clips(vae, speech_ae, clips, d.device, tc.refs_per_clip), "key": key})
    if d.ddp:
        dist.barrier()
    cache = load_checkpoint(path)
    ids = cache["identity"]
    cache["others"] = [[k for k in range(len(ids)) if ids[k] == ids[i] and k != i] or [i]
                       for i in range(len(ids))]                             # same face, other clips
    cache["weight"] = [(1 + tc.motion_weight * motion_map(z)) / (1 + tc.motion_weight)  # (h, w), mean 1
                       for z in cache["latents"]]                            # dit_loss's per-cell weight
    return cache


def motion_map(z):
    """Where a clip moves: latents (C, F, h, w) -> (h, w), the variance over time of each
    latent cell averaged over channels, divided by its mean (so the map averages 1).
    In a talking head that is the mouth (and the eyes); no labels needed."""
    var = z.var(dim=1).mean(dim=0)                                           # (h, w)
    return var / var.mean().clamp_min(1e-8)


def sample_batch(cache, tc, dit_cfg, gen, device):
    """A batch of training windows: up to M anchors + W*n frames cut from cached latents.

    The noise levels come from ANS's training sampler (asynchronous add-noise). A window
    with fewer than M anchors is the start of a video, so it is cut from latent frame 0.
    The reference latent is a frame of another clip of the same identity, so the mouth
    cannot be copied from it. The loss weight per latent cell comes from the clip's
    motion map: cells that move count up to 1 + motion_weight times more. Noise and
    condition drops come from `gen`: resume is exact.
    """
    from minread import ans
    B = tc.batch_size
    draw = ans.sample_levels(B, tc.n, tc.W, tc.M, generator=gen, p_drop_audio=dit_cfg.p_drop_audio,
                             p_drop_ref=dit_cfg.p_drop_ref)                   # levels (B, Fw)
    Fw = draw.levels.shape[1]
    pool = [i for i, z in enumerate(cache["latents"]) if z.shape[1] >= Fw]
    lat, audio, ref, weight = [], [], [], []
    for _ in range(B):
        i = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        z = cache["latents"][i]
        s = 0 if draw.n_anchors < tc.M else int(torch.randint(z.shape[1] - Fw + 1, (1,), generator=gen))
        lat.append(z[:, s:s + Fw])                                           # (C, Fw, h, w)
        audio.append(cache["audio"][i][s:s + Fw])                            # (Fw, Da)
        others = cache["others"][i]
        refs = cache["refs"][others[int(torch.randint(len(others), (1,), generator=gen))]]
        ref.append(refs[int(torch.randint(len(refs), (1,), generator=gen))])  # (C, 1, h, w)
        weight.append(cache["weight"][i])                                    # (h, w)
    batch = {"latents": torch.stack(lat), "audio": torch.stack(audio), "reference": torch.stack(ref),
             "weight": torch.stack(weight)[:, None, None],                  # (B, 1, 1, h, w)
             "n_anchors": draw.n_anchors, "drop_audio": draw.drop_audio, "drop_ref": draw.drop_ref}
    batch["noise"] = torch.randn(batch["latents"].shape, generator=gen)     # (B, C, Fw, h, w)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch, draw.levels.to(device)


def sampler_settings(tc):
    """The ANS settings generation uses, stored in the bundle with the weights."""
    return {"n": tc.n, "W": tc.W, "M": tc.M, "S": tc.S, "cfg": tc.cfg_scale}


def evaluate_dit(model, vae, speech_ae, clips, tc):
    """Generate held-out clips with the asynchronous schedule: mean LipCorr, amplitude, ..."""
    from minread.generate import Models, evaluate
    models = Models(vae, speech_ae, model.eval(), sampler_settings(tc))
    return evaluate(models, clips, max_frames=tc.eval_frames, seed=tc.seed)


def train_dit(dit_cfg, tc, vae, speech_ae, resume=True, until=None, log=print):
    """Train the A2V-DiT on frozen VAE / SpeechAE latents; returns (model, EMA model, stats).

    `until` stops after that many steps as if the run had been killed there: the steps since
    the last checkpoint are lost, and a resumed run redoes them (tests check it is exact).
    """
    from minread.data import ToyClipDataset
    from minread.dit import A2VDiT, dit_loss
    d = setup_distributed()
    torch.manual_seed(tc.seed)  # the same initial weights (and EMA) on every rank
    gen = torch.Generator().manual_seed(tc.seed + 1_000_003 * d.rank)  # windows, noise, drops
    vae, speech_ae = vae.to(d.device).eval(), speech_ae.to(d.device).eval()
    cache = load_cache(vae, speech_ae, tc, d)
    test = []
    if d.master and tc.eval_clips:  # spread over the held-out identities, not one face's clips
        test = ToyClipDataset(tc.data_root, "test", size=vae.cfg.image_size, frames=1).clips
        test = test[::max(1, len(test) // tc.eval_clips)][:tc.eval_clips]

    model = A2VDiT(dit_cfg).to(d.device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = make_optimizer(model, tc)
    ckpt_path, step, history = Path(tc.out_dir) / "dit.pt", 0, []
    run_cfg = {**asdict(tc), "world_size": d.world_size}
    if resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=d.device)
        check_config(ck["config"], asdict(dit_cfg), "A2V-DiT", ckpt_path)
        check_config(ck["train"], run_cfg, "training", ckpt_path, ignore=RESUME_FREE)
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        step, history = ck["step"], ck["history"]
        set_rng_state(ck["rng"][d.rank], gen)
        log(f"resumed {ckpt_path} at step {step}")
    ddp = model
    if d.ddp:  # gradients are averaged across processes inside backward()
        ddp = DDP(model, device_ids=[torch.device(d.device).index] if d.device.startswith("cuda") else None)
        ddp.prediction = model.prediction  # dit_loss reads it

    def checkpoint():
        states = [rng_state(gen)]
        if d.ddp:  # every rank's sampler state, so each resumes its own stream
            states = [None] * d.world_size
            dist.all_gather_object(states, rng_state(gen))
        if d.master:
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(),
                                        "optimizer": opt.state_dict(), "step": step,
                                        "windows_seen": step * tc.batch_size * d.world_size,
                                        "rng": states, "history": history,
                                        "config": asdict(dit_cfg), "train": run_cfg})

    model.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not d.master, desc="dit", dynamic_ncols=True)
    t0 = time.time()
    while step < tc.steps and (until is None or step < until):
        lr = get_lr(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        batch, levels = sample_batch(cache, tc, dit_cfg, gen, d.device)
        loss = dit_loss(ddp, batch, levels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        update_ema(ema, model, min(tc.ema_decay, (1 + step) / (10 + step)))  # EMA warm-up
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if d.master and (step % tc.log_every == 0 or step == tc.steps):
            history.append({"step": step, "loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                            "minutes": (time.time() - t0) / 60})
        if d.master and test and (step % tc.eval_every == 0 or step == tc.steps):
            ev = evaluate_dit(ema, vae, speech_ae, test, tc)
            history.append({"step": step, **ev})
            log(f"dit step {step}: loss {loss.item():.4f}, held-out LipCorr {ev['lip_corr']:.3f}, "
                f"amplitude {ev['amplitude_ratio']:.2f}")
        if step % tc.ckpt_every == 0 or step == tc.steps:
            checkpoint()
    bar.close()
    if d.ddp:  # every rank returns only once the last checkpoint is on disk
        dist.barrier()
    return model, ema, {"step": step, "minutes": (time.time() - t0) / 60, "history": history}


# ----------------------------------------------------------------------------- stages

def bundle(path, vae, speech_ae, dit, tc, dtype=torch.float16):
    """One checkpoint for generation: the three models' weights and configs + ANS settings.

    Weights are stored in float16 (half the bytes; generation casts back to float32).
    """
    def pack(m):
        return {"config": asdict(m.cfg), "state": {k: v.to(dtype) if v.is_floating_point() else v
                                                   for k, v in m.state_dict().items()}}
    save_checkpoint(path, {"vae": pack(vae), "speech_ae": pack(speech_ae), "dit": pack(dit),
                           "sampler": sampler_settings(tc), "preset": tc.preset})


def train(stage="all", preset="tiny", out_dir=None, resume=True, until=None, bundle_path=None,
          vae_cfg=None, speech_cfg=None, dit_cfg=None, tc=None, log=None):
    """Run one training stage ("vae", "speech_ae", "dit") or all three in order.

    Configs default to the preset; pass any of them to override (tests use micro sizes).
    The VAE and SpeechAE stages run on rank 0 only (they are small); the DiT stage uses
    every process. Returns per-stage stats; a finished DiT stage writes the generation
    bundle to `bundle_path` (default out_dir/model.pt).
    """
    from minread import speech_ae as sae_mod
    from minread import vae as vae_mod
    if stage not in ("vae", "speech_ae", "dit", "all"):
        raise ValueError(f"unknown stage {stage!r}: use vae, speech_ae, dit or all")
    p_vae, p_sae, p_dit, p_tc = presets(preset)
    vae_cfg, speech_cfg, dit_cfg = vae_cfg or p_vae, speech_cfg or p_sae, dit_cfg or p_dit
    tc = replace(tc or p_tc, **({} if out_dir is None else {"out_dir": str(out_dir)}))
    out = Path(tc.out_dir)
    d = setup_distributed()
    if stage in ("dit", "all") and tc.extra_clips:  # before hours of other stages, not after
        from minread.data import require_espeak
        require_espeak(f"the DiT stage (it renders {tc.extra_clips} extra eSpeak training clips)",
                       "set TrainConfig.extra_clips=0")
    log = log or make_logger(out / "train.log", d.master)
    vae_path, sae_path = out / "vae" / "ckpt.pt", out / "speech_ae.pt"
    given = lambda **kw: {k: v for k, v in kw.items() if v is not None}  # noqa: E731  (None: the module's recipe)
    stats, t0 = {}, time.time()
    log(f"{time.strftime('%Y-%m-%d %H:%M:%S')} train stage={stage} preset={preset} processes={d.world_size} "
        f"threads={torch.get_num_threads()} torch={torch.__version__}\n  vae {asdict(vae_cfg)}\n  "
        f"speech_ae {asdict(speech_cfg)}\n  dit {asdict(dit_cfg)}\n  train {asdict(tc)}")
    if stage in ("vae", "all") and d.master:
        stats["vae"] = vae_mod.train_vae(vae_cfg, out_dir=out / "vae", device=d.device, resume=resume,
                                         data_root=tc.data_root, seed=tc.seed,
                                         **given(steps=tc.vae_steps, minutes=tc.vae_minutes))
        log(f"vae: {stats['vae']}")
    if stage in ("speech_ae", "all") and d.master:
        stats["speech_ae"] = sae_mod.train_speech_ae(speech_cfg, out=sae_path, data_root=tc.data_root,
                                                     seed=tc.seed, resume=resume, log=log,
                                                     **given(steps=tc.speech_steps))
        log(f"speech_ae: { {k: v for k, v in stats['speech_ae'].items() if k != 'history'} }")
    if d.ddp:
        dist.barrier()
    if stage in ("dit", "all"):
        for path, name in ((vae_path, "vae"), (sae_path, "speech_ae")):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: the DiT stage needs the trained {name}; run "
                                        f"`python -m minread train --stage {name} --out-dir {out}` first")
        vae = vae_mod.load_vae(vae_path, vae_cfg).requires_grad_(False)
        speech_ae = sae_mod.load_speech_ae(str(sae_path), speech_cfg).requires_grad_(False)
        _, ema, stats["dit"] = train_dit(dit_cfg, tc, vae, speech_ae, resume=resume, until=until, log=log)
        if d.master and stats["dit"]["step"] >= tc.steps:
            bundle(bundle_path or out / "model.pt", vae, speech_ae, ema, tc)
            log(f"wrote the generation bundle {bundle_path or out / 'model.pt'}")
    log(f"stage {stage} done in {(time.time() - t0) / 60:.1f} minutes")
    return stats


def make_logger(path, master):
    """Print through tqdm and append to the run's log file, on rank 0 only."""
    def log(msg):
        if master:
            tqdm.write(msg)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(msg + "\n")
    return log
