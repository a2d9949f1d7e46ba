import math
import numpy as np
import pytest
import torch

from minread import data, metrics


@pytest.fixture(scope="module")
def clip():
    """A babble clip at 32 px as tensors: video (3, T, H, W), the truth and a reference frame."""
    c = data.render_clip(21, None, size=32, seed=5, source="babble")
    video = data.to_tensor(c["video"], 32)
    ref = data.to_tensor(data.render_frames(data.sample_identity(21), np.zeros(1, np.float32),
                                            np.zeros(1, np.float32), np.zeros(1, np.float32),
                                            np.zeros((1, 2), np.float32), 32), 32)[:, 0]
    return dict(video=video, reference=ref, **{k: torch.as_tensor(c[k]) for k in
                                               ("opening", "closed", "viseme")}), c


def test_truth_scores_perfectly(clip):
    sample, _ = clip
    m = metrics.clip_metrics(sample["video"], sample)
    assert m["lip_corr"] > 0.95 and 0.75 < m["amplitude_ratio"] < 1.25 and m["lip_mae"] < 0.1
    assert m["av_offset"] == 0 and m["av_confidence"] > 0.3
    assert m["psnr"] == float("inf") and m["identity_error"] < 0.1


def test_shift_by_three_frames_is_recovered(clip):
    sample, _ = clip
    read = metrics.read_opening(sample["video"], sample["reference"])
    late = torch.cat([read[:1].repeat(3), read[:-3]])                      # video 3 frames late
    offset, conf = metrics.av_offset(late, sample["opening"])
    assert offset == 3 and conf > 0.3
    early = torch.cat([read[3:], read[-1:].repeat(3)])
    assert metrics.av_offset(early, sample["opening"])[0] == -3
    assert metrics.lip_corr(late, sample["opening"]) < metrics.lip_corr(read, sample["opening"]) - 0.2


def test_shuffled_frames_do_not_correlate(clip):
    sample, _ = clip
    g = torch.Generator().manual_seed(0)
    rs = []
    for _ in range(5):
        perm = torch.randperm(sample["video"].shape[1], generator=g)
        rs.append(metrics.lip_corr(metrics.read_opening(sample["video"][:, perm]), sample["opening"]))
    assert abs(float(np.mean(rs))) < 0.2 and max(abs(r) for r in rs) < 0.35


def test_amplitude_ratio_sees_a_mouth_that_barely_moves(clip):
    _, c = clip
    ident = data.sample_identity(21)
    half = data.render_frames(ident, c["opening"] * 0.5, c["spread"], c["blink"], c["head"], 32)
    read = metrics.read_opening(data.to_tensor(half, 32))
    truth = torch.from_numpy(c["opening"])
    assert metrics.lip_corr(read, truth) > 0.9                            # r alone looks fine
    assert 0.35 < metrics.amplitude_ratio(read, truth) < 0.65             # the ratio does not


def test_reference_calibrates_face_size():
    """Two faces of different widths read the same opening once the reference is used."""
    small = next(data.sample_identity(s) for s in range(1000) if data.sample_identity(s).face_rx < 0.27)
    big = next(data.sample_identity(s) for s in range(1000) if data.sample_identity(s).face_rx > 0.32)
    opening = np.linspace(0, 1, 11, dtype=np.float32)
    reads = []
    for ident in (small, big):
        frames = data.render_frames(ident, opening, 0 * opening, 0 * opening, np.zeros((11, 2), np.float32), 64)
        video = data.to_tensor(frames, 64)
        reads.append(metrics.read_opening(video, video[:, 0]))
    assert (reads[0] - reads[1]).abs().max() < 0.1
    assert (reads[0] - torch.from_numpy(opening)).abs().max() < 0.12


def test_closure_f1_frames():
    closed = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    read = torch.tensor([0.5, 0.0, 0.03, 0.6, 0.7, 0.04, 0.5, 0.4])
    assert metrics.closure_f1_frames(read, closed) == 1.0
    assert metrics.closure_f1_frames(torch.full((8,), 0.5), closed) == 0.0
    assert metrics.closure_f1_frames(torch.zeros(8), closed) == pytest.approx(2 * 3 / (8 + 3))


def _closure_f1_loops(read, closed, speaking, threshold=0.05, tol=1):
    """closure_f1 written out frame by frame, as the reference."""
    T = len(read)
    pred = [bool(read[t] < threshold and speaking[t]) for t in range(T)]
    cl = [bool(closed[t] and speaking[t]) for t in range(T)]
    sounds, t = [], 0
    while t < T:
        if cl[t]:
            a = t
            while t + 1 < T and cl[t + 1]:
                t += 1
            sounds.append((a, t))
        t += 1
    if not sounds:
        return float("nan")
    if not any(pred):
        return 0.0
    found = sum(any(pred[u] for u in range(T) if a - tol <= u <= b + tol) for a, b in sounds)
    right = sum(1 for u in range(T) if pred[u] and any(a - tol <= u <= b + tol for a, b in sounds))
    p, r = right / sum(pred), found / len(sounds)
    return 2 * p * r / (p + r) if p + r else 0.0


def test_closure_f1():
    closed = torch.tensor([0, 1, 1, 0, 0, 0, 0, 1, 0, 0], dtype=torch.bool)
    read = torch.tensor([0.5, 0.0, 0.03, 0.6, 0.7, 0.5, 0.5, 0.04, 0.5, 0.4])
    assert metrics.closure_f1(read, closed) == 1.0
    late = torch.tensor([0.5, 0.5, 0.0, 0.03, 0.7, 0.5, 0.5, 0.5, 0.04, 0.4])  # each closure 1 frame late
    assert metrics.closure_f1(late, closed) == 1.0
    assert metrics.closure_f1_frames(late, closed) < 0.6                   # the strict reading pays twice
    missed = torch.tensor([0.5, 0.0, 0.03, 0.6, 0.7, 0.5, 0.5, 0.5, 0.5, 0.04])  # the second 2 frames late
    assert metrics.closure_f1(missed, closed) == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert metrics.closure_f1(torch.full((10,), 0.5), closed) == 0.0
    # a mouth that never opens: recall 1, precision 7/10 (the frames within one frame of a sound)
    assert metrics.closure_f1(torch.zeros(10), closed) == pytest.approx(2 * 0.7 / 1.7)
    assert torch.isnan(torch.tensor(metrics.closure_f1(read, torch.zeros(10, dtype=torch.bool))))
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        T = int(torch.randint(5, 30, (1,), generator=gen))
        read = torch.rand(T, generator=gen) * (torch.rand(T, generator=gen) > 0.5)
        closed = torch.rand(T, generator=gen) > 0.7
        speaking = torch.rand(T, generator=gen) > 0.2
        want = _closure_f1_loops(read, closed, speaking)
        got = metrics.closure_f1(read, closed, speaking)
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want)


def test_identity_error_grows_for_another_face(clip):
    sample, _ = clip
    other = data.to_tensor(data.render_clip(22, None, size=32, seed=5, source="babble")["video"], 32)
    own = metrics.identity_error(sample["video"], sample["reference"])
    assert metrics.identity_error(other, sample["reference"]) > own + 0.1


def test_seam_ratio_and_psnr():
    video = torch.zeros(3, 8, 4, 4)
    video[:, 4:] = 0.5                                                      # a jump at frame 4
    video += torch.linspace(0, 0.07, 8)[None, :, None, None]               # slow drift inside clips
    assert metrics.seam_ratio(video, [4]) > 10
    smooth = torch.linspace(0, 1, 8)[None, :, None, None].expand(3, 8, 4, 4)
    assert metrics.seam_ratio(smooth, [4]) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="boundary"):
        metrics.seam_ratio(video, [0])
    a = torch.zeros(3, 2, 4, 4)
    assert metrics.psnr(a, a + 0.2) == pytest.approx(10 * np.log10(4 / 0.04))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\(3, T, H, W\)"):
        metrics.read_opening(torch.zeros(1, 3, 4, 8, 8))
    with pytest.raises(ValueError, match="frames"):
        metrics.av_offset(torch.zeros(10), torch.zeros(10))
