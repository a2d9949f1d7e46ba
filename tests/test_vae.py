"""Temporal VAE: shapes, causality, streaming equals whole, errors, overfitting, checkpoints."""

import pytest
import torch

from minread import vae as V


def _random_decoder_out(model):
    # The output layer starts at zero (mid-grey); give it weights so equality tests see signal.
    for p in model.decoder.conv_out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def _video(B, T, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, T, H, H, generator=g) * 2 - 1


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shapes_presets(name):
    cfg = V.PRESETS[name]()
    model = V.VAE(cfg).eval()
    H, k = cfg.image_size, 2
    x = _video(1, 1 + cfg.temporal * k, H)
    with torch.no_grad():
        mean, logvar = model.encode(x)
        assert mean.shape == logvar.shape == (1, cfg.latent_channels, 1 + k, H // cfg.spatial, H // cfg.spatial)
        assert model.decode(mean).shape == x.shape


def test_paper_geometry_shapes_and_size():
    cfg = V.paper()
    assert (cfg.image_size, cfg.spatial, cfg.temporal, cfg.latent_channels) == (512, 32, 8, 128)
    with torch.device("meta"):                      # shapes without allocating memory
        model = V.VAE(cfg)
        mean, _ = model.encode(torch.empty(1, 3, 17, 512, 512))
        assert mean.shape == (1, 128, 3, 16, 16)    # 256 tokens per latent frame
        assert model.decode(mean).shape == (1, 3, 17, 512, 512)
    enc, dec, total = V.count_parameters(cfg)
    assert enc > 0 and dec > 0 and total == enc + dec


@pytest.mark.parametrize("spatial,temporal,patch", [(1, 1, 1), (2, 2, 1), (4, 8, 4), (16, 2, 4), (8, 4, 4)])
def test_configurable_factors(spatial, temporal, patch):
    levels = max(int(torch.tensor(spatial // patch).log2()), int(torch.tensor(temporal).log2())) + 1
    cfg = V.VAEConfig(image_size=32, spatial=spatial, temporal=temporal, patch=patch, latent_channels=4,
                      widths=(8,) * levels, groups=4)
    model = V.VAE(cfg).eval()
    x = _video(1, 1 + 2 * temporal, 32)
    with torch.no_grad():
        mean, _ = model.encode(x)
        assert mean.shape == (1, 4, 3, 32 // spatial, 32 // spatial)
        assert model.decode(mean).shape == x.shape


def test_causality_prefix_gives_prefix():
    cfg = V.tiny()
    model = _random_decoder_out(V.VAE(cfg).eval())
    x = _video(2, 1 + 4 * 5, 32)
    with torch.no_grad():
        whole, _ = model.encode(x)
        for j in range(5):
            part, _ = model.encode(x[:, :, :1 + 4 * j])
            assert torch.allclose(part, whole[:, :, :1 + j], atol=1e-6)
        # and the decoder: the first 1 + j latents decode to the first 1 + 4j frames
        full = model.decode(whole)
        assert torch.allclose(model.decode(whole[:, :, :3]), full[:, :, :9], atol=1e-6)
        # changing a late frame leaves earlier latents untouched
        y = x.clone()
        y[:, :, 13:] = 0
        changed, _ = model.encode(y)
        assert torch.equal(changed[:, :, :4], whole[:, :, :4]) and not torch.equal(changed, whole)


def test_streaming_decode_equals_whole():
    model = _random_decoder_out(V.VAE(V.tiny()).eval())
    z = torch.randn(2, 16, 9, 4, 4)
    with torch.no_grad():
        whole = model.decode(z)
        for sizes in [(1,) * 9, (1, 3, 5), (4, 5), (2, 2, 2, 3)]:
            chunks = torch.split(z, list(sizes), dim=2)
            streamed = torch.cat(list(V.decode_stream(model, chunks)), dim=2)
            assert streamed.shape == whole.shape == (2, 3, 33, 32, 32)
            assert (streamed - whole).abs().max() <= 1e-5


def test_streaming_encode_equals_whole():
    model = V.VAE(V.tiny()).eval()
    x = _video(1, 1 + 4 * 6, 32)
    with torch.no_grad():
        whole, _ = model.encode(x)
        for bounds in [(1, 5, 9, 13, 17, 21, 25), (9, 25), (5, 17, 25)]:
            chunks = [x[:, :, a:b] for a, b in zip((0,) + bounds[:-1], bounds)]
            streamed = torch.cat(list(V.encode_stream(model, chunks)), dim=2)
            assert (streamed - whole).abs().max() <= 1e-5


def test_streaming_decode_memory_is_bounded_by_chunk():
    model = _random_decoder_out(V.VAE(V.tiny()).eval())
    cache = {}
    with torch.no_grad():
        for _ in range(3):
            model.decode(torch.randn(1, 16, 2, 4, 4), cache)
        sizes = [v.shape[2] for v in cache.values() if torch.is_tensor(v)]
    assert sizes and max(sizes) <= 2              # the cache holds kernel-1 frames per conv, not the past


def test_image_is_one_latent_frame():
    model = V.VAE(V.tiny()).eval()
    image = _video(3, 1, 32)
    with torch.no_grad():
        mean, _ = model.encode(image)
        assert mean.shape == (3, 16, 1, 4, 4)
        assert model.decode(mean).shape == (3, 3, 1, 32, 32)
        # the image's latent is the first latent of any clip starting with that image
        clip = torch.cat([image, _video(3, 8, 32, seed=1)], dim=2)
        assert torch.allclose(model.encode(clip)[0][:, :, :1], mean, atol=1e-6)


def test_normalised_latents_roundtrip():
    model = V.VAE(V.tiny()).eval()
    videos = [_video(2, 9, 32, seed=s) for s in range(3)]
    model.fit_latent_norm(videos)
    with torch.no_grad():
        z = torch.cat([model.encode_latents(v) for v in videos], 0)
        per_channel = z.transpose(0, 1).reshape(16, -1)
        assert per_channel.mean(1).abs().max() < 1e-3
        assert (per_channel.std(1, unbiased=False) - 1).abs().max() < 1e-3
        mean, _ = model.encode(videos[0])
        assert torch.allclose(model.decode_latents(model.encode_latents(videos[0])), model.decode(mean), atol=1e-5)


def test_wrong_frame_count_is_a_clear_error():
    model = V.VAE(V.tiny())
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        model.encode(_video(1, 8, 32))
    with pytest.raises(ValueError, match="multiple of 4 frames"):
        cache = {}
        model.encode(_video(1, 5, 32), cache)
        model.encode(_video(1, 3, 32), cache)


def test_wrong_channels_and_sizes_are_clear_errors():
    model = V.VAE(V.tiny())
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model.encode(torch.zeros(1, 4, 9, 32, 32))
    with pytest.raises(ValueError, match="unsqueeze"):
        model.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of the spatial factor"):
        model.encode(torch.zeros(1, 3, 9, 30, 30))
    with pytest.raises(ValueError, match=r"\(B, 16, F, h, w\)"):
        model.decode(torch.zeros(1, 8, 3, 4, 4))
    with pytest.raises(ValueError, match="power of two"):
        V.VAEConfig(spatial=6)
    with pytest.raises(ValueError, match="widths"):
        V.VAEConfig(widths=(32, 64))
    with pytest.raises(ValueError, match="norm"):
        V.VAEConfig(norm="batch")


def test_framenorm_is_per_frame():
    norm = V.FrameNorm(16, 4)
    x = torch.randn(2, 16, 5, 4, 4)
    y = norm(x)
    x2 = x.clone()
    x2[:, :, 3] *= 10
    assert torch.allclose(norm(x2)[:, :, :3], y[:, :, :3])


def test_channel_norm_is_per_pixel_of_each_frame():
    norm = V.FrameNorm(16, 4, "channel")
    x = torch.randn(2, 16, 5, 4, 4)
    x2 = x.clone()
    x2[:, :, 3, 1, 2] *= 10                         # one pixel of one frame
    changed = (norm(x2) - norm(x)).abs().amax(dim=1) > 1e-6     # (B, T, H, W)
    assert changed[:, 3, 1, 2].all() and changed.sum() == 2
    y = norm(x)                                     # each pixel's channels are standardised
    assert torch.allclose(y.mean(1), torch.zeros(()), atol=1e-5)


def test_match_channels_averages_or_repeats():
    x = torch.arange(8.0).view(1, 8, 1, 1, 1)
    assert V.match_channels(x, 2).flatten().tolist() == [1.5, 5.5]          # means of 0..3 and 4..7
    assert V.match_channels(x[:, :2], 6).flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(V.match_channels(x, 8), x)


def test_shortcut_needs_widths_that_divide():
    with pytest.raises(ValueError, match="shortcut"):
        V.VAEConfig(shortcut=True, widths=(48, 64, 96))   # 64 * 2 = 128 folded channels vs 96
    cfg = V.VAEConfig(shortcut=True, widths=(48, 96, 96), norm="channel")
    model = _random_decoder_out(V.VAE(cfg).eval())
    x = _video(1, 13, 32)
    with torch.no_grad():                            # causal and streaming-exact with the shortcuts
        mean, _ = model.encode(x)
        assert torch.allclose(model.encode(x[:, :, :5])[0], mean[:, :, :2], atol=1e-6)
        whole = model.decode(mean)
        chunks = torch.cat(list(V.decode_stream(model, mean.split([1, 3], dim=2))), 2)
    assert (chunks - whole).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- training

def _micro():
    return V.VAEConfig(image_size=32, spatial=8, temporal=4, latent_channels=8, widths=(16, 16, 32), groups=4)


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from minread.data import render_dataset
    root = tmp_path_factory.mktemp("toy")
    render_dataset(root, train_identities=2, test_identities=1, clips_per_identity=1, size=32,
                   seed=3, source="babble", progress=False)
    return root


def test_overfit_one_batch():
    from minread.data import render_clip
    frames = torch.from_numpy(render_clip(5, size=32, seed=1, source="babble")["video"][:9])
    video = (frames.permute(3, 0, 1, 2).float() / 127.5 - 1)[None]      # (1, 3, 9, 32, 32)
    model = V.VAE(_micro())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mask = V.mouth_region(video)
    losses = []
    for _ in range(100):
        loss, parts = V.vae_loss(model, video, mask, mouth_weight=4.0, kl_weight=1e-6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 10


def test_mouth_region_finds_the_mouth_and_nothing_on_plain_frames():
    from minread.data import render_clip
    clip = render_clip(4, size=32, seed=2, source="babble")
    video = (torch.from_numpy(clip["video"]).permute(3, 0, 1, 2).float() / 127.5 - 1)[None]
    region = V.mouth_region(video)
    assert region.shape == (1, 1, 1, 32, 32)
    assert 0 < region.mean() < 0.2                                        # a small patch, not the face
    ys = region[0, 0, 0].nonzero()[:, 0].float()
    assert ys.mean() > 16                                                 # in the lower half of the face
    assert V.mouth_region(torch.zeros(1, 3, 5, 32, 32)).sum() == 0        # grey frames: plain L1


def test_train_resume_is_exact_and_checkpoint_loads(toy_root, tmp_path):
    kw = dict(steps=4, batch_size=2, frames=5, eval_every=4, ckpt_every=2, eval_frames=9,
              identities=2, data_root=str(toy_root), progress=False)      # renders 2 faces each run
    cfg = _micro()
    whole = V.train_vae(cfg, tmp_path / "a", **kw)
    V.train_vae(cfg, tmp_path / "b", until=2, **kw)                      # "interrupted" at step 2
    resumed = V.train_vae(cfg, tmp_path / "b", **kw)
    assert whole["step"] == resumed["step"] == 4
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert whole["psnr"] == resumed["psnr"]
    assert not (tmp_path / "a" / "ckpt.pt.tmp").exists()
    model = V.load_vae(tmp_path / "a" / "ckpt.pt", cfg)
    assert torch.equal(model.latent_std, a["model"]["latent_std"]) and not torch.all(model.latent_std == 1)


def test_time_budget_cuts_the_schedule_and_a_resume_keeps_it(toy_root, tmp_path):
    kw = dict(steps=500, minutes=1e-4, batch_size=1, frames=5, eval_every=1000, eval_frames=5,
              identities=2, data_root=str(toy_root), progress=False)       # 6 ms: spent by the probe's end
    first = V.train_vae(_micro(), tmp_path, **kw)
    assert first["step"] == first["planned_steps"] == V.PROBE[1] < 500
    stored = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert stored["planned_steps"] == V.PROBE[1]
    assert stored["history"][-1]["step"] == V.PROBE[1]                    # evaluated at the cut schedule's end
    assert not torch.all(stored["model"]["latent_std"] == 1)              # and the latent scaling fitted
    again = V.train_vae(_micro(), tmp_path, **kw)                         # resumed: the plan is kept
    assert again["step"] == again["planned_steps"] == V.PROBE[1]
    V.train_vae(_micro(), tmp_path / "cut", until=V.PROBE[0] + 10, **kw)  # interrupted inside the probe
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["planned_steps"] is None
    resumed = V.train_vae(_micro(), tmp_path / "cut", **kw)               # times the rest of it
    assert resumed["step"] == resumed["planned_steps"] == V.PROBE[1]
    with pytest.raises(ValueError, match="minutes"):                      # another budget is another run
        V.train_vae(_micro(), tmp_path, **{**kw, "minutes": 100.0})


def test_load_refuses_another_config(toy_root, tmp_path):
    cfg = _micro()
    V.train_vae(cfg, tmp_path, steps=1, batch_size=1, frames=5, eval_every=10, data_root=str(toy_root),
                identities=0, progress=False)
    other = V.VAEConfig(**{**V.asdict(cfg), "latent_channels": 4})
    with pytest.raises(ValueError, match="latent_channels: checkpoint 8 vs requested 4"):
        V.load_vae(tmp_path / "ckpt.pt", other)
    with pytest.raises(ValueError, match="latent_channels"):               # resuming into it too
        V.train_vae(other, tmp_path, steps=2, batch_size=1, frames=5, data_root=str(toy_root), identities=0,
                    progress=False)
    with pytest.raises(FileNotFoundError, match="train one"):
        V.load_vae(tmp_path / "missing.pt")


def test_default_training_window_is_frame_zero_and_one_latent_group(toy_root, tmp_path):
    cfg = _micro()
    V.train_vae(cfg, tmp_path, steps=1, batch_size=1, eval_every=10, data_root=str(toy_root), identities=0,
                progress=False)
    stored = torch.load(tmp_path / "ckpt.pt", weights_only=True)["train_config"]
    assert stored["frames"] == 1 + cfg.temporal                           # 5 for s_t = 4, 9 for s_t = 8
    with pytest.raises(ValueError, match="frames=4 must be 1 \\+ 4k"):
        V.train_vae(cfg, tmp_path / "odd", steps=1, frames=4, data_root=str(toy_root), identities=0,
                    progress=False)


def test_rendered_training_faces_are_not_the_held_out_ones(toy_root):
    import json
    bank = V.ClipBank.render(3, 32, seed=3)
    again = V.ClipBank.render(3, 32, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(bank.video, again.video))   # deterministic from the seed
    manifest = json.loads((toy_root / "manifest.json").read_text())
    toy_faces = {ident["params"]["seed"] for ident in manifest["identities"]}
    assert toy_faces and not toy_faces & set(bank.identity)
    assert bank.video[0].dtype == torch.uint8 and bank.video[0].shape[0] == 3


def test_per_frame_convs_keep_streaming_exact():
    cfg = V.VAEConfig(image_size=32, spatial=8, temporal=4, latent_channels=8, widths=(16, 16, 32), groups=4,
                      time_kernel=(1, 1, 3))
    model = _random_decoder_out(V.VAE(cfg).eval())
    video = _video(1, 17, 32)
    with torch.no_grad():
        mean, _ = model.encode(video)
        streamed = torch.cat(list(V.encode_stream(model, [video[:, :, :5], video[:, :, 5:13], video[:, :, 13:]])), 2)
        whole = model.decode(mean)
        chunks = torch.cat(list(V.decode_stream(model, mean.split(2, dim=2))), 2)
    assert (streamed - mean).abs().max() <= 1e-5 and (chunks - whole).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="time_kernel"):
        V.VAEConfig(time_kernel=(1, 3))


def test_small_preset_trains_a_few_steps_on_cpu():
    model = V.VAE(V.small())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ramp = torch.linspace(-0.5, 0.5, 128)
    video = (ramp.view(1, 1, 1, 128, 1) + torch.tensor([0.2, -0.1, 0.3]).view(1, 3, 1, 1, 1)).expand(1, 3, 9, 128, 128)
    losses = []
    for _ in range(3):
        loss, _ = V.vae_loss(model, video)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    t = V.VAETrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=0.1)
    lrs = [V.lr_at(s, t) for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_loss_weights_the_mouth_and_works_without_a_mask():
    model = V.VAE(_micro())
    video = _video(1, 5, 32)
    mask = torch.zeros(1, 1, 1, 32, 32)
    torch.manual_seed(1)
    plain, _ = V.vae_loss(model, video, None)
    torch.manual_seed(1)
    empty, _ = V.vae_loss(model, video, mask)
    mask[..., 20:28, 10:22] = 1
    torch.manual_seed(1)
    weighted, _ = V.vae_loss(model, video, mask, mouth_weight=8.0)
    assert torch.allclose(plain, empty) and weighted > plain
