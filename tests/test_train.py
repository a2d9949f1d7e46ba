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
