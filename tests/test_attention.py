import json

import pytest
import torch

from minread import attention as A
from minread.attention import (and_masks, attention, audio_window, block_mask, block_sparsity,
                               clip_causal, dense_mask, frame_causal, full, or_masks,
                               reference_visible)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# Plain-Python statements of each mask, written from the definitions (not from the code).
def brute_frame_causal(n):
    return lambda q, k: k // n <= q // n


def brute_clip_causal(n, c, p):
    def clip(i):
        f = i // n
        return -1 if f < p else (f - p) // c
    return lambda q, k: clip(k) <= clip(q)


def brute_audio_window(n, r, o=0, m=1):
    return lambda q, k: q >= o and abs((q - o) // n - k // m) <= r


CASES = {  # name: (mask, brute force, Lq, Lkv); lengths are not multiples of 128
    "full": (full(), lambda q, k: True, 200, 200),
    "frame_causal": (frame_causal(16), brute_frame_causal(16), 200, 200),
    "clip_causal+ref": (or_masks(clip_causal(16, 2, 3), reference_visible(16)),
                        lambda q, k: brute_clip_causal(16, 2, 3)(q, k) or k < 16, 200, 200),
    "audio_window": (audio_window(16, 1, q_offset=16), brute_audio_window(16, 1, 16), 200, 12),
    "audio_window_long": (audio_window(8, 2, kv_tokens_per_frame=8), brute_audio_window(8, 2, 0, 8),
                          300, 260),
    "and": (and_masks(frame_causal(4), audio_window(4, 1, kv_tokens_per_frame=4)),
            lambda q, k: k // 4 <= q // 4 and abs(q // 4 - k // 4) <= 1, 150, 150),
}


def qkv(lq, lkv, hd=32, b=2, nh=2, grad=False):
    q = torch.randn(b, nh, lq, hd, requires_grad=grad)
    k = torch.randn(b, nh, lkv, hd, requires_grad=grad)
    v = torch.randn(b, nh, lkv, hd, requires_grad=grad)
    return q, k, v


@pytest.mark.parametrize("name", list(CASES))
def test_masks_match_brute_force(name):
    mask, brute, lq, lkv = CASES[name]
    lq, lkv = min(lq, 70), min(lkv, 60)
    want = torch.tensor([[brute(q, k) for k in range(lkv)] for q in range(lq)])
    assert torch.equal(dense_mask(mask, lq, lkv), want)


@pytest.mark.parametrize("name", list(CASES))
def test_block_mask_tiles_match_dense(name):
    mask, _, lq, lkv = CASES[name]
    kind, _ = block_sparsity(mask, lq, lkv)
    bm = block_mask(mask, lq, lkv)
    assert torch.equal(bm.to_dense()[0, 0].bool(), kind > 0)


def run(impl, mask, lq, lkv, hd, grad=True):
    """Output and q, k, v gradients of one implementation on fixed inputs."""
    torch.manual_seed(0)
    q, k, v = qkv(lq, lkv, hd, grad=grad)
    fn = impl if callable(impl) else (lambda q, k, v, m: attention(q, k, v, m, impl))
    out = fn(q, k, v, mask)
    if not grad:
        return (out,)
    (out * torch.linspace(-1, 1, hd)).sum().backward()
    return out, q.grad, k.grad, v.grad


def assert_same(got, want, what):
    for g, w, part in zip(got, want, ("out", "dq", "dk", "dv")):
        assert torch.isfinite(g).all(), (what, part)
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=f"{what} {part}")


@pytest.mark.parametrize("hd", [16, 32, 64])
@pytest.mark.parametrize("name", list(CASES))
def test_math_blockwise_and_flex_eager_match_sdpa(name, hd):
    mask, _, lq, lkv = CASES[name]
    want = run("sdpa", mask, lq, lkv, hd)
    assert_same(run("math", mask, lq, lkv, hd), want, "math")
    assert_same(run("blockwise", mask, lq, lkv, hd), want, "blockwise")
    assert_same(run("flex_eager", mask, lq, lkv, hd, grad=False), want[:1], "flex_eager")


@pytest.mark.parametrize("name", list(CASES))
def test_flex_eager_gradients_match_sdpa(name, monkeypatch):
    # torch 2.13 refuses FlexAttention backward on CPU up front, although its eager
    # (unfused) backward is device independent; lift that guard to check the gradients.
    flex_module = pytest.importorskip("torch.nn.attention.flex_attention")
    if not hasattr(flex_module, "_validate_device"):
        pytest.skip("this torch has no CPU guard to lift")
    monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    mask, _, lq, lkv = CASES[name]
    flex_eager = lambda q, k, v, m: A.flex(q, k, v, m, compiled=False)  # noqa: E731
    assert_same(run(flex_eager, mask, lq, lkv, 32), run("sdpa", mask, lq, lkv, 32), "flex_eager")


def test_rows_without_keys_output_zero_and_pass_no_gradient():
    mask = audio_window(16, 1, q_offset=16)  # the first 16 queries see no speech token
    for impl in ("sdpa", "math", "blockwise"):
        q, k, v = qkv(40, 5, grad=True)
        out = attention(q, k, v, mask, impl)
        out.sum().backward()
        assert out[:, :, :16].abs().max() == 0, impl
        assert q.grad[:, :, :16].abs().max() == 0, impl
        assert out[:, :, 16:].abs().min() > 0, impl


def test_compiled_flex_forward_matches_sdpa():
    # Two compiled shapes only (each compile takes seconds); the sweep is marked slow.
    for name in ("clip_causal+ref", "audio_window"):
        mask, _, lq, lkv = CASES[name]
        q, k, v = qkv(lq, lkv)
        with torch.no_grad():
            torch.testing.assert_close(attention(q, k, v, mask, "flex"),
                                       attention(q, k, v, mask, "sdpa"), atol=2e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("hd", [16, 32, 64])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_flex_forward_sweep(name, hd):
    mask, _, lq, lkv = CASES[name]
    q, k, v = qkv(lq, lkv, hd)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, mask, "flex"),
                                   attention(q, k, v, mask, "sdpa"), atol=2e-5, rtol=1e-4)


def test_block_mask_cache_identity():
    a = block_mask(frame_causal(16), 200, 200)
    assert block_mask(frame_causal(16), 200, 200) is a  # a fresh closure, same key
    assert block_mask(frame_causal(16), 216, 200) is not a
    assert block_mask(frame_causal(8), 200, 200) is not a
    assert dense_mask(frame_causal(16), 200) is dense_mask(frame_causal(16), 200)
    assert block_mask(frame_causal(16), 216, 200).seq_lengths == (216, 200)


def test_user_mask_without_key_is_cached_by_identity():
    def diagonal(b, h, q_idx, kv_idx):
        return q_idx == kv_idx
    assert block_mask(diagonal, 64, 64) is block_mask(diagonal, 64, 64)
    q, k, v = qkv(64, 64)
    torch.testing.assert_close(attention(q, k, v, diagonal, "sdpa"), v)


def test_frame_causal_attention_is_causal():
    q, k, v = qkv(64, 64)
    out = attention(q, k, v, frame_causal(16), "auto")
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 48:] += 1.0
    v2[:, :, 48:] += 1.0
    out2 = attention(q, k2, v2, frame_causal(16), "auto")
    assert torch.equal(out[:, :, :48], out2[:, :, :48])
    assert not torch.allclose(out[:, :, 48:], out2[:, :, 48:])


def test_auto_choice_on_cpu():
    q, k, _ = qkv(112, 112)
    m = frame_causal(16)
    assert A.choose_impl(q, k, None) == "sdpa"
    assert A.choose_impl(q, k, m, needs_grad=True) == "sdpa"
    assert A.choose_impl(q, k, m) == "sdpa"  # small: fixed overhead of a compiled call wins
    big_q, big_k, _ = qkv(2048, 2048, b=1, nh=1)
    sparse = audio_window(16, 1, kv_tokens_per_frame=16)  # 18% of tiles computed
    assert A.choose_impl(big_q, big_k, sparse) == "flex"
    assert A.choose_impl(big_q, big_k, sparse, needs_grad=True) == "sdpa"
    assert A.choose_impl(big_q, big_k, full()) == "sdpa"
    assert A.choose_impl(big_q, big_k, frame_causal(16)) == "sdpa"  # 53% of tiles: no gain


def test_bad_input_raises_clear_errors():
    q, k, v = qkv(16, 16)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="fast")
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="shapes"):
        attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="mask_mod"):
        attention(q, k, v, mask=torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="tokens_per_frame"):
        frame_causal(0)
    q, k, v = qkv(16, 16, grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention(q, k, v, frame_causal(4), impl="flex")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_compiled_flex_matches_sdpa_forward_and_grads(name):
    mask, _, lq, lkv = CASES[name]
    results = {}
    for impl in ("sdpa", "flex"):
        torch.manual_seed(0)
        q, k, v = (t.cuda().detach().requires_grad_() for t in qkv(lq, lkv, 64))
        out = attention(q, k, v, mask, impl)
        out.square().sum().backward()
        results[impl] = (out, q.grad, k.grad, v.grad)
    for want, got in zip(results["sdpa"], results["flex"]):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)
    assert A.choose_impl(q, k, mask) == ("sdpa" if name == "full" else "flex")


@cuda
@pytest.mark.gpu
def test_cuda_flex_kernel_options_keep_the_result(monkeypatch):
    """Other tile sizes (what `bench attention --kernel-options` sweeps) change speed only."""
    mask, _, lq, lkv = CASES["clip_causal+ref"]
    q, k, v = (t.cuda().detach().requires_grad_() for t in qkv(lq, lkv, 64))
    want = attention(q, k, v, mask, "sdpa")
    monkeypatch.setattr(A, "KERNEL_OPTIONS", {"BLOCK_M": 64, "BLOCK_N": 64})
    got = attention(q, k, v, mask, "flex")
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-3)
    got.square().sum().backward()
    assert torch.isfinite(q.grad).all()


def test_compiled_flex_with_kernel_options_matches_sdpa(monkeypatch):
    mask, _, lq, lkv = CASES["audio_window"]
    q, k, v = qkv(lq, lkv)
    monkeypatch.setattr(A, "KERNEL_OPTIONS", {"BLOCK_M": 64, "BLOCK_N": 64})
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, mask, "flex"),
                                   attention(q, k, v, mask, "sdpa"), atol=2e-5, rtol=1e-4)


def test_masks_cached_under_inference_mode_serve_training():
    """A mask first built inside torch.inference_mode is reused by a later backward pass."""
    A.clear_cache()
    mask = A.audio_window(4, 1, q_offset=4)         # rows before q_offset see no key
    q, kv = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 2, 16)
    for impl in ("sdpa", "math"):
        with torch.inference_mode():
            attention(q, kv, kv, mask, impl=impl)
        q_grad = q.clone().requires_grad_(True)
        attention(q_grad, kv, kv, mask, impl=impl).sum().backward()
        assert q_grad.grad is not None and torch.isfinite(q_grad.grad).all()


def test_bench_times_each_kernel_setting_side_by_side(capsys):
    from minread.bench import attention as bench
    bench.main(["--device", "cpu", "--quick", "--lengths", "256", "--masks", "clip_causal",
                "--kernel-options", "{}", '{"BLOCK_M": 64, "BLOCK_N": 64}'])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = figures["rows"][0]
    assert row["flex"]["ms"] > 0 and row["flex@1"]["ms"] > 0
    assert row["flex@1/sdpa"] == pytest.approx(row["flex@1"]["ms"] / row["sdpa"]["ms"])
    assert figures["kernel_options"] == [{}, {"BLOCK_M": 64, "BLOCK_N": 64}]
    assert A.KERNEL_OPTIONS == {}                    # the settings of the run do not outlive it


@cuda
@pytest.mark.gpu
def test_cuda_bench_times_unmasked_sdpa_kernels(capsys):
    from minread.bench import attention as bench
    bench.main(["--device", "cuda", "--lengths", "1024", "--masks", "full", "--modes", "fwd",
                "--math-max-length", "1"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"][0]
    assert row["sdpa_flash"]["ms"] > 0 and row["sdpa_nomask"]["ms"] > 0
    assert row["flex"]["queued_ms"] > 0 and row["flex"]["host_ms"] > 0
    assert row["flex/sdpa queued"] == pytest.approx(row["flex"]["queued_ms"] / row["sdpa"]["queued_ms"])
    assert row["sdpa_nomask_backend"] in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def test_bench_queued_timing_divides_event_time_by_calls(monkeypatch):
    """timeit_queued (CUDA): calls issued back to back, one event pair per round; the
    GPU figure is the events' elapsed time over the calls, the host figure the issue time."""
    from minread.bench import attention as bench

    class Event:  # stands in for torch.cuda.Event: 20 ms between a round's start and end
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            Event.clock += 20.0
            self.t = Event.clock

        def elapsed_time(self, end):
            return end.t - self.t

    calls = []
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    gpu_ms, host_ms = bench.timeit_queued(lambda: calls.append(1), seconds_per_call=0.004, budget_s=0.1)
    assert len(calls) == 3 * (1 + 25)                 # 0.1 s / 4 ms = 25 timed calls a round after one untimed
    assert gpu_ms == pytest.approx(20.0 / 25)         # 20 ms of events over 25 calls
    assert 0 < host_ms < 5
    gpu_ms, _ = bench.timeit_queued(lambda: None, seconds_per_call=1.0)
    assert gpu_ms == pytest.approx(20.0 / 10)         # never fewer than 10 calls a round
