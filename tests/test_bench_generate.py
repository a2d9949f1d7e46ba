"""Generation and long-video benchmarks: run both on a micro bundle and check their JSON."""

import json

import numpy as np
import pytest
import torch

from minread import ans, dit, speech_ae, train, vae
from minread import generate as gen
from minread.bench import generate as bench_gen
from minread.bench import long as bench_long


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """Untrained micro models packed as a generation bundle (the benches load a path)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundle") / "model.pt"
    tc = train.TrainConfig(n=2, W=2, M=2, S=4)
    train.bundle(path, vae.VAE(vae.VAEConfig(widths=(8, 8, 8))).eval(),
                 speech_ae.SpeechAE(speech_ae.SpeechAEConfig(width=8, max_width=16, latent_dim=8)).eval(),
                 dit.A2VDiT(dit.DiTConfig(audio_dim=8, width=32, depth=1, heads=2)).eval(), tc)
    return path


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_generate_bench(bundle, capsys):
    bench_gen.main(["--ckpt", str(bundle), "--identities", "2", "--sentences", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| schedule |" in out and "| asynchronous |" in out
    fig = last_json(out)
    rows = fig["schedules"]
    assert set(rows) == {"synchronous", "synchronous_overlap", "asynchronous"}
    assert len(fig["inputs"]) == 2 and fig["memory_method"]
    for name, r in rows.items():
        assert r["calls"] == r["expected_calls"] > 0                   # counted calls match count_calls
        assert r["seconds"] == rows["synchronous_overlap"]["seconds"] > 1.5
        assert r["rtf"] > 0 and r["wall_per_s"] > 0 and r["peak_mem_mb"] >= 0
        assert -1 <= r["lip_corr"] <= 1 and r["identity_error"] >= 0 and r["seam_ratio"] > 0
        assert abs(r["av_offset"]) <= 8
    a, o, s = rows["asynchronous"], rows["synchronous_overlap"], rows["synchronous"]
    assert o["calls_vs_overlap"] == 1.0
    assert a["calls_vs_overlap_long_run"] == pytest.approx(0.5)       # 1/W exactly, from the matrices
    # an input of k latent clips costs k*S calls clip by clip, (k-1)*S/W + S asynchronously (S=4, W=2)
    k = (s["calls"] // 4) / len(fig["inputs"])
    assert a["calls"] == len(fig["inputs"]) * ((k - 1) * 2 + 4) and s["calls"] == o["calls"]
    assert 0.5 < a["calls_vs_overlap"] < 0.6                           # warm-up + tail paid once per clip
    true, rec = fig["ceilings"]["true frames"], fig["ceilings"]["VAE reconstruction"]
    assert true["lip_corr"] > 0.9 and true["av_offset"] == 0 and true["identity_error"] < 0.2   # the truth scores as truth
    assert -1 <= rec["lip_corr"] <= 1 and "closure F1" in out


def test_async_calls_against_overlap_from_count_calls():
    """W = 2 clips in flight: half the overlap baseline's calls per extra second of video."""
    n, W, S = 2, 2, 8
    for F in (13, 101, 377):
        extra_async = ans.count_calls(ans.asynchronous(2 * F, n, W, S)) - ans.count_calls(ans.asynchronous(F, n, W, S))
        extra_ovl = (ans.count_calls(ans.synchronous_overlap(2 * F, n, W, S))
                     - ans.count_calls(ans.synchronous_overlap(F, n, W, S)))
        assert extra_async / extra_ovl <= 0.5


def test_long_bench(bundle, capsys, tmp_path):
    curves, plot, video = tmp_path / "c.json", tmp_path / "c.png", tmp_path / "v"
    bench_long.main(["--ckpt", str(bundle), "--seconds", "3", "--window", "1", "--identities", "1",
                     "--threads", "1", "--curves", str(curves), "--plot", str(plot), "--video", str(video)])
    out = capsys.readouterr().out
    fig = last_json(out)
    assert fig["seconds"] == 3 and fig["window_s"] == 1
    for name, r in fig["schedules"].items():
        assert len(r["curve"]) == 3                                     # three 1 s windows
        assert [w["start_s"] for w in r["curve"]] == [0, 1, 2]
        assert set(r["drift"]) >= {"lip_corr", "identity_error", "seam_ratio"}
        assert r["drift"]["lip_corr"] == pytest.approx(r["curve"][-1]["lip_corr"] - r["curve"][0]["lip_corr"])
        assert r["peak_mem_mb_window"] >= 0 and r["peak_mem_mb_long"] >= 0 and r["rtf"] > 0
        assert r["calls"] == r["expected_calls"]
    assert fig["schedules"]["asynchronous"]["calls_vs_overlap"] < 1
    saved = json.loads(curves.read_text())
    assert set(saved["curves"]) == set(fig["schedules"]) and plot.stat().st_size > 1000
    from minread.data import read_video
    assert read_video(video / "long_id20_asynchronous.mp4").shape[0] == 75
    assert not list(video.glob(".short*"))                              # the 1 s run's file is gone


def test_long_input_concatenates_truth_with_audio():
    clips = [{"identity": i // 2, "name": f"c{i}", "audio": torch.full((640 * 30,), float(i)),
              "opening": torch.full((30,), float(i)), "closed": torch.zeros(30, dtype=torch.bool),
              "viseme": torch.zeros(30, dtype=torch.long), "video": torch.zeros(3, 30, 4, 4)} for i in range(4)]
    wave, truth, ref, names = bench_long.long_input(clips, 1, 4.0)
    assert len(wave) == 100 * 640 and len(truth["opening"]) == 100
    assert names[:2] == ["c2", "c3"]                                    # the identity's own sentences first
    # audio sample t*640 and opening frame t come from the same clip
    assert np.array_equal(wave[::640], truth["opening"].numpy())


def test_clip_starts_follow_latent_clips():
    # s_t = 4, n = 2: latent 0 = frame 0, latent 1 = frames 1-4, latent 2 (clip 1) starts at frame 5
    assert bench_gen.clip_starts(30, 2, 4) == [5, 13, 21, 29]
    assert bench_gen.clip_starts(5, 2, 4) == []


def test_bad_inputs_get_clear_errors(bundle, tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt"):
        bench_gen.main(["--ckpt", str(tmp_path / "missing.pt")])
    with pytest.raises(ValueError, match="--identities"):
        bench_gen.main(["--ckpt", str(bundle), "--identities", "99"])
    with pytest.raises(ValueError, match="--window"):
        bench_long.main(["--ckpt", str(bundle), "--seconds", "2", "--window", "5"])


def test_peak_memory_sees_an_allocation():
    with bench_gen.PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4)                                 # 64 MB, touched
        x += 1
        del x
    assert mem.mb > 32, mem.method
