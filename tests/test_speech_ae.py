import dataclasses
import math

import numpy as np
import pytest
import torch

from minread import speech_ae as sae
from minread.speech_ae import SpeechAE, check_audio, load_speech_ae, log_mel, mel_frequencies, train_speech_ae


def babble(n_samples, seed=0):
    """Synthetic voiced audio: a few harmonics with moving pitch and loudness, plus noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n_samples) / 16000
    f0 = 120 + 40 * torch.sin(2 * math.pi * 0.7 * t + torch.rand(1, generator=g) * 6)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / 16000
    wave = sum(torch.sin(h * phase) / h for h in range(1, 8))
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t + torch.rand(1, generator=g) * 6)
    return (0.2 * envelope * wave + 0.01 * torch.randn(n_samples, generator=g)).float()


def micro():
    return dataclasses.replace(sae.tiny(), width=16, max_width=16, latent_dim=8, train_frames=9,
                               batch_size=4, eval_every=3, warmup=2)


@pytest.mark.parametrize("freq", [1000.0, 2500.0, 4000.0, 6000.0])
def test_pure_tone_lands_in_its_mel_band(freq):
    t = torch.arange(16000) / 16000
    mel = log_mel(0.5 * torch.sin(2 * math.pi * freq * t))                      # (80, 100)
    centres = mel_frequencies(80)[1:-1]
    assert mel.mean(1).argmax().item() == (centres - freq).abs().argmin().item()


def test_low_tone_within_one_band():
    # below ~500 Hz the mel bands are narrower than the 40 Hz FFT bins of a 25 ms window
    t = torch.arange(16000) / 16000
    mel = log_mel(0.5 * torch.sin(2 * math.pi * 300.0 * t))
    centres = mel_frequencies(80)[1:-1]
    assert abs(mel.mean(1).argmax().item() - (centres - 300.0).abs().argmin().item()) <= 1


@pytest.mark.parametrize("S", [640, 641, 799, 800, 6400, 12345])
def test_log_mel_frame_count(S):
    assert log_mel(babble(S)).shape == (80, S // 160)


def test_log_mel_is_causal():
    wave = babble(6400)
    changed = wave.clone()
    changed[3200:] = 0.2 * torch.randn(3200)                                           # from the end of mel frame 19 on
    a, b = log_mel(wave), log_mel(changed)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20], b[:, 20])


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_latent_count_matches_video_latents(preset):
    cfg = sae.PRESETS[preset]()
    model = SpeechAE(cfg).eval()
    with torch.no_grad():
        for k in range(13):
            T = 1 + cfg.s_t * k                                                  # video frames
            mel = log_mel(babble(T * 640, seed=k)[None])                          # (1, 80, 4T)
            z = model.encode(mel)
            assert mel.shape[-1] == 4 * T
            assert z.shape == (1, 1 + k, cfg.latent_dim)                          # the VAE's 1 + k latent frames
            assert model.decode(z).shape == mel.shape
            assert sae.num_latents(T, cfg.s_t) == 1 + k


def test_encoder_causal():
    cfg = sae.tiny()
    model = SpeechAE(cfg).eval()
    s_t, k = cfg.s_t, 6
    wave = babble((1 + s_t * k) * 640)
    with torch.no_grad():
        z = model.speech_latents(wave[None])[0]                                  # (1 + k, Da)
        for t in [0, 3, 4, 9, 12, 17]:                                           # change audio after video frame t
            changed = wave.clone()
            changed[(t + 1) * 640:] = 0.2 * torch.randn(len(wave) - (t + 1) * 640)
            z2 = model.speech_latents(changed[None])[0]
            done = 1 + t // s_t                                                  # latents whose frames end <= t
            assert torch.allclose(z[:done], z2[:done], atol=1e-5), t
            assert not torch.allclose(z[done], z2[done], atol=1e-3), t           # the next one does change
        for j in range(k + 1):                                                   # a prefix gives a prefix
            zj = model.speech_latents(wave[None, : (1 + s_t * j) * 640])[0]
            assert torch.allclose(zj, z[: 1 + j], atol=1e-5)


def test_speech_latents_pads_to_whole_latent_frames():
    model = SpeechAE(sae.tiny()).eval()
    wave = babble(7 * 640 + 100)                                                 # 7.2 video frames
    z = model.speech_latents(wave[None])
    assert z.shape == (1, sae.num_latents(8, 4), sae.tiny().latent_dim)          # padded to T = 9
    full = model.speech_latents(torch.nn.functional.pad(wave, (0, 9 * 640 - len(wave)))[None])
    assert torch.allclose(z, full)


def test_overfit_one_batch():
    cfg = micro()
    torch.manual_seed(0)
    model = SpeechAE(cfg)
    mel = log_mel(torch.stack([babble(9 * 640, seed=s) for s in range(4)]))     # (4, 80, 36)
    model.mel_mean.copy_(mel.mean((0, 2)))
    model.mel_std.copy_(mel.std((0, 2)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = (model(mel) - mel).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_span_means_average_each_latents_own_mel_frames():
    model = SpeechAE(sae.tiny())
    s_t, k = 4, 3
    mel = log_mel(babble((1 + s_t * k) * 640)[None])                              # (1, 80, 52)
    x = (mel - model.mel_mean[:, None]) / model.mel_std[:, None]
    target = sae.span_means(model, mel)                                          # (1, 1 + k, 80)
    assert target.shape == (1, 1 + k, 80)
    silence = (sae.LOG_FLOOR - model.mel_mean) / model.mel_std
    assert torch.allclose(target[0, 0], (12 * silence + x[0, :, :4].sum(1)) / 16, atol=1e-5)   # padded first latent
    for j in range(1, k + 1):                                                    # latent j: mel frames 4 + 16(j-1) ..
        assert torch.allclose(target[0, j], x[0, :, 4 + 16 * (j - 1): 4 + 16 * j].mean(1), atol=1e-5)


def test_span_parts_average_each_video_frames_mel_frames():
    model = SpeechAE(sae.tiny())
    mel = log_mel(babble(13 * 640)[None])                                        # (1, 80, 52): 1 + 3 latents
    x = (mel - model.mel_mean[:, None]) / model.mel_std[:, None]
    whole, parts = sae.span_means(model, mel), sae.span_means(model, mel, parts=4)   # (1, 4, 80), (1, 4, 320)
    assert parts.shape == (1, 4, 320)
    for j in range(1, 4):                                                        # part i of latent j: video frame 4(j-1)+1+i
        for i in range(4):
            a = 4 * (4 * (j - 1) + 1 + i)
            assert torch.allclose(parts[0, j, 80 * i:80 * (i + 1)], x[0, :, a:a + 4].mean(1), atol=1e-5)
    assert torch.allclose(parts.view(1, 4, 4, 80).mean(2), whole, atol=1e-5)   # the parts average to the span


def test_span_readout_loss_reaches_the_encoder():
    cfg = micro()
    model, head = SpeechAE(cfg), torch.nn.Linear(cfg.latent_dim, cfg.n_mels * cfg.span_parts)
    mel = log_mel(torch.stack([babble(9 * 640, seed=s) for s in range(2)]))
    off = sae.ae_loss(model, head, mel, dataclasses.replace(cfg, span_weight=0.0, latent_noise=0.0))
    on = sae.ae_loss(model, head, mel, dataclasses.replace(cfg, span_weight=1.0, latent_noise=0.0))
    assert on > off
    (on - off).backward()                                                        # the read-out term alone
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad is None or model.decoder.conv_out.weight.grad.abs().sum() < 1e-6


def test_train_resume_is_exact_and_checkpoint_is_checked(tmp_path):
    cfg = micro()
    audio = [babble(20 * 640, seed=s) for s in range(6)]
    kw = dict(train_audio=audio[:4], eval_audio=audio[4:], log=lambda m: None)
    whole = train_speech_ae(cfg, steps=6, out=tmp_path / "a.pt", **kw)
    part = train_speech_ae(cfg, steps=6, out=tmp_path / "b.pt", until=3, **kw)
    assert part["step"] == 3
    resumed = train_speech_ae(cfg, steps=6, out=tmp_path / "b.pt", **kw)
    assert whole["step"] == resumed["step"] == 6
    a, b = load_speech_ae(tmp_path / "a.pt"), load_speech_ae(tmp_path / "b.pt")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not (tmp_path / "a.pt.tmp").exists()
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    assert {"model", "span_head", "optimizer", "step", "rng", "config"} <= set(ckpt)
    head_b = torch.load(tmp_path / "b.pt", weights_only=True)["span_head"]
    for name, p in ckpt["span_head"].items():                                     # the read-out resumes too
        assert torch.equal(p, head_b[name]), name
    z = a.speech_latents(torch.stack(audio[:4]))                                 # standardised on train audio
    assert z.mean().abs() < 0.2 and (z.std() - 1).abs() < 0.2
    with pytest.raises(ValueError, match=f"latent_dim: checkpoint 8 vs requested {sae.tiny().latent_dim}"):
        load_speech_ae(tmp_path / "a.pt", "tiny")
    with pytest.raises(FileNotFoundError, match="no SpeechAE checkpoint"):
        load_speech_ae(tmp_path / "missing.pt")
    del ckpt["span_head"]                                                        # a checkpoint from before the read-out
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_speech_ae(tmp_path / "old.pt").cfg.latent_dim == 8                # still loads for inference
    with pytest.raises(ValueError, match="resume=False"):
        train_speech_ae(cfg, steps=8, out=tmp_path / "old.pt", **kw)


@pytest.mark.parametrize("wave, rate, match", [
    (babble(16000), 44100, "resample"),
    (babble(16000)[:, None].repeat(1, 2), 16000, "downmix"),                     # (samples, channels)
    (babble(16000)[None, None].repeat(1, 2, 1), 16000, "downmix"),               # (B, channels, samples)
    (babble(600), 16000, "at least one video frame"),
    (torch.zeros(16000), 16000, "silent"),
    ((babble(16000) * 32767).short(), 16000, "divide by 32768"),
    (babble(16000) * 32767, 16000, "divide by 32768"),
    (torch.full((16000,), float("nan")), 16000, "NaN"),
    ("audio.wav", 16000, "numpy array or torch tensor"),
])
def test_bad_audio_gets_a_clear_error(wave, rate, match):
    with pytest.raises(ValueError, match=match):
        check_audio(wave, rate)


def test_speech_latents_checks_audio():
    model = SpeechAE(sae.tiny()).eval()
    with pytest.raises(ValueError, match="resample"):
        model.speech_latents(babble(16000)[None], sample_rate=22050)
    with pytest.raises(ValueError, match="silent"):
        model.speech_latents(torch.zeros(1, 6400))
    assert model.speech_latents(babble(6400).numpy()).shape == (1, 4, model.cfg.latent_dim)  # numpy (S,) accepted


def test_encode_rejects_misaligned_mel():
    model = SpeechAE(sae.tiny())
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        model.encode(torch.zeros(1, 80, 4 * 6))


def test_frame_probe_lines_up_latents_mel_spans_and_openings():
    from minread.bench import speech_ae as bench
    model = SpeechAE(micro()).eval()
    s_t, Da = model.cfg.s_t, model.cfg.latent_dim
    clips = [(babble(21 * 640, seed=s), torch.rand(21)) for s in range(3)]         # 21 frames: latents 0..5
    lat, mel, y, clip = bench.frame_probe_features(model, clips)
    assert lat.shape == (3 * 5, 3 * Da) and mel.shape == (3 * 5, 80 * 3 * 4 * s_t) and y.shape == (15, s_t)
    z = model.speech_latents(clips[1][0][None])[0]
    assert torch.allclose(lat[5 + 1], z[1:4].flatten())                          # clip 1, f = 2: latents 1..3
    assert torch.equal(y[5 + 1], clips[1][1][1 + s_t:1 + 2 * s_t])               # f = 2: frames 1 + s_t .. 2 s_t
    m = log_mel(clips[1][0][None])[0]
    L = 4 * s_t
    assert torch.allclose(mel[5 + 1].view(80, 3 * L)[:, L:2 * L], m[:, 4 + L:4 + 2 * L])   # latent 2's own span
    r = bench.frame_probe(model, clips[:2], clips[2:], mlp=False)
    assert -1 <= r["frame_probe_latents_ridge"] <= 1 and -1 <= r["frame_probe_logmel_ridge"] <= 1


def test_frame_probe_extra_clips_are_speech_and_truth_of_new_voices():
    from minread.bench import speech_ae as bench
    assert bench.extra_clips(0) == []
    with pytest.raises(ValueError, match="multiple of 4"):
        bench.extra_clips(6)
    pytest.importorskip("parselmouth", reason="needs praat-parselmouth (the speech extra)")
    clips = bench.extra_clips(4)
    assert len(clips) == 4 and all(len(a) == 640 * len(o) for a, o in clips)
    assert len({len(a) for a, _ in clips}) > 1                                    # four different utterances
