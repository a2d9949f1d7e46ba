import dataclasses
import warnings

import pytest
import torch

from minread import dit


def make_model(cfg=None, randomize=True, **changes):
    cfg = dataclasses.replace(cfg or dit.tiny(), **changes)
    model = dit.A2VDiT(cfg).eval()
    if randomize:  # leave the zero adaLN init, so every branch does something
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
    return model


def inputs(cfg, B=2, F=5, grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    C, Da = cfg.latent_channels, cfg.audio_dim
    return (torch.randn(B, C, F, grid, grid, generator=g), torch.rand(B, F, generator=g),
            torch.randn(B, F, Da, generator=g), torch.randn(B, C, 1, grid, grid, generator=g))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_output_shapes(preset):
    cfg = getattr(dit, preset)()
    model = make_model(cfg, randomize=False)
    for F in (3, 7):  # F varies between calls (with and without anchors)
        x, levels, audio, ref = inputs(cfg, B=1, F=F)
        out = model(x, levels, audio, ref)
        assert out.shape == x.shape
        assert torch.isfinite(out).all()


def test_patchify_roundtrip():
    model = make_model(dit.tiny(), patch=2)
    z = torch.randn(2, 16, 3, 4, 6)
    tokens = model.patchify(z)
    assert tokens.shape == (2, 3 * 2 * 3, 16 * 4)
    assert torch.equal(model.unpatchify(tokens, 3, 4, 6), z)


def test_blocks_are_identity_at_init():
    model = make_model(randomize=False)
    with torch.no_grad():  # random weights everywhere except the adaLN-Zero layers
        for name, p in model.named_parameters():
            if not (name.startswith("ada.") or name.startswith("final")):
                p.normal_(0, 0.2)
    x, levels, audio, ref = inputs(model.cfg)
    tokens, c, speech = model.embed(x, levels, audio, ref)
    ropes = model.cached_rope(5, 4, 4, x.device)
    m = model.modulation(c)
    for i, block in enumerate(model.blocks):
        out = block(tokens, m[6 * i:6 * i + 6], speech, *ropes, model.audio_mask_for(16))
        assert torch.equal(out, tokens)
    # the fused path too: zero gates leave the tokens as they are
    k_speech, v_speech = torch.randn(2, 2, 4, 5, 32).unbind(0)
    m_fused = torch.stack([m[0] + s for s in (0, 1, 0, 0, 1, 0)])  # shift, 1 + scale, gate, ...: (6, B, 1+F, 1, D)
    for block in model.blocks:
        frames = tokens.view(2, 6, 16, -1)
        out = block.fused(frames, m_fused, k_speech, v_speech, ropes[0], model.speech_mask_for(16, 5, x.device))
        assert torch.equal(out, frames)
    for fused in (False, True):  # the network's output is zero (x̂₀ = the reference, with ref_skip)
        model.fused = fused
        assert torch.equal(model(x, levels, audio, ref), model.skip(torch.zeros_like(x), ref, None))


def test_reference_skip_predicts_the_reference_at_init():
    model = make_model(randomize=False, ref_skip=True)
    x, levels, audio, ref = inputs(model.cfg, B=2)
    drop_ref = torch.tensor([False, True])
    for fused in (False, True):
        model.fused = fused
        out = model(x, levels, audio, ref, drop_ref=drop_ref)
        assert torch.equal(out[0], ref[0].expand_as(out[0]))       # every frame starts as the reference
        assert torch.count_nonzero(out[1]) == 0                     # a dropped reference adds nothing
    with pytest.raises(ValueError, match="ref_skip needs prediction='x0'"):
        make_model(ref_skip=True, prediction="v")


@pytest.mark.parametrize("fused", [False, True])
def test_frame_shift_invariance(fused):
    model = make_model()
    x, levels, audio, ref = inputs(model.cfg, F=6)
    tokens, c, speech = model.embed(x, levels, audio, ref)
    mask = model.speech_mask_for(16, 6, x.device) if fused else model.audio_mask_for(16)
    run_blocks = model.run_blocks_fused if fused else model.run_blocks
    pos = model.positions(6, 4, 4)
    out = run_blocks(tokens, c, speech, model.rope(pos, 16), mask)
    for shift in (5, -3, 100):
        moved = pos.clone()
        moved[:, 0] += shift  # every frame index, the reference's and the speech keys' too
        out2 = run_blocks(tokens, c, speech, model.rope(moved, 16), mask)
        assert torch.allclose(out, out2, atol=1e-4), shift
    across = pos.clone()
    across[:, 2] += 1  # sanity: rotary positions do matter (x positions of a token move)
    across[:16, 2] -= 1
    assert not torch.allclose(out, run_blocks(tokens, c, speech, model.rope(across, 16), mask), atol=1e-3)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_audio_locality(radius):
    model = make_model(audio_radius=radius)
    F, N = 7, 16
    x, levels, audio, ref = inputs(model.cfg, F=F)
    tokens, c, speech = model.embed(x, levels, audio, ref)
    attn = model.blocks[0].attn
    ropes = model.cached_rope(F, 4, 4, x.device)
    mask = model.audio_mask_for(N)
    for g in (0, 3, 6):
        audio2 = audio.clone()
        audio2[:, g] += 1.0
        speech2 = model.embed(x, levels, audio2, ref)[2]
        with torch.no_grad():
            diff = (attn(tokens, speech2, *ropes, mask) - attn(tokens, speech, *ropes, mask)).abs()
        per_frame = diff.view(2, 1 + F, N, -1).amax((0, 2, 3))  # reference, then frames 0..F-1
        assert per_frame[0] == 0  # the reference hears no speech
        for f in range(F):
            if abs(f - g) <= radius:
                assert per_frame[1 + f] > 1e-4, (g, f)
            else:
                assert per_frame[1 + f] == 0, (g, f)


def test_level_changes_only_its_frame_modulation():
    model = make_model()
    x, levels, audio, ref = inputs(model.cfg, F=6)
    m = model.modulation(model.embed(x, levels, audio, ref)[1])
    levels2 = levels.clone()
    levels2[1, 3] = 1 - levels2[1, 3]
    m2 = model.modulation(model.embed(x, levels2, audio, ref)[1])
    for a, b in zip(m, m2):  # (B, 1+F, 1, D): row 0 is the reference
        changed = (a - b).abs().amax((2, 3)) > 0
        expected = torch.zeros_like(changed)
        expected[1, 1 + 3] = True
        assert torch.equal(changed, expected)


@pytest.mark.parametrize("cond_radius", [0, 1, 2])
@pytest.mark.parametrize("cond_hidden", [0, 48])
def test_speech_changes_only_its_frames_conditioning(cond_radius, cond_hidden):
    model = make_model(cond_radius=cond_radius, cond_hidden=cond_hidden)
    x, levels, audio, ref = inputs(model.cfg, F=6)
    c = model.embed(x, levels, audio, ref)[1]                   # (B, 1+F, D)
    for g in (0, 2, 5):
        audio2 = audio.clone()
        audio2[0, g] += 1.0
        changed = (model.embed(x, levels, audio2, ref)[1] - c).abs().amax(-1) > 0
        expected = torch.zeros_like(changed)
        for f in range(max(0, g - cond_radius), min(6, g + cond_radius + 1)):
            expected[0, 1 + f] = True                           # row 0 is the reference: it hears nothing
        assert torch.equal(changed, expected), g


def test_null_tokens_used_exactly_when_dropped():
    model = make_model()
    x, levels, audio, ref = inputs(model.cfg, B=3)
    drop = torch.tensor([True, False, True])
    with torch.no_grad():
        for flag, change in (("drop_audio", lambda: audio.mul_(-1.5)), ("drop_ref", lambda: ref.mul_(-1.5))):
            base = model(x, levels, audio, ref)
            out = model(x, levels, audio, ref, **{flag: drop})
            keep = model(x, levels, audio, ref, **{flag: torch.zeros(3, dtype=torch.bool)})
            assert torch.allclose(keep, base)  # nothing dropped: the condition is used as is
            assert torch.allclose(out[1], base[1], atol=1e-5)  # samples are independent
            assert not torch.allclose(out[0], base[0], atol=1e-3)
            change()  # a dropped sample ignores its condition entirely
            out2 = model(x, levels, audio, ref, **{flag: drop})
            assert torch.allclose(out2[[0, 2]], out[[0, 2]], atol=1e-5)
            assert not torch.allclose(out2[1], out[1], atol=1e-3)
    # the null parameters receive gradient only from dropped samples
    for flag, name in (("drop_audio", "null_audio"), ("drop_ref", "null_ref")):
        for d, expect in ((torch.zeros(3, dtype=torch.bool), False), (drop, True)):
            model.zero_grad()
            model(x, levels, audio, ref, **{flag: d}).square().sum().backward()
            grad = getattr(model, name).grad
            assert (grad is not None and grad.abs().sum() > 0) == expect, (flag, expect)


@pytest.mark.parametrize("impl", ["flex_eager", "math"])
def test_impls_agree_with_sdpa(impl):
    model = make_model()
    x, levels, audio, ref = inputs(model.cfg)
    with torch.no_grad():
        ref_out = model(x, levels, audio, ref)
        for block in model.blocks:
            block.attn.impl = impl
        out = model(x, levels, audio, ref)
    assert torch.allclose(out, ref_out, atol=1e-4), (out - ref_out).abs().max()


@pytest.mark.slow
def test_compiled_flex_agrees_with_sdpa():
    test_impls_agree_with_sdpa("flex")


@pytest.mark.parametrize("changes", [{}, {"patch": 2, "audio_radius": 0},
                                     {"audio_radius": 2, "prediction": "v", "ref_skip": False, "cond_radius": 2},
                                     {"ref_skip": False, "cond_radius": 0}, {"cond_hidden": 48}])
def test_fused_path_matches_reference(changes):
    """run_blocks_fused (the default) computes what run_blocks does: outputs and every
    parameter's gradient, with some conditions dropped."""
    model = make_model(**changes).train()
    x, levels, audio, ref = inputs(model.cfg, B=3, F=6)
    drop_audio, drop_ref = torch.tensor([True, False, False]), torch.tensor([False, True, False])
    weights = torch.randn(x.shape)
    results = []
    for fused in (False, True):
        model.fused = fused
        model.zero_grad(set_to_none=True)
        out = model(x, levels, audio, ref, drop_audio, drop_ref)
        (out * weights).sum().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_ref, grads_ref), (out_fused, grads_fused) = results
    assert torch.allclose(out_fused, out_ref, atol=1e-5), (out_fused - out_ref).abs().max()
    for name, g in grads_ref.items():
        assert torch.allclose(grads_fused[name], g, rtol=1e-4, atol=1e-5 * g.abs().max()), name


@pytest.mark.parametrize("changes", [{}, {"audio_radius": 2, "cond_radius": 0}])
def test_fused_sampling_path_matches_reference(changes):
    """Without gradients the fused path's speech attention is one SDPA call: still the same model."""
    model = make_model(**changes).eval()
    x, levels, audio, ref = inputs(model.cfg, B=2, F=5)
    with torch.no_grad():
        outs = []
        for fused in (False, True):
            model.fused = fused
            outs.append(model(x, levels, audio, ref, torch.tensor([False, True])))
    assert torch.allclose(outs[1], outs[0], atol=1e-5), (outs[1] - outs[0]).abs().max()


def test_fused_path_used_only_with_sdpa():
    model = make_model()
    x, levels, audio, ref = inputs(model.cfg)
    calls = []
    model.run_blocks_fused = lambda *a: calls.append("fused") or dit.A2VDiT.run_blocks_fused(model, *a)
    with torch.no_grad():
        model(x, levels, audio, ref)
        model.blocks[0].attn.impl = "math"  # another impl: the reference path runs it
        model(x, levels, audio, ref)
    assert calls == ["fused"]


def test_compiled_inference_matches_eager():
    model = make_model(dataclasses.replace(dit.tiny(), width=32, depth=2, heads=1))
    x, levels, audio, ref = inputs(model.cfg, B=1, F=4)
    with torch.inference_mode():
        eager = model(x, levels, audio, ref)
        model.compile_inference = True
        with warnings.catch_warnings():
            warnings.filterwarnings("error", "A2VDiT: torch.compile failed")  # no silent fallback
            compiled = model(x, levels, audio, ref)
    assert model.compile_inference
    assert torch.allclose(compiled, eager, atol=1e-5), (compiled - eager).abs().max()
    out = model(x, levels, audio, ref)  # with gradients: the eager path, differentiable
    assert out.requires_grad and torch.allclose(out, eager, atol=1e-5)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    model = make_model()
    x, levels, audio, ref = inputs(model.cfg)

    def broken(*args):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(dit, "_forward_fused_compiled", broken)
    with torch.no_grad():
        eager = model(x, levels, audio, ref)
        model.compile_inference = True
        with pytest.warns(UserWarning, match="torch.compile failed"):
            out = model(x, levels, audio, ref)
    assert torch.equal(out, eager) and not model.compile_inference


def test_loss_skips_anchors_and_matches_parameterisation():
    model = make_model()
    cfg = model.cfg
    x0, levels, audio, ref = inputs(cfg, F=5)
    noise = torch.randn_like(x0)
    batch = dict(latents=x0, audio=audio, reference=ref, n_anchors=2, noise=noise)
    levels[:, :2] = 0
    loss = dit.dit_loss(model, batch, levels)
    tau = levels.view(2, 1, 5, 1, 1)
    with torch.no_grad():
        pred = model((1 - tau) * x0 + tau * noise, levels, audio, ref)
    assert torch.allclose(loss, (pred - x0)[:, :, 2:].pow(2).mean())
    model.prediction = "v"
    assert torch.allclose(dit.dit_loss(model, batch, levels), (pred - (noise - x0))[:, :, 2:].pow(2).mean())


def test_overfit_small_batch():
    torch.manual_seed(0)
    cfg = dataclasses.replace(dit.tiny(), width=64, depth=2, heads=2)
    model = dit.A2VDiT(cfg)
    x0, levels, audio, ref = inputs(cfg, B=4, F=4)
    batch = dict(latents=x0, audio=audio, reference=ref, n_anchors=1, noise=torch.randn_like(x0))
    levels[:, 0] = 0
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(250):
        loss = dit.dit_loss(model, batch, levels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_bad_inputs_raise_clear_errors():
    model = make_model(randomize=False)
    x, levels, audio, ref = inputs(model.cfg, F=4)
    with pytest.raises(ValueError, match="levels"):
        model(x, levels[:, :3], audio, ref)
    with pytest.raises(ValueError, match="audio"):
        model(x, levels, audio[:, :3], ref)
    with pytest.raises(ValueError, match="reference"):
        model(x, levels, audio, ref[:, :, :, :2])
    with pytest.raises(ValueError, match="latents"):
        model(x[:, :8], levels, audio, ref)
    with pytest.raises(ValueError, match="n_anchors"):
        dit.dit_loss(model, dict(latents=x, audio=audio, reference=ref, n_anchors=4), levels)
    with pytest.raises(ValueError, match="prediction"):
        dit.A2VDiT(dataclasses.replace(dit.tiny(), prediction="eps"))


def test_copies_and_moves_drop_recorded_graphs():
    """CUDA graphs hold the addresses of the tensors they were recorded with: a copy of the
    model, or the model moved or cast, must record its own."""
    import copy
    model = make_model()
    model._graphs["stale"] = object()                 # stands for a recorded graph
    assert copy.deepcopy(model)._graphs == {} and model._graphs
    model.float()
    assert model._graphs == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_match_eager():
    """forward_graphed (the default for calls without gradients on a GPU) gives what the
    eager fused path gives, for several input signatures and fresh inputs on each replay."""
    model = make_model().cuda().eval()
    cases = [(1, 5, False), (2, 5, True), (1, 3, False), (1, 5, False), (2, 5, True)]  # repeats replay
    with torch.no_grad():
        for i, (B, F, drop) in enumerate(cases):
            x, levels, audio, ref = (t.cuda() for t in inputs(model.cfg, B=B, F=F, seed=i))
            drop_audio = torch.arange(B, device="cuda") >= B // 2 if drop else None
            model.cuda_graphs = False
            eager = model(x, levels, audio, ref, drop_audio)
            model.cuda_graphs = True
            graphed = model(x, levels, audio, ref, drop_audio)
            torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-4)
    assert len(model._graphs) == 3
    out = model(x, levels, audio, ref)  # with gradients: eager, differentiable
    assert out.requires_grad


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_sample_the_same_video():
    from minread import ans
    model = make_model().cuda().eval()
    cfg = model.cfg
    _, _, audio, ref = (t.cuda() for t in inputs(cfg, B=1, F=9))
    levels = ans.asynchronous(9, 2, 2, 4)
    videos = []
    for graphs in (False, True):
        model.cuda_graphs = graphs
        clips = ans.generate_latents(model, audio, ref[:, :, :1], levels, n_anchors=1, cfg_scale=1.5, progress=False)
        videos.append(torch.cat([c for _, c in clips], 2))
    torch.testing.assert_close(videos[1], videos[0], atol=1e-4, rtol=1e-4)
