import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from minread import data, metrics

ROOT = Path(__file__).resolve().parents[1]
DATA_TOY = ROOT / "data_toy"

try:
    import parselmouth  # noqa: F401
    HAVE_ESPEAK = True
except ImportError:
    HAVE_ESPEAK = False
espeak = pytest.mark.skipif(not HAVE_ESPEAK, reason="needs praat-parselmouth (the speech extra)")


def test_mouth_tracks_bridge_short_word_gaps_but_close_on_pauses():
    phones = [("a", 0.2, 0.4), ("", 0.4, 0.41), ("a", 0.41, 0.6), ("", 0.6, 0.9), ("a", 0.9, 1.1)]
    tr = data.mouth_tracks(phones, 30)
    t = lambda s: int(s * data.FPS)                                        # noqa: E731
    assert tr["opening"][t(0.405)] > 0.7                                  # 10 ms gap: stays open
    assert tr["opening"][t(0.75)] < 0.05 and tr["viseme"][t(0.75)] == 0   # 300 ms pause: closed
    assert tr["viseme"][t(0.3)] == data.VISEMES.index(("a", 1.0, 0.15))


def test_bilabials_close_the_lips():
    tr = data.mouth_tracks([("a", 0.1, 0.3), ("m", 0.3, 0.42), ("a", 0.42, 0.62)], 20)
    assert tr["closed"].any()
    assert tr["opening"][tr["closed"]].max() < 0.05 < 0.5 < tr["opening"][~tr["closed"] & (tr["viseme"] > 0)].max()


@pytest.mark.parametrize("source", ["babble", pytest.param("espeak", marks=espeak)])
def test_audio_is_exactly_640_samples_per_frame(source):
    clip = data.render_clip(7, data.SENTENCES[3], size=32, seed=4, source=source)
    T = len(clip["video"])
    assert clip["video"].shape == (T, 32, 32, 3) and clip["video"].dtype == np.uint8
    assert clip["audio"].shape == (T * 640,) and clip["audio"].dtype == np.float32
    for k in ("opening", "spread", "viseme", "closed", "blink"):
        assert clip[k].shape == (T,)
    assert clip["head"].shape == (T, 2)
    assert np.abs(clip["audio"]).max() > 0.1


def test_identities_differ_and_avoid_the_mouth_colour():
    ids = [data.sample_identity(s) for s in range(50)]
    assert len({i.skin for i in ids}) == 50
    for i in ids:
        for c in (i.skin, i.hair, i.background, i.clothes, i.lips, i.iris):
            assert data._green(c) < metrics.GREEN_FLOOR


@pytest.mark.parametrize("size,floor", [(64, 0.95), (32, 0.90)])
@pytest.mark.parametrize("source", ["babble", pytest.param("espeak", marks=espeak)])
def test_read_back_through_mp4(tmp_path, size, floor, source):
    clip = data.render_clip(11, data.SENTENCES[5], size=64, seed=2, source=source)
    data.write_clip(tmp_path / "c", clip)
    video = data.to_tensor(data.read_video(tmp_path / "c.mp4"), size)   # (3, T, H, W)
    read = metrics.read_opening(video, video[:, 0])
    assert metrics.lip_corr(read, torch.from_numpy(clip["opening"])) >= floor


def test_same_seeds_same_bytes(tmp_path):
    kw = dict(train_identities=2, test_identities=1, clips_per_identity=2, size=32, seed=3,
              source="babble", progress=False)
    data.render_dataset(tmp_path / "a", **kw)
    data.render_dataset(tmp_path / "b", **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 1 + 3 * 6
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_data_toy_manifest_and_split():
    m = json.loads((DATA_TOY / "manifest.json").read_text())
    ids = {s: {i["id"] for i in m["identities"] if i["split"] == s} for s in ("train", "test")}
    assert len(ids["train"]) >= 16 and len(ids["test"]) >= 4 and not ids["train"] & ids["test"]
    sent = {s: {c["sentence"] for c in m["clips"] if c["split"] == s} for s in ("train", "test")}
    assert not sent["train"] & sent["test"]
    size = sum(p.stat().st_size for p in DATA_TOY.rglob("*") if p.is_file())
    assert size <= 25 * 2 ** 20


@espeak
@pytest.mark.parametrize("which", [0, -1])
def test_data_toy_clips_rebuild_bit_identically(tmp_path, which):
    """Re-render one committed clip (a train and a held-out one) from the manifest's seeds."""
    m = json.loads((DATA_TOY / "manifest.json").read_text())
    c = m["clips"][which]
    ident = data.Identity(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in m["identities"][c["identity"]]["params"].items()})
    assert ident == data.sample_identity(ident.seed)
    clip = data.render_clip(ident, c["text"], size=m["size"], seed=c["seed"], source=m["source"])
    data.write_clip(tmp_path / "c", clip, crf=m["crf"])
    for ext in (".mp4", ".wav", ".npz"):
        assert (tmp_path / f"c{ext}").read_bytes() == (DATA_TOY / f"{c['name']}{ext}").read_bytes(), ext


def test_toy_dataset_items():
    ds = data.ToyClipDataset(DATA_TOY, "test", size=32, frames=9)
    item = ds[3]
    assert item["video"].shape == (3, 9, 32, 32) and item["reference"].shape == (3, 32, 32)
    assert item["audio"].shape == (9 * 640,)
    assert item["video"].min() >= -1 and item["video"].max() <= 1
    assert item["viseme"].dtype == torch.int64 and item["closed"].dtype == torch.bool
    assert item["head"].shape == (9, 2)
    again = ds[3]
    assert torch.equal(item["video"], again["video"]) and torch.equal(item["reference"], again["reference"])
    ds.set_epoch(1)
    starts = {tuple(ds[i]["opening"].tolist()) for i in range(len(ds))}
    assert len(starts) > len(ds) // 2
    # the reference comes from another clip of the same identity: no frame of the window equals it
    same = [(ds[i]["video"] - ds[i]["reference"][:, None]).abs().amax(dim=(0, 2, 3)).min() for i in range(8)]
    assert min(same) > 0


def test_toy_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="render-data"):
        data.ToyClipDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        data.ToyClipDataset(DATA_TOY, "val")
    with pytest.raises(ValueError, match="no clip has"):
        data.ToyClipDataset(DATA_TOY, "test", frames=10_000)


def _write_real_clip(folder, name, frames, audio):
    with data.VideoWriter(folder / f"{name}.mp4", fps=30) as w:                 # not 25 fps
        w.write(frames)
    data.write_wav(folder / f"{name}.wav", audio)


def test_real_folder_round_trip(tmp_path):
    clip = data.render_clip(5, None, size=64, seed=1, source="babble")
    T = len(clip["video"])
    t25, t30 = np.arange(T) / 25, np.arange(T * 30 // 25) / 30                     # re-rendered at 30 fps
    at30 = lambda x: np.interp(t30, t25, x).astype(np.float32)                      # noqa: E731
    head = np.stack([at30(clip["head"][:, 0]), at30(clip["head"][:, 1])], 1)
    frames = data.render_frames(data.sample_identity(5), at30(clip["opening"]), at30(clip["spread"]),
                                at30(clip["blink"]), head, 64)
    (tmp_path / "alice").mkdir()
    for k in range(2):
        _write_real_clip(tmp_path / "alice", f"take{k}", frames, clip["audio"])
    ds = data.VideoFolderDataset(tmp_path, size=32, frames=9)      # yuv420p 64 px -> 32 px
    item = ds[0]
    assert item["video"].shape == (3, 9, 32, 32) and item["audio"].shape == (9 * 640,)
    assert torch.isnan(item["opening"]).all() and item["identity"] == 0
    whole = data.VideoFolderDataset(tmp_path, size=64, frames=T - 2).clips[0]
    assert abs(whole["video"].shape[1] - T) <= 1                            # resampled to 25 fps
    read = metrics.read_opening(whole["video"])
    n = min(len(read), T)
    assert metrics.lip_corr(read[:n], torch.from_numpy(clip["opening"][:n])) > 0.9
    assert np.allclose(whole["audio"].numpy()[:1000], clip["audio"][:1000], atol=1e-3)


def test_real_folder_without_wav_uses_the_mp4_sound(tmp_path):
    clip = data.render_clip(6, None, size=32, seed=2, source="babble")
    with data.VideoWriter(tmp_path / "bob.mp4", audio=clip["audio"]) as w:
        w.write(clip["video"])
    (tmp_path / "carol.mp4").write_bytes(b"\x00" * 100)                       # corrupt
    with pytest.raises(ValueError, match="carol.mp4"):
        data.VideoFolderDataset(tmp_path, size=32, frames=9)
    (tmp_path / "carol.mp4").unlink()
    c = data.VideoFolderDataset(tmp_path, size=32, frames=9).clips[0]
    T = len(clip["video"])
    assert c["video"].shape[1] == T and c["audio"].shape == (T * 640,)
    assert np.corrcoef(c["audio"].numpy(), clip["audio"])[0, 1] > 0.9          # AAC round trip


def test_stereo_44k_wav_is_resampled(tmp_path):
    t = np.arange(44100) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    pcm = (np.stack([tone, tone], 1) * 32767).astype("<i2")
    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2); w.setsampwidth(2); w.setframerate(44100); w.writeframes(pcm.tobytes())
    audio = data.load_audio(tmp_path / "s.wav")
    assert audio.dtype == np.float32 and abs(len(audio) - 16000) <= 32
    spec = np.abs(np.fft.rfft(audio[:16000]))
    assert abs(np.argmax(spec) * 16000 / len(audio[:16000]) - 440) < 3


def test_bad_files_give_clear_errors(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.wav").write_bytes(b"this is not a wav file at all" * 10)
    with pytest.raises(ValueError, match="empty.mp4 is empty"):
        data.read_video(tmp_path / "empty.mp4")
    with pytest.raises(ValueError, match="junk.wav"):
        data.load_audio(tmp_path / "junk.wav")
    with pytest.raises(FileNotFoundError, match="nothere.wav"):
        data.load_audio(tmp_path / "nothere.wav")
    with pytest.raises(ValueError, match="empty.mp4"):
        data.VideoFolderDataset(tmp_path)


def test_video_writer_leaves_nothing_half_written(tmp_path):
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    with pytest.raises(RuntimeError):
        with data.VideoWriter(tmp_path / "x.mp4") as w:
            w.write(frames)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="uint8"):
        with data.VideoWriter(tmp_path / "y.mp4") as w:
            w.write(frames.astype(np.float32))


def test_video_writer_muxes_audio(tmp_path):
    clip = data.render_clip(2, None, size=32, seed=0, source="babble")
    with data.VideoWriter(tmp_path / "a.mp4", audio=clip["audio"]) as w:
        w.write(clip["video"][:10]); w.write(clip["video"][10:])
    assert data.read_video(tmp_path / "a.mp4").shape == clip["video"].shape
    audio = data.load_audio(tmp_path / "a.mp4")
    assert abs(len(audio) - len(clip["audio"])) < 2048


def test_frames_only_babble_renders_the_same_frames():
    full = data.render_clip(4, None, size=32, seed=7, source="babble")
    quick = data.render_clip(4, None, size=32, seed=7, source="babble", audio=False)
    assert quick["audio"] is None and full["audio"].std() > 0.01
    assert np.array_equal(quick["video"], full["video"])
    for k in ("opening", "spread", "blink", "head"):
        assert np.array_equal(quick[k], full[k]), k
    assert quick["phones"] == full["phones"]


def test_load_image_crops_and_resizes(tmp_path):
    frame = data.render_clip(3, None, size=64, seed=0, source="babble")["video"][:1]
    wide = np.concatenate([np.zeros((1, 64, 16, 3), np.uint8), frame, np.zeros((1, 64, 16, 3), np.uint8)], 2)
    with data.VideoWriter(tmp_path / "w.mp4", pix_fmt="yuv444p") as w:
        w.write(wide)
    img = data.load_image(tmp_path / "w.mp4", 32)
    assert img.shape == (3, 32, 32)
    assert (img - data.to_tensor(frame, 32)[:, 0]).abs().mean() < 0.05     # the black bars are gone


@espeak
@pytest.mark.slow
def test_data_toy_rebuilds_bit_identically_from_its_command(tmp_path):
    """The manifest's command, run again, gives the same bytes for every file (~1 min)."""
    import subprocess
    import sys
    m = json.loads((DATA_TOY / "manifest.json").read_text())
    args = m["command"].split()[3:]                                      # after `python -m minread`
    out = args.index("--out") + 1
    args[out] = str(tmp_path / "data_toy")
    subprocess.run([sys.executable, "-m", "minread", *args], check=True, cwd=ROOT, capture_output=True)
    for p in DATA_TOY.rglob("*"):
        if p.is_file() and p.name != "manifest.json":
            assert (tmp_path / "data_toy" / p.relative_to(DATA_TOY)).read_bytes() == p.read_bytes(), p
    rebuilt = json.loads((tmp_path / "data_toy" / "manifest.json").read_text())
    assert {k: v for k, v in rebuilt.items() if k != "command"} == {k: v for k, v in m.items() if k != "command"}


@espeak
def test_extra_training_clips_keep_held_out_sentences_and_faces_unseen():
    clips = data.render_training_clips(2, clips_per_identity=3, out_size=32, seed=0, salad=0.5)
    again = data.render_training_clips(2, clips_per_identity=3, out_size=32, seed=0, salad=0.5)
    assert len(clips) == 6 and all(torch.equal(a["video"], b["video"]) for a, b in zip(clips, again))
    train, test = data._split_sentences(0, 0.25)
    known = set(data.train_words(0))
    test_only = {w.strip(".,'").lower() for s in test for w in data.SENTENCES[s].split()} - known
    assert test_only                                    # some words are only in held-out sentences
    for c in clips:
        words = {w.strip(".,'").lower() for w in c["text"].split()}
        assert words <= known and c["text"] not in [data.SENTENCES[s] for s in test]
        assert c["identity"] >= data.EXTRA_FIRST and c["video"].shape[1:] == (len(c["opening"]), 32, 32)
        assert len(c["audio"]) == 640 * len(c["opening"]) and c["closed"].dtype == torch.bool
    assert len({c["identity"] for c in clips}) == 2     # 3 clips per new face: references from other clips
    speech_only = data.render_training_clips(2, clips_per_identity=3, out_size=32, seed=0, salad=0.5, frames=False)
    for c, s in zip(clips, speech_only):                # the same speech and truth, no frames
        assert s["video"] is None and s["text"] == c["text"] and torch.equal(s["audio"], c["audio"])
        assert torch.equal(s["opening"], c["opening"]) and torch.equal(s["closed"], c["closed"])
