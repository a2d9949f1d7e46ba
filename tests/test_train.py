"""Training: checkpoints, config checks, LR schedule, EMA, exact resume, DDP."""

import math
from dataclasses import asdict

import pytest
import torch

from minread import train as tr


def test_checkpoint_is_atomic_and_loads_weights_only(tmp_path):
    path = tmp_path / "ck" / "a.pt"
    obj = {"model": {"w": torch.arange(3.0)}, "config": {"width": 8, "widths": (8, 16)},
           "rng": tr.rng_state(torch.Generator().manual_seed(1)), "step": 7}
    tr.save_checkpoint(path, obj)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.pt"]      # no temp left behind
    back = tr.load_checkpoint(path)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], obj["model"]["w"])


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        tr.load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable minread checkpoint"):
        tr.load_checkpoint(bad)


def test_weights_only_refuses_code(tmp_path):
    """A checkpoint holding an arbitrary object is refused, never unpickled into code."""
    path = tmp_path / "evil.pt"
    torch.save({"obj": tr.Dist()}, path)
    with pytest.raises(ValueError, match="not a readable"):
        tr.load_checkpoint(path)


def test_config_mismatch_names_the_settings():
    saved, current = {"width": 128, "depth": 6, "heads": 4}, {"width": 192, "depth": 6, "heads": 6}
    with pytest.raises(ValueError) as e:
        tr.check_config(saved, current, "A2V-DiT", "x.pt")
    msg = str(e.value)
    assert "width: 128 (checkpoint) vs 192" in msg and "heads: 4 (checkpoint) vs 6" in msg
    assert "depth" not in msg
    tr.check_config({"betas": (0.9, 0.99)}, {"betas": [0.9, 0.99]}, "training", "x.pt")  # tuple == list


def test_lr_schedule_warmup_then_cosine():
    tc = tr.TrainConfig(steps=1000, warmup=100, lr=1e-3, min_lr=1e-4)
    lrs = [tr.get_lr(s, tc) for s in range(1000)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[99] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:100], lrs[1:100]))               # warm-up rises
    assert all(a >= b for a, b in zip(lrs[100:], lrs[101:]))                # cosine falls
    assert lrs[550] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert tr.get_lr(1000, tc) == pytest.approx(1e-4)


def test_ema_update():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    tr.update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * model.weight)
    tr.update_ema(ema, model, 0.0)
    assert torch.equal(ema.weight, model.weight)


def test_optimizer_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = tr.make_optimizer(model, tr.TrainConfig(weight_decay=0.1))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decay == {id(model[0].weight)}


def test_presets_and_unknown_names():
    with pytest.raises(ValueError, match="unknown preset"):
        tr.presets("huge")
    with pytest.raises(ValueError, match="unknown stage"):
        tr.train("everything")


def test_motion_map_finds_the_moving_cell():
    torch.manual_seed(0)
    z = torch.randn(4, 1, 3, 3).expand(4, 6, 3, 3).clone()     # (C, F, h, w), still in time
    z[:, :, 2, 1] += torch.randn(4, 6)                           # one cell moves
    m = tr.motion_map(z)
    assert m.shape == (3, 3) and abs(float(m.mean()) - 1) < 1e-5
    assert int(m.argmax()) == 2 * 3 + 1 and float(m.flatten().sort().values[-2]) < 1e-4


def test_dit_loss_weight_counts_cells():
    from minread.dit import A2VDiT, DiTConfig, dit_loss
    torch.manual_seed(0)
    model = A2VDiT(DiTConfig(latent_channels=4, audio_dim=8, width=32, depth=1, heads=2))
    B, F = 2, 3
    batch = {"latents": torch.randn(B, 4, F, 2, 2), "audio": torch.randn(B, F, 8),
             "reference": torch.randn(B, 4, 1, 2, 2), "n_anchors": 1, "noise": torch.randn(B, 4, F, 2, 2)}
    levels = torch.rand(B, F)
    plain = dit_loss(model, batch, levels)
    assert torch.allclose(dit_loss(model, {**batch, "weight": torch.ones(B, 1, 1, 2, 2)}, levels), plain)
    w = torch.zeros(B, 1, 1, 2, 2)
    w[:, :, :, 0, 0] = 4.0                                       # only cell (0, 0) counts
    with torch.no_grad():
        pred = model(batch["noise"] * levels.view(B, 1, F, 1, 1) + batch["latents"] * (1 - levels.view(B, 1, F, 1, 1)),
                     levels, batch["audio"], batch["reference"])
    manual = ((pred - batch["latents"])[:, :, 1:, 0, 0].pow(2)).mean()   # x0 target, anchors skipped
    assert torch.allclose(dit_loss(model, {**batch, "weight": w}, levels), manual, atol=1e-6)


# ----------------------------------------------------------------------------- end to end

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from minread import data, dit, speech_ae, vae
from minread import generate as gen

ROOT = Path(__file__).resolve().parents[1]


def micro(data_root, **kw):
    """Micro configs: the whole pipeline in seconds."""
    return dict(vae_cfg=vae.VAEConfig(widths=(8, 8, 8)),
                speech_cfg=speech_ae.SpeechAEConfig(width=8, max_width=16, latent_dim=8, batch_size=4,
                                                    train_frames=17, eval_every=5),
                dit_cfg=dit.DiTConfig(audio_dim=8, width=32, depth=1, heads=2),
                tc=tr.TrainConfig(data_root=str(data_root), steps=6, batch_size=4, warmup=2, eval_every=3,
                                  eval_clips=1, eval_frames=17, ckpt_every=2, vae_steps=4, speech_steps=4, **kw))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny rendered toy set (3 train + 2 held-out identities) and trained micro encoders."""
    root = tmp_path_factory.mktemp("toy")
    data.render_dataset(root / "data", train_identities=3, test_identities=2, clips_per_identity=2,
                        size=32, seed=0, source="babble", progress=False)
    tr.train("vae", out_dir=root / "enc", **micro(root / "data"))
    tr.train("speech_ae", out_dir=root / "enc", **micro(root / "data"))
    return root


def encoders_into(toy, out):
    shutil.copytree(toy / "enc" / "vae", out / "vae")
    shutil.copy(toy / "enc" / "speech_ae.pt", out / "speech_ae.pt")


def test_train_all_then_generate(tmp_path):
    """The smoke run: all three stages on micro configs, then generation from the bundle."""
    data.render_dataset(tmp_path / "data", train_identities=2, test_identities=1, clips_per_identity=2,
                        size=32, seed=1, source="babble", progress=False)
    stats = tr.train("all", out_dir=tmp_path / "run", **micro(tmp_path / "data"))
    assert stats["vae"]["step"] == 4 and stats["speech_ae"]["step"] == 4 and stats["dit"]["step"] == 6
    assert any("lip_corr" in h for h in stats["dit"]["history"])            # held-out evaluation ran
    bundle = tmp_path / "run" / "model.pt"
    models = gen.load_models(bundle)
    ds = data.ToyClipDataset(tmp_path / "data", "test", size=32, frames=1)
    gen.write_png(tmp_path / "face.png", gen.to_uint8(ds.clips[0]["video"][:, :1])[0])
    wav = tmp_path / "data" / f"{ds.clips[0]['name']}.wav"
    out = gen.generate(tmp_path / "face.png", wav, tmp_path / "talk.mp4", models=models, verbose=False)
    assert out["frames"] == ds.clips[0]["video"].shape[1] == data.read_video(tmp_path / "talk.mp4").shape[0]
    assert "dit step 6" in (tmp_path / "run" / "train.log").read_text()


def test_resume_after_interruption_is_exact(toy, tmp_path):
    """Killed at step 3 (last checkpoint at 2), resumed: the same weights as running straight through."""
    a, b = tmp_path / "straight", tmp_path / "interrupted"
    for out in (a, b):
        encoders_into(toy, out)
    tr.train("dit", out_dir=a, **micro(toy / "data"))
    tr.train("dit", out_dir=b, until=3, **micro(toy / "data"))
    assert tr.load_checkpoint(b / "dit.pt")["step"] == 2 and not (b / "model.pt").exists()
    tr.train("dit", out_dir=b, **micro(toy / "data"))
    ca, cb = tr.load_checkpoint(a / "dit.pt"), tr.load_checkpoint(b / "dit.pt")
    assert ca["step"] == cb["step"] == 6
    for key in ("model", "ema"):
        for name, value in ca[key].items():
            assert torch.equal(value, cb[key][name]), (key, name)
    assert ca["optimizer"]["state"][0]["exp_avg"].equal(cb["optimizer"]["state"][0]["exp_avg"])
    ba, bb = tr.load_checkpoint(a / "model.pt"), tr.load_checkpoint(b / "model.pt")
    assert all(torch.equal(v, bb["dit"]["state"][k]) for k, v in ba["dit"]["state"].items())


def test_extra_clips_join_the_latent_cache(toy, tmp_path):
    """extra_clips renders new faces and voices into the DiT's training set; changing it re-encodes."""
    pytest.importorskip("parselmouth", reason="needs praat-parselmouth (the speech extra)")
    kw = micro(toy / "data")
    v = vae.load_vae(toy / "enc" / "vae" / "ckpt.pt", kw["vae_cfg"])
    s = speech_ae.load_speech_ae(toy / "enc" / "speech_ae.pt", kw["speech_cfg"])
    d = tr.setup_distributed()
    plain = tr.load_cache(v, s, tr.replace(kw["tc"], out_dir=str(tmp_path)), d)
    extra = tr.load_cache(v, s, tr.replace(kw["tc"], out_dir=str(tmp_path), extra_clips=3), d)
    assert len(extra["latents"]) == len(plain["latents"]) + 3
    new = extra["identity"][len(plain["latents"]):]
    assert min(new) >= data.EXTRA_FIRST and len(set(new)) == 1              # one new face, 3 clips
    assert all(len(extra["others"][i]) == 2 for i in range(len(plain["latents"]), len(extra["latents"])))


def test_resume_refuses_another_config(toy, tmp_path):
    encoders_into(toy, tmp_path)
    tr.train("dit", out_dir=tmp_path, until=2, **micro(toy / "data"))
    kw = micro(toy / "data")
    kw["dit_cfg"] = dit.DiTConfig(audio_dim=8, width=48, depth=1, heads=2)
    with pytest.raises(ValueError, match=r"width: 32 \(checkpoint\) vs 48"):
        tr.train("dit", out_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match=r"lr: 0.0005 \(checkpoint\) vs 0.001"):
        tr.train("dit", out_dir=tmp_path, **micro(toy / "data", lr=1e-3))


DDP_SCRIPT = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_train import micro, tr
from minread import dit as D, vae, speech_ae
kw = micro({data!r})
encoders = vae.load_vae({out!r} + "/vae/ckpt.pt"), speech_ae.load_speech_ae({out!r} + "/speech_ae.pt")
model, ema, stats = tr.train_dit(kw["dit_cfg"], tr.replace(kw["tc"], out_dir={out!r}), *encoders)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
# gradients: DDP's averaged gradient equals the mean of the per-rank gradients
from torch.nn.parallel import DistributedDataParallel as DDP
model = D.A2VDiT(kw["dit_cfg"])  # a fresh module: the trained one still carries train_dit's DDP hooks
ddp = DDP(model)
ddp.prediction = model.prediction
gen = torch.Generator().manual_seed(100 + dist.get_rank())
batch = {{"latents": torch.randn(2, 16, 6, 4, 4, generator=gen), "audio": torch.randn(2, 6, 8, generator=gen),
          "reference": torch.randn(2, 16, 1, 4, 4, generator=gen), "n_anchors": 2,
          "drop_audio": torch.tensor([True, False]), "drop_ref": torch.tensor([False, True]),
          "noise": torch.randn(2, 16, 6, 4, 4, generator=gen)}}
levels = torch.rand(2, 6, generator=gen)
with ddp.no_sync():
    D.dit_loss(ddp, batch, levels).backward()
local = torch.cat([p.grad.flatten() for p in model.parameters()])
model.zero_grad()
D.dit_loss(ddp, batch, levels).backward()
synced = torch.cat([p.grad.flatten() for p in model.parameters()])
every = [torch.zeros_like(flat) for _ in range(2)]
dist.all_gather(every, flat)
grads = [torch.zeros_like(local) for _ in range(2)]
dist.all_gather(grads, local)
res = {{"same_weights": bool(torch.equal(every[0], every[1])),
        "grad_is_mean": bool(torch.allclose(synced, (grads[0] + grads[1]) / 2, atol=1e-6)),
        "local_grads_differ": not torch.allclose(grads[0], grads[1]),
        "steps": stats["step"]}}
json.dump(res, open({out!r} + f"/rank{{dist.get_rank()}}.json", "w"))
dist.barrier()
dist.destroy_process_group()  # before exit: gloo threads left running can abort the process
"""


def test_two_process_torchrun_keeps_gradients_in_sync(toy, tmp_path):
    encoders_into(toy, tmp_path)
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), data=str(toy / "data"),
                                        out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res == {"same_weights": True, "grad_is_mean": True, "local_grads_differ": True, "steps": 6}
    ck = tr.load_checkpoint(tmp_path / "dit.pt")
    assert ck["train"]["world_size"] == 2 and len(ck["rng"]) == 2
    assert ck["windows_seen"] == 6 * 4 * 2


def test_dit_stage_needs_the_encoders(tmp_path):
    with pytest.raises(FileNotFoundError, match="--stage vae"):
        tr.train("dit", out_dir=tmp_path, **micro(tmp_path))


def test_vae_budget_and_steps_reach_train_vae(monkeypatch, tmp_path):
    """TrainConfig.vae_steps / vae_minutes go to train_vae; None leaves vae.py's recipe."""
    seen = []
    monkeypatch.setattr(vae, "train_vae", lambda cfg, **kw: seen.append(kw) or {"step": 0})
    kw = micro(tmp_path / "data")
    tr.train("vae", out_dir=tmp_path, **kw)
    tr.train("vae", out_dir=tmp_path, **{**kw, "tc": tr.replace(kw["tc"], vae_steps=None, vae_minutes=0.0)})
    assert seen[0]["steps"] == 4 and "minutes" not in seen[0]
    assert seen[1]["minutes"] == 0.0 and "steps" not in seen[1]
