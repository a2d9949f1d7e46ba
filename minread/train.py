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
- `bundle` packs the three trained models (EMA weights for the DiT) into the one
  checkpoint that generation loads.
"""

import copy
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm


@dataclass
class TrainConfig:
    preset: str = "tiny"
    out_dir: str = "runs/tiny"      # stage checkpoints, latent cache and log go here
    data_root: str = "data_toy"
    seed: int = 0
    # DiT stage
    steps: int = 3000
    batch_size: int = 32            # per process
    lr: float = 5e-4                # peak learning rate
    min_lr: float = 5e-5            # end of the cosine decay
    warmup: int = 100               # linear warm-up steps
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.99)
    grad_clip: float = 1.0
    ema_decay: float = 0.998
    ckpt_every: int = 250           # steps between checkpoints
    eval_every: int = 500           # steps between held-out generations
    eval_clips: int = 4             # held-out clips generated at each evaluation
    eval_frames: int = 49           # frames per evaluation clip (1 + s_t*k)
    # ANS geometry of a training window: M anchors + W clips of n latent frames
    n: int = 2
    W: int = 2
    M: int = 2
    S: int = 8                      # denoising steps per clip at evaluation
    # the component stages (their own configs hold the rest)
    vae_steps: int = 4000
    speech_steps: int = 1500


# settings that change nothing a resumed run computes, so they may differ on resume
RESUME_FREE = {"out_dir", "ckpt_every", "eval_every", "eval_clips", "steps"}


def presets(preset):
    """(vae_cfg, speech_cfg, dit_cfg, train_cfg) of a named preset: "tiny" or "small"."""
    from minread import dit, speech_ae, vae
    if preset == "tiny":
        return vae.tiny(), speech_ae.tiny(), dit.tiny(), TrainConfig()
    if preset == "small":
        tc = TrainConfig(preset="small", out_dir="runs/small", steps=20000, batch_size=16,
                         lr=2e-4, min_lr=2e-5, warmup=500, ema_decay=0.9995, M=1, S=16)
        return vae.small(), speech_ae.small(), dit.small(), tc
    raise ValueError(f"unknown preset {preset!r}: use 'tiny' or 'small'")


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, obj):
    """torch.save to a temp file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (weights_only: tensors and plain containers, no code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: train one with "
                                f"`python -m minread train` or pass --ckpt with a valid path")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable minread checkpoint ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0][:200]}); delete it or retrain") from None


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
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    return Dist(True, rank, int(os.environ["WORLD_SIZE"]), f"cuda:{local}" if cuda else "cpu")


# ----------------------------------------------------------------------------- DiT stage

@torch.no_grad()
def encode_split(vae, speech_ae, tc, split, frames, device):
    """Encode every clip of a toy split once with the frozen VAE and SpeechAE.

    Returns latents (N, C, F, h, w), audio (N, F, Da), reference (N, C, 1, h, w) and the
    true mouth opening (N, T) for evaluation.
    """
    from minread.data import ToyClipDataset
    ds = ToyClipDataset(tc.data_root, split, size=vae.cfg.image_size, frames=frames)
    out = {"latents": [], "audio": [], "reference": [], "opening": []}
    for i in range(len(ds)):
        item = ds[i]
        video = item["video"][None].to(device)                              # (1, 3, T, H, W)
        out["latents"].append(vae.encode_latents(video)[0].cpu())           # (C, F, h, w)
        out["audio"].append(speech_ae.speech_latents(item["audio"][None].to(device))[0].cpu())
        ref = item["reference"][None, :, None].to(device)                  # (1, 3, 1, H, W)
        out["reference"].append(vae.encode_latents(ref)[0].cpu())           # (C, 1, h, w)
        out["opening"].append(item["opening"])
    return {k: torch.stack(v) for k, v in out.items()}


def sample_batch(cache, tc, gen, device):
    """A batch of training windows: M anchors + W*n frames cut from cached latents.

    The noise levels come from ANS's training sampler (asynchronous add-noise); a window
    whose sampled pattern has no anchors starts at latent frame 0, like a video does.
    The noise and the condition drops are drawn here from `gen`, so resuming is exact.
    """
    from minread import ans
    B = tc.batch_size
    N, C, F, h, w = cache["latents"].shape
    levels, n_anchors, drop_audio, drop_ref = ans.sample_levels(
        B, n=tc.n, W=tc.W, M=tc.M, generator=gen)                      # levels (B, M + W*n)
    Fw = levels.shape[1]
    clip = torch.randint(N, (B,), generator=gen)
    start = torch.randint(F - Fw + 1, (B,), generator=gen) if n_anchors else torch.zeros(B, dtype=torch.long)
    frames = start[:, None] + torch.arange(Fw)                          # (B, Fw)
    lat = cache["latents"][clip[:, None], :, frames]                    # (B, Fw, C, h, w)
    batch = {"latents": lat.permute(0, 2, 1, 3, 4),                     # (B, C, Fw, h, w)
             "audio": cache["audio"][clip[:, None], frames],            # (B, Fw, Da)
             "reference": cache["reference"][clip],                     # (B, C, 1, h, w)
             "n_anchors": n_anchors, "drop_audio": drop_audio, "drop_ref": drop_ref}
    batch["noise"] = torch.randn(batch["latents"].shape, generator=gen)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch, levels.to(device)


def load_cache(vae, speech_ae, tc, split, frames, d):
    """Latents of a split, encoded once by rank 0 and cached on disk beside the checkpoints."""
    path = Path(tc.out_dir) / f"latents_{split}_{frames}.pt"
    if d.master and not path.exists():
        save_checkpoint(path, encode_split(vae, speech_ae, tc, split, frames, d.device))
    if d.ddp:
        dist.barrier()
    return load_checkpoint(path)


@torch.no_grad()
def evaluate_dit(model, vae, speech_ae, cache, tc, seed=0):
    """Generate held-out clips with the asynchronous schedule; mean LipCorr and amplitude ratio."""
    from minread import metrics
    from minread.generate import Models, sample_video
    models = Models(vae, speech_ae, model, sampler=sampler_settings(tc))
    device = next(model.parameters()).device
    corr, amp = [], []
    for i in range(min(tc.eval_clips, len(cache["latents"]))):
        video = torch.cat(list(sample_video(models, cache["reference"][i:i + 1].to(device),
                                            cache["audio"][i:i + 1].to(device), seed=seed + i)),
                          dim=2)[0].cpu()                               # (3, T, H, W)
        opening = metrics.read_opening(video)
        corr.append(metrics.lip_corr(opening, cache["opening"][i]))
        amp.append(metrics.amplitude_ratio(opening, cache["opening"][i]))
    return {"lip_corr": float(torch.tensor(corr).mean()), "amplitude": float(torch.tensor(amp).mean())}


def sampler_settings(tc):
    """The ANS settings generation uses, stored in the bundle with the weights."""
    return {"n": tc.n, "W": tc.W, "M": tc.M, "S": tc.S}


def train_dit(dit_cfg, tc, vae, speech_ae, resume=True, until=None, log=print):
    """Train the A2V-DiT on frozen VAE / SpeechAE latents; returns (raw model, EMA model, stats).

    `until` stops after that many steps, as if the run had been killed there (tests resume).
    """
    from minread.dit import A2VDiT, dit_loss
    d = setup_distributed()
    torch.manual_seed(tc.seed + d.rank)
    gen = torch.Generator().manual_seed(tc.seed + 1_000_003 * d.rank)
    vae, speech_ae = vae.to(d.device).eval(), speech_ae.to(d.device).eval()
    train_cache = load_cache(vae, speech_ae, tc, "train", clip_frames(tc, vae), d)
    test_cache = load_cache(vae, speech_ae, tc, "test", tc.eval_frames, d) if d.master else None

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
    raw = model
    if d.ddp:
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if d.device.startswith("cuda") else None)

    def checkpoint():
        states = [rng_state(gen)]
        if d.ddp:
            states = [None] * d.world_size
            dist.all_gather_object(states, rng_state(gen))
        if d.master:
            save_checkpoint(ckpt_path, {"model": raw.state_dict(), "ema": ema.state_dict(),
                                        "optimizer": opt.state_dict(), "step": step,
                                        "windows_seen": step * tc.batch_size * d.world_size,
                                        "rng": states, "history": history,
                                        "config": asdict(dit_cfg), "train": run_cfg})

    pbar = tqdm(total=tc.steps, initial=step, disable=not d.master, desc="dit", dynamic_ncols=True)
    while step < tc.steps and (until is None or step < until):
        lr = get_lr(step, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        batch, levels = sample_batch(train_cache, tc, gen, d.device)
        loss = dit_loss(model, batch, levels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.grad_clip)
        opt.step()
        update_ema(ema, raw, min(tc.ema_decay, (1 + step) / (10 + step)))  # EMA warm-up
        step += 1
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if d.master and (step % 50 == 0 or step == tc.steps):
            history.append({"step": step, "loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm)})
        if d.master and (step % tc.eval_every == 0 or step == tc.steps):
            ev = evaluate_dit(ema, vae, speech_ae, test_cache, tc)
            history.append({"step": step, **ev})
            log(f"step {step}: loss {loss.item():.4f}, held-out LipCorr {ev['lip_corr']:.3f}, "
                f"amplitude {ev['amplitude']:.2f}")
        if step % tc.ckpt_every == 0 or step == tc.steps:
            checkpoint()
    pbar.close()
    return raw, ema, {"step": step, "history": history}


def clip_frames(tc, vae):
    """Frames of each cached training clip: the longest 1 + s_t*k the toy clips hold."""
    from minread.data import ToyClipDataset
    return ToyClipDataset.max_frames(tc.data_root, "train", vae.cfg.temporal)


# ----------------------------------------------------------------------------- stages

def bundle(path, vae, speech_ae, dit, tc, dtype=torch.float16):
    """One checkpoint for generation: the three models' weights and configs + ANS settings.

    Weights are stored in float16 (half the bytes; generation casts back to float32).
    """
    pack = lambda m: {k: v.to(dtype) if v.is_floating_point() else v  # noqa: E731
                      for k, v in m.state_dict().items()}
    save_checkpoint(path, {"vae": {"config": asdict(vae.cfg), "state": pack(vae)},
                           "speech_ae": {"config": asdict(speech_ae.cfg), "state": pack(speech_ae)},
                           "dit": {"config": asdict(dit.cfg), "state": pack(dit)},
                           "sampler": sampler_settings(tc), "preset": tc.preset})


def train(stage="all", preset="tiny", out_dir=None, resume=True, until=None, bundle_path=None,
          vae_cfg=None, speech_cfg=None, dit_cfg=None, tc=None, log=None):
    """Run one training stage ("vae", "speech_ae", "dit") or all three in order.

    Configs default to the preset; pass any of them to override (tests use micro sizes).
    Returns a dict of per-stage stats; after the DiT stage the generation bundle is written
    to `bundle_path` (default out_dir/model.pt).
    """
    from minread import speech_ae as sae_mod
    from minread import vae as vae_mod
    if stage not in ("vae", "speech_ae", "dit", "all"):
        raise ValueError(f"unknown stage {stage!r}: use vae, speech_ae, dit or all")
    p_vae, p_sae, p_dit, p_tc = presets(preset)
    vae_cfg, speech_cfg, dit_cfg = vae_cfg or p_vae, speech_cfg or p_sae, dit_cfg or p_dit
    tc = tc or p_tc
    if out_dir is not None:
        tc = replace(tc, out_dir=str(out_dir))
    out = Path(tc.out_dir)
    d = setup_distributed()
    log = log or make_logger(out / "train.log", d.master)
    stats = {}
    if stage in ("vae", "all"):
        if d.master:
            stats["vae"] = vae_mod.train_vae(vae_cfg, steps=tc.vae_steps, out=out / "vae.pt",
                                             data_root=tc.data_root, seed=tc.seed, resume=resume)
            log(f"vae: {stats['vae']}")
        if d.ddp:
            dist.barrier()
    if stage in ("speech_ae", "all"):
        if d.master:
            stats["speech_ae"] = sae_mod.train_speech_ae(speech_cfg, steps=tc.speech_steps,
                                                         out=out / "speech_ae.pt", data_root=tc.data_root,
                                                         seed=tc.seed, resume=resume)
            log(f"speech_ae: {stats['speech_ae']}")
        if d.ddp:
            dist.barrier()
    if stage in ("dit", "all"):
        vae = vae_mod.load_vae(out / "vae.pt", vae_cfg).requires_grad_(False)
        speech_ae = sae_mod.load_speech_ae(out / "speech_ae.pt", speech_cfg).requires_grad_(False)
        _, ema, stats["dit"] = train_dit(dit_cfg, tc, vae, speech_ae, resume=resume, until=until, log=log)
        if d.master and stats["dit"]["step"] >= tc.steps:
            bundle(bundle_path or out / "model.pt", vae, speech_ae, ema, tc)
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
