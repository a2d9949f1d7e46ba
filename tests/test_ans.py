"""Unit tests of per-frame noise schedules and the samplers (minread/ans.py, DESIGN §7).

Each test name states an invariant. Property-based tests draw many (F, n, W, S) from a
seeded generator, so a failure names the exact case to replay.
"""

import math
import random

import pytest
import torch

from minread import ans


def cases(k=40, seed=0):
    """Random (F, n, W, S) with S a multiple of W, including tiny and odd lengths."""
    rng = random.Random(seed)
    out = [(1, 1, 1, 1), (1, 2, 2, 8), (7, 2, 2, 8), (63, 2, 2, 8), (12, 3, 3, 9)]
    for _ in range(k):
        W = rng.randint(1, 4)
        out.append((rng.randint(1, 40), rng.randint(1, 4), W, W * rng.randint(1, 5)))
    return out


def all_schedules(F, n, W, S):
    """name -> (levels, lookahead, frames the model may see besides anchors)."""
    return {"synchronous": (ans.synchronous(F, n, S), 0, n),
            "synchronous_overlap": (ans.synchronous_overlap(F, n, W, S), (W - 1) * n, W * n),
            "asynchronous": (ans.asynchronous(F, n, W, S), 0, W * n),
            "rolling": (ans.rolling(F, W * n, S), 0, W * n),
            "pyramid": (ans.pyramid(F, S, slope=0.5 * W), 0, math.ceil(S / (0.5 * W)))}


def run(model, levels, x0_like, *, M=2, lookahead=0, **kw):
    """Run the sampler to the end; returns the concatenated latents and the yields."""
    B, C, F, h, w = x0_like.shape
    speech = model.speech_latents() if hasattr(model, "speech_latents") else torch.arange(F).float().view(1, F, 1).expand(B, F, 4)
    yields = list(ans.generate_latents(model, speech, x0_like[:, :, :1], levels, n_anchors=M,
                                       lookahead=lookahead, progress=False, **kw))
    return torch.cat([c for _, c in yields], dim=2), yields


class Spy:
    """A deterministic model that mixes frames (so context matters) and records its inputs."""

    def __init__(self, prediction="x0"):
        self.prediction, self.inputs = prediction, []

    def __call__(self, x, levels, audio, reference, drop_audio=None, drop_ref=None):
        self.inputs.append((x.clone(), levels.clone(), audio.clone(), drop_audio))
        return torch.tanh(0.5 * x + x.mean(2, keepdim=True) + 0.1 * reference + 0.01 * audio[:, None, :, :1, None])


# ----------------------------------------------------------------------------- flow

def test_add_noise_is_clean_at_zero_pure_noise_at_one_and_moves_with_the_velocity():
    x0, eps = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 3, 4, 2, 2)
    levels = torch.tensor([[0.0, 1.0, 0.3, 0.7], [1.0, 0.0, 0.5, 0.5]])
    x = ans.add_noise(x0, eps, levels)
    assert torch.equal(x[0, :, 0], x0[0, :, 0]) and torch.equal(x[0, :, 1], eps[0, :, 1])
    d = 1e-3  # dx/dτ = ε - x₀ for every frame
    slope = (ans.add_noise(x0, eps, levels + d) - x) / d
    torch.testing.assert_close(slope, ans.velocity_target(x0, eps), atol=1e-2, rtol=0)
    v = ans.to_velocity(x, x0, levels[:, :].clamp_min(0.3))
    torch.testing.assert_close(ans.to_x0(x, v, levels.clamp_min(0.3)), x0, atol=1e-5, rtol=0)


def test_steps_leave_frames_whose_level_does_not_change_bit_identical():
    x = torch.randn(1, 2, 4, 2, 2)
    v = torch.full_like(x, float("nan"))  # even a NaN velocity must not leak into a still frame
    tau, tau_next = torch.tensor([0.0, 0.5, 0.5, 1.0]), torch.tensor([0.0, 0.5, 0.25, 1.0])
    for out in (ans.euler_step(x, v, tau, tau_next), ans.heun_step(x, v, v, tau, tau_next)):
        assert torch.equal(out[:, :, [0, 1, 3]], x[:, :, [0, 1, 3]])
        assert torch.isnan(out[:, :, 2]).all()


def test_heun_equals_euler_on_a_straight_path_and_lands_exactly_at_zero():
    x0, eps = torch.randn(1, 2, 3, 2, 2), torch.randn(1, 2, 3, 2, 2)
    tau, tau_next = torch.tensor([1.0, 0.5, 0.25]), torch.tensor([0.5, 0.25, 0.0])
    x, v = ans.add_noise(x0, eps, tau), eps - x0
    euler = ans.euler_step(x, v, tau, tau_next)
    torch.testing.assert_close(ans.heun_step(x, v, v, tau, tau_next), euler)
    torch.testing.assert_close(euler, ans.add_noise(x0, eps, tau_next), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("F,n,W,S", cases())
def test_every_schedule_starts_noisy_ends_clean_never_gets_noisier_and_streams(F, n, W, S):
    for name, (levels, lookahead, width) in all_schedules(F, n, W, S).items():
        assert levels.shape[1] == F and (levels[0] == 1).all() and (levels[-1] == 0).all(), name
        assert (levels[1:] <= levels[:-1]).all(), f"{name}: a column increases"
        assert ((levels >= 0) & (levels <= 1)).all(), name
        windows = ans.step_windows(levels, n_anchors=2, lookahead=lookahead)  # raises if not streamable
        active = [w.active.stop - w.active.start for w in windows if w is not None]
        assert max(active) <= width, f"{name}: {max(active)} active frames > {width}"
        seen = [w.frames.stop - w.frames.start for w in windows if w is not None]
        assert max(seen) <= 2 + (W * n if name == "synchronous_overlap" else width), name


@pytest.mark.parametrize("F,n,W,S", cases())
def test_asynchronous_with_one_clip_in_flight_is_synchronous(F, n, W, S):
    assert torch.equal(ans.asynchronous(F, n, 1, S), ans.synchronous(F, n, S))


@pytest.mark.parametrize("F,n,W,S", cases())
def test_asynchronous_finishes_one_clip_every_S_over_W_calls_after_warm_up(F, n, W, S):
    levels = ans.asynchronous(F, n, W, S)
    done_at = [int((levels[:, f] > 0).sum()) for f in range(0, F, n)]  # row where each clip is clean
    assert done_at[0] == S  # warm-up: the first clip takes its S steps
    assert all(b - a == S // W for a, b in zip(done_at, done_at[1:]))
    assert ans.count_calls(levels) == levels.shape[0] - 1 == S + (len(done_at) - 1) * S // W


@pytest.mark.parametrize("F,n,W,S", cases(20, seed=1))
def test_first_columns_do_not_depend_on_the_total_length(F, n, W, S):
    for name, (short, _, _) in all_schedules(F, n, W, S).items():
        long, _, _ = all_schedules(F + 1 + 5 * n, n, W, S)[name]
        R = short.shape[0]
        assert torch.equal(long[:R, :F], short), name
        assert (long[R:, :F] == 0).all(), name


@pytest.mark.parametrize("F,n,W,S", cases(20, seed=2))
def test_rolling_is_asynchronous_with_one_frame_clips_and_pyramid_with_slope_S_over_window(F, n, W, S):
    assert torch.equal(ans.rolling(F, W, S), ans.asynchronous(F, 1, W, S))
    assert torch.equal(ans.rolling(F, W, S), ans.pyramid(F, S, slope=S / W))


def test_asynchronous_makes_W_times_fewer_calls_than_overlap_per_clip_in_the_long_run():
    n, W, S = 2, 2, 8
    rate = {}
    for name, fn in (("async", lambda F: ans.asynchronous(F, n, W, S)),
                     ("overlap", lambda F: ans.synchronous_overlap(F, n, W, S))):
        rate[name] = (ans.count_calls(fn(400)) - ans.count_calls(fn(200))) / 200  # calls per extra frame
    assert rate["async"] == rate["overlap"] / W == S / (W * n)


def test_a_schedule_that_cannot_be_streamed_is_refused_with_a_clear_error():
    gap = torch.tensor([[1.0, 1.0, 1.0], [0.5, 1.0, 0.5], [0.0, 0.0, 0.0]])  # moving frames not contiguous
    noisier = torch.tensor([[1.0, 1.0], [0.5, 1.0], [0.6, 0.0], [0.0, 0.0]])
    for levels, msg in ((gap, "streamed"), (noisier, "never increase"), (gap[1:], "row 0")):
        with pytest.raises(ValueError, match=msg):
            ans.step_windows(levels)
    with pytest.raises(ValueError, match="multiple of W"):
        ans.asynchronous(10, 2, 3, 8)


# ----------------------------------------------------------------------------- training noise

def test_sample_levels_is_seeded_and_follows_the_staggered_pattern():
    draw = lambda s: ans.sample_levels(64, n=2, W=2, M=2, p_sync=0, p_start=0, p_end=0,  # noqa: E731
                                       generator=torch.Generator().manual_seed(s))
    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.levels, b.levels) and not torch.equal(a.levels, c.levels)
    lv = a.levels
    assert a.n_anchors == 2 and lv.shape == (64, 6) and (lv[:, :2] == 0).all()
    assert torch.equal(lv[:, 2], lv[:, 3]) and torch.equal(lv[:, 4], lv[:, 5])  # one level per clip
    torch.testing.assert_close(lv[:, 4] - lv[:, 2], torch.full((64,), 0.5))  # staggered by 1/W
    assert (lv[:, 2] > 0).all() and (lv[:, 2] <= 0.5).all()


def test_sample_levels_drops_conditions_at_the_requested_rates_and_can_noise_anchors():
    g = torch.Generator().manual_seed(0)
    draws = [ans.sample_levels(256, p_drop_audio=0.3, p_drop_ref=0.1, p_start=0, anchor_noise=0.05, generator=g)
             for _ in range(20)]
    rate_a = torch.cat([d.drop_audio for d in draws]).float().mean()
    rate_r = torch.cat([d.drop_ref for d in draws]).float().mean()
    assert abs(rate_a - 0.3) < 0.03 and abs(rate_r - 0.1) < 0.02
    anchors = torch.cat([d.levels[:, :2] for d in draws])
    assert (anchors >= 0).all() and (anchors < 0.05).all() and anchors.std() > 0


def inference_patterns(levels, M, lookahead):
    """(n_anchors, window levels) of every model call the sampler makes on a schedule."""
    spy = Spy()
    run(spy, levels, torch.zeros(1, 1, levels.shape[1], 1, 1), M=M, lookahead=lookahead)
    out = set()
    for _, lv, _, _ in spy.inputs:
        a = int((lv[0] == 0).long().cumprod(0).sum())  # anchors are the leading clean frames
        out.add((a, tuple(lv[0, a:].tolist())))
    return out


@pytest.mark.parametrize("n,W,M,S", [(2, 2, 2, 8), (1, 2, 1, 4), (2, 3, 3, 6)])
def test_every_level_pattern_met_at_inference_has_training_support(n, W, M, S):
    """Draw many training patterns; each inference pattern must have close training draws
    with the same layout (number of anchors and frames). Probabilities are raised so the
    test is quick; the support does not depend on them as long as they are positive."""
    g, drawn = torch.Generator().manual_seed(0), {}
    for _ in range(3000):
        d = ans.sample_levels(16, n=n, W=W, M=M, generator=g, p_sync=0.5, p_start=0.5, p_end=0.5)
        drawn.setdefault((d.n_anchors, d.levels.shape[1] - d.n_anchors), []).append(d.levels[:, d.n_anchors:])
    drawn = {k: torch.cat(v) for k, v in drawn.items()}
    for F in range(1, 4 * W * n):
        for name, (levels, lookahead, _) in all_schedules(F, n, W, S).items():
            if name in ("rolling", "pyramid"):
                continue  # those need a model trained with n = 1 clips
            for a, lv in inference_patterns(levels, M, lookahead):
                key = (a, len(lv))
                assert key in drawn, f"{name}, F={F}: layout {key} never drawn in training"
                gap = (drawn[key] - torch.tensor(lv)).abs().amax(1).min()
                assert gap < 0.02, f"{name}, F={F}: levels {lv} with {a} anchors are {gap:.3f} from any draw"


# ----------------------------------------------------------------------------- long-video sampler

@pytest.mark.parametrize("prediction", ["x0", "v"])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_an_oracle_model_makes_every_schedule_reproduce_x0(prediction, solver):
    g = torch.Generator().manual_seed(0)
    for F, n, W, S in [(1, 2, 2, 8), (7, 2, 2, 8), (10, 3, 3, 6), (9, 1, 4, 4)]:
        x0 = torch.randn(2, 3, F, 2, 2, generator=g)
        for name, (levels, lookahead, _) in all_schedules(F, n, W, S).items():
            oracle = ans.Oracle(x0, prediction)
            for cfg_scale in (1.0, 3.0):
                out, _ = run(oracle, levels, x0, M=2, lookahead=lookahead, solver=solver, cfg_scale=cfg_scale)
                torch.testing.assert_close(out, x0, atol=1e-5, rtol=0, msg=f"{name} F={F}")


def test_frames_outside_the_active_window_are_never_touched():
    """A frame enters the window as its own seeded noise, and once finished it comes back
    as an anchor bit-identical to what was yielded, whatever the model does."""
    F, n, W, S, M = 9, 2, 2, 8, 2
    for name, (levels, lookahead, _) in all_schedules(F, n, W, S).items():
        spy = Spy()
        out, _ = run(spy, levels, torch.zeros(2, 3, F, 2, 2), M=M, lookahead=lookahead, seed=7)
        first_seen = {}
        for m, win in enumerate(w for w in ans.step_windows(levels, M, lookahead) if w is not None):
            x = spy.inputs[m][0]
            for i, f in enumerate(range(win.anchors.start, win.active.stop)):
                if f < win.active.start:
                    assert torch.equal(x[:, :, i], out[:, :, f]), f"{name}: anchor {f} changed"
                elif f not in first_seen:
                    first_seen[f] = True
                    assert torch.equal(x[:, :, i:i + 1], ans.frame_noise(7, f, (2, 3, 1, 2, 2))), f"{name}: {f}"
        assert sorted(first_seen) == list(range(F))


def whole_video_reference(model, levels, speech, reference, M, seed, solver):
    """The readable reference: hold every frame, call the model on each step's window and
    move it with to_velocity + euler_step / heun_step. No streaming, no fused update."""
    B, F, _ = speech.shape
    C, h, w = reference.shape[1], reference.shape[3], reference.shape[4]
    x = torch.cat([ans.frame_noise(seed, f, (B, C, 1, h, w)) for f in range(F)], dim=2)  # (B, C, F, h, w)
    for m, win in enumerate(ans.step_windows(levels, M)):
        if win is None:
            continue
        tau = torch.cat([torch.zeros(win.active.start - win.anchors.start), levels[m, win.active]])
        tau_next = torch.cat([torch.zeros(win.active.start - win.anchors.start), levels[m + 1, win.active]])
        xw, a = x[:, :, win.frames], speech[:, win.frames]
        v = ans.to_velocity(xw, model(xw, tau.expand(B, -1), a, reference), tau.expand(B, -1))
        xe = ans.euler_step(xw, v, tau, tau_next)
        if solver == "heun" and ((tau_next != tau) & (tau_next > 0)).any():
            v2 = ans.to_velocity(xe, model(xe, tau_next.expand(B, -1), a, reference), tau_next.expand(B, -1))
            xe = ans.heun_step(xw, v, v2, tau, tau_next)
        x[:, :, win.frames] = xe
    return x


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_the_streaming_sampler_equals_a_plain_whole_video_loop(solver):
    F, n, W, S, M = 11, 2, 2, 8, 2
    speech, reference = torch.randn(2, F, 4), torch.randn(2, 3, 1, 2, 2)
    for name in ("synchronous", "asynchronous", "rolling", "pyramid"):
        levels = all_schedules(F, n, W, S)[name][0]
        clips = ans.generate_latents(Spy(), speech, reference, levels, n_anchors=M, seed=5, solver=solver,
                                     progress=False)
        out = torch.cat([c for _, c in clips], dim=2)
        ref = whole_video_reference(Spy(), levels, speech, reference, M, 5, solver)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_clips_are_yielded_in_order_as_soon_as_they_finish():
    F, n, W, S = 9, 2, 2, 8
    levels = ans.asynchronous(F, n, W, S)
    spy = ans.CountCalls(Spy())
    calls_at_yield, first = [], []
    speech = torch.zeros(1, F, 4)
    for f0, clip in ans.generate_latents(spy, speech, torch.zeros(1, 3, 1, 2, 2), levels, progress=False):
        calls_at_yield.append(spy.calls)
        first.append((f0, clip.shape[2]))
    assert first == [(0, 2), (2, 2), (4, 2), (6, 2), (8, 1)]
    assert calls_at_yield == [S, S + S // W, S + 2 * S // W, S + 3 * S // W, S + 4 * S // W]


def test_results_do_not_depend_on_the_length_of_the_video():
    n, W, S = 2, 2, 8
    out = {}
    for F in (8, 15):
        spy = Spy()
        out[F], _ = run(spy, ans.asynchronous(F, n, W, S), torch.zeros(1, 3, F, 2, 2), seed=3)
    # clips 0..2 only ever meet clips 0..3, which both videos have
    assert torch.equal(out[8][:, :, :6], out[15][:, :, :6])


def test_the_model_sees_a_bounded_window_and_its_calls_are_counted():
    F, n, W, S, M = 40, 2, 2, 8, 2
    for name, (levels, lookahead, _) in all_schedules(F, n, W, S).items():
        for solver in ("euler", "heun"):
            counted = ans.CountCalls(Spy())
            run(counted, levels, torch.zeros(1, 3, F, 2, 2), M=M, lookahead=lookahead, solver=solver)
            assert counted.calls == ans.count_calls(levels, solver), name
            assert max(x.shape[2] for x, *_ in counted.model.inputs) <= M + max(W * n, 2 * S)


def test_guidance_batches_the_conditional_and_null_audio_passes_in_one_call():
    class Muted(Spy):  # predicts x0 = 0 with audio, x0 = 1 without
        def __call__(self, x, levels, audio, reference, drop_audio=None, drop_ref=None):
            super().__call__(x, levels, audio, reference, drop_audio)
            mask = torch.zeros(x.shape[0], dtype=torch.bool) if drop_audio is None else drop_audio
            return mask.float().view(-1, 1, 1, 1, 1).expand_as(x).clone()

    levels = ans.synchronous(2, 2, 1)  # a single step straight to τ = 0
    for cfg_scale, expect in ((1.0, 0.0), (3.0, -2.0)):  # x0 = 1 + s·(0 - 1)
        spy = Muted()
        out, _ = run(spy, levels, torch.zeros(2, 3, 2, 2, 2), cfg_scale=cfg_scale)
        assert len(spy.inputs) == 1
        x, _, _, drop = spy.inputs[0]
        if cfg_scale == 1:
            assert x.shape[0] == 2 and drop is None
        else:
            assert x.shape[0] == 4 and drop.tolist() == [False, False, True, True]
        torch.testing.assert_close(out, torch.full_like(out, expect))


def test_bad_inputs_get_clear_errors():
    levels, ref = ans.asynchronous(6, 2, 2, 8), torch.zeros(1, 3, 1, 2, 2)
    bad = [((Spy(), torch.zeros(1, 6), ref, levels), "speech_latents must be"),
           ((Spy(), torch.zeros(1, 5, 4), ref, levels), "build it for F"),
           ((Spy(), torch.zeros(1, 6, 4), torch.zeros(1, 3, 2, 2), levels), "reference_latent must be"),
           ((Spy("eps"), torch.zeros(1, 6, 4), ref, levels), "prediction must be")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            next(ans.generate_latents(*args, progress=False))
    with pytest.raises(ValueError, match="solver"):
        next(ans.generate_latents(Spy(), torch.zeros(1, 6, 4), ref, levels, solver="rk4", progress=False))
