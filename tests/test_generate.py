"""Generation: exact frame counts, streaming files, filmstrip, clear errors, no partial output."""

import numpy as np
import pytest
import torch

from minread import data, dit, speech_ae, vae
from minread import generate as gen


@pytest.fixture(scope="module")
def models():
    """Untrained micro models: the pipeline's shapes and files do not need trained weights."""
    torch.manual_seed(0)
    return gen.Models(vae.VAE(vae.VAEConfig(widths=(8, 8, 8))).eval(),
                      speech_ae.SpeechAE(speech_ae.SpeechAEConfig(width=8, max_width=16, latent_dim=8)).eval(),
                      dit.A2VDiT(dit.DiTConfig(audio_dim=8, width=32, depth=1, heads=2)).eval(),
                      {"n": 2, "W": 2, "M": 2, "S": 4, "cfg": 1.0})


@pytest.fixture(scope="module")
def face(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "face.png"
    rgb = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)  # not square: cropped
    gen.write_png(path, rgb)
    return path


def speech(path, seconds, rate=16000, channels=1):
    """Noise bursts standing in for speech, written as 16-bit WAV (any rate, any channels)."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    wave = 0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 3 * t) > -0.5)
    import wave as wav
    pcm = (np.repeat(wave[:, None], channels, 1) * 32767).astype("<i2")
    with wav.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def test_frame_count_rule():
    assert [gen.output_frames(int(s * 16000)) for s in (0.2, 3.7, 30.0)] == [5, 93, 750]
    assert gen.output_frames(1) == 1 and gen.output_frames(319) == 1 and gen.output_frames(960) == 2
    assert [gen.model_frames(t, 4) for t in (1, 2, 5, 6, 93)] == [1, 5, 5, 9, 93]


@pytest.mark.parametrize("seconds", [0.2, 3.7, 30.0])
def test_generation_gives_exact_frames(models, face, tmp_path, seconds):
    audio = speech(tmp_path / "a.wav", seconds)
    out = tmp_path / "out" / "talk.mp4"
    stats = gen.generate(face, audio, out, models=models, verbose=False)
    expected = int(np.floor(seconds * 25 + 0.5))
    assert stats["frames"] == expected
    assert data.read_video(out).shape == (expected, 32, 32, 3)
    assert len(data.load_audio(out)) >= int(seconds * 16000) - 1024     # speech muxed in
    strip = data.read_video(out.with_suffix(".png"))
    assert strip.shape[1] >= 96 and strip.shape[2] == strip.shape[1] * min(8, expected)
    assert sorted(p.name for p in out.parent.iterdir()) == ["talk.mp4", "talk.png"]
    assert stats["rtf"] > 0 and stats["model_calls"] > 0


def test_stereo_44k_is_resampled(models, face, tmp_path):
    audio = speech(tmp_path / "a.wav", 1.0, rate=44100, channels=2)
    assert gen.generate(face, audio, tmp_path / "o.mp4", models=models, verbose=False)["frames"] == 25


def test_schedules_give_the_same_frame_count(models, face, tmp_path):
    audio = speech(tmp_path / "a.wav", 1.3)
    calls = {}
    for schedule in gen.SCHEDULES:
        stats = gen.generate(face, audio, tmp_path / f"{schedule}.mp4", schedule=schedule, models=models,
                             verbose=False)
        assert stats["frames"] == 33
        calls[schedule] = stats["model_calls"]
    assert calls["asynchronous"] < calls["synchronous_overlap"]


def test_streaming_equals_whole_clip(models):
    """Chunks decoded with the carried cache equal decoding all latents at once."""
    from minread import ans
    torch.manual_seed(1)
    ref, wave = torch.rand(3, 32, 32) * 2 - 1, np.random.default_rng(1).standard_normal(57 * 640) * 0.1
    streamed = torch.cat(list(gen.stream_frames(models, ref, wave)), dim=1)   # (3, 57, H, W)
    audio = torch.from_numpy(gen.fit_audio(wave.astype(np.float32), 57))[None]
    speech_lat = models.speech_ae.speech_latents(audio)
    ref_lat = models.vae.encode_latents(ref[None, :, None])
    levels = gen.make_schedule("asynchronous", speech_lat.shape[1], models.sampler)
    z = torch.cat([c for _, c in ans.generate_latents(models.dit, speech_lat, ref_lat, levels,
                                                     n_anchors=2, progress=False)], dim=2)
    whole = models.vae.decode_latents(z).clamp(-1, 1)[0]
    assert streamed.shape == whole.shape == (3, 57, 32, 32)
    assert torch.allclose(streamed, whole, atol=1e-5)


def test_overlapped_sampling_gives_the_same_frames(models):
    """Sampling in a worker thread, one clip ahead of the decoder, changes when, not what."""
    torch.manual_seed(2)
    ref, wave = torch.rand(3, 32, 32) * 2 - 1, np.random.default_rng(2).standard_normal(45 * 640) * 0.1
    threads = torch.get_num_threads()
    plain = torch.cat(list(gen.stream_frames(models, ref, wave, seed=3)), dim=1)
    overlapped = torch.cat(list(gen.stream_frames(models, ref, wave, seed=3, overlap=True)), dim=1)
    assert overlapped.shape == plain.shape == (3, 45, 32, 32)
    assert torch.allclose(overlapped, plain, atol=1e-5)
    assert torch.get_num_threads() == threads                         # the thread split is undone


def test_background_worker_passes_errors_and_stops_early():
    def items():
        yield 1
        yield 2
        raise RuntimeError("sampler broke")
    it = gen.in_background(items())
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(RuntimeError, match="sampler broke"):
        next(it)
    produced = []

    def endless():
        for i in range(10**6):
            produced.append(i)
            yield i
    it = gen.in_background(endless())
    assert next(it) == 0
    it.close()                                                        # the consumer stops: so does the worker
    assert len(produced) <= 3


def bad_inputs(tmp_path, face):
    good = speech(tmp_path / "good.wav", 1.0)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + bytes(np.random.default_rng(0).integers(0, 255, 400, dtype=np.uint8)))
    data.write_wav(tmp_path / "nosamples.wav", np.zeros(0, np.float32))
    data.write_wav(tmp_path / "silent.wav", np.zeros(16000, np.float32))
    speech(tmp_path / "short.wav", 0.15)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return [
        (face, tmp_path / "missing.wav", FileNotFoundError, "not found"),
        (tmp_path / "missing.png", good, FileNotFoundError, "not found"),
        (face, tmp_path / "empty.wav", ValueError, "empty"),
        (face, tmp_path / "corrupt.wav", ValueError, "could not read"),
        (face, tmp_path / "nosamples.wav", ValueError, "no audio samples"),
        (face, tmp_path / "silent.wav", ValueError, "silent"),
        (face, tmp_path / "short.wav", ValueError, "at least 0.2 s"),
        (tmp_path / "corrupt.png", good, ValueError, "could not read"),
        (good, good, ValueError, "could not read"),                     # a WAV is no image
    ]


def test_bad_inputs_give_clear_errors_and_no_output(models, face, tmp_path):
    for image, audio, error, message in bad_inputs(tmp_path, face):
        out = tmp_path / "out" / "x.mp4"
        with pytest.raises(error, match=message):
            gen.generate(image, audio, out, models=models, verbose=False)
        assert not out.parent.exists() or not list(out.parent.iterdir()), (image, audio)


def test_failure_mid_stream_leaves_nothing(models, face, tmp_path, monkeypatch):
    audio = speech(tmp_path / "a.wav", 2.0)

    def broken(*args, **kwargs):
        yield torch.zeros(3, 5, 32, 32)
        raise RuntimeError("disk full")
    monkeypatch.setattr(gen, "stream_frames", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        gen.generate(face, audio, tmp_path / "out" / "x.mp4", models=models, verbose=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_options(models, face, tmp_path):
    audio = speech(tmp_path / "a.wav", 0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        gen.generate(face, audio, tmp_path / "o.mp4", schedule="fastest", models=models)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        gen.load_models(tmp_path / "nope.pt")
    (tmp_path / "other.pt").write_bytes(b"")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a generation bundle"):
        gen.load_models(tmp_path / "other.pt")


def test_synchronous_overlap_denoises_whole_windows(models):
    """synchronous_overlap sees W*n window frames per call (n kept, the rest thrown away);
    synchronous sees n; both give the same number of frames."""
    seen = {}
    forward = models.dit.forward

    def spy(x, levels, *args, **kwargs):
        seen.setdefault(name, []).append(int((levels[0] > 0).sum()))
        return forward(x, levels, *args, **kwargs)

    ref = torch.zeros(1, 16, 1, 4, 4)
    speech_latents = torch.randn(1, 9, 8)
    models.dit.forward = spy
    try:
        frames = {}
        for name in ("synchronous", "synchronous_overlap"):
            frames[name] = sum(c.shape[2] for c in gen.sample_video(models, ref, speech_latents, name))
    finally:
        del models.dit.forward
    assert frames["synchronous"] == frames["synchronous_overlap"] == 1 + 4 * 8
    assert max(seen["synchronous"]) == 2 and max(seen["synchronous_overlap"]) == 4


def test_chunked_speech_encoding_equals_one_pass():
    torch.manual_seed(0)
    sae = speech_ae.SpeechAE(speech_ae.tiny()).eval()
    with torch.no_grad():
        for p in sae.parameters():                          # a random, not a trained, encoder
            p.normal_(0, 0.1)
        wave = torch.randn(1, (1 + 4 * 90) * gen.HOP) * 0.1
        whole = sae.speech_latents(wave)                     # (1, 91, Da)
        chunked = gen.encode_speech(sae, wave, chunk=8, context=16)
    assert chunked.shape == whole.shape
    assert (chunked - whole).abs().max() < 1e-5
    # audio that ends early (or runs 300 samples over): each piece is padded (trimmed) on its own
    for samples in ((1 + 4 * 90) * gen.HOP - 5000, (1 + 4 * 90) * gen.HOP + 300):
        raw = torch.randn(1, samples) * 0.1
        padded = torch.from_numpy(gen.fit_audio(raw[0].numpy(), 1 + 4 * 90))[None]
        with torch.no_grad():
            want = sae.speech_latents(padded)
            for chunk in (8, 200):                           # chunked, and one pass
                got = gen.encode_speech(sae, raw, 1 + 4 * 90, chunk=chunk, context=16)
                assert got.shape == want.shape and (got - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="1 \\+ 4k video frames"):
        gen.encode_speech(sae, wave, 90)


def test_bundle_from_another_model_version_is_refused(models, tmp_path):
    from minread.train import TrainConfig, bundle
    path = tmp_path / "model.pt"
    bundle(path, models.vae, models.speech_ae, models.dit, TrainConfig())
    assert gen.load_models(path).dit.cfg == models.dit.cfg
    pack = torch.load(path, weights_only=True)
    del pack["dit"]["state"]["audio_cond.weight"]              # as a bundle from an older DiT
    torch.save(pack, path)
    with pytest.raises(ValueError, match="another version of the model.*audio_cond.weight"):
        gen.load_models(path)
    pack["dit"]["config"]["no_such_setting"] = 1
    torch.save(pack, path)
    with pytest.raises(ValueError, match="does not fit this version"):
        gen.load_models(path)
