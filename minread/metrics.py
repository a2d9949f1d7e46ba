"""Toy lip-sync, identity and reconstruction metrics, each a function of tensors (DESIGN.md §9).

Nothing here is the READ paper's (it reports FID, FVD, Sync-C/D, etc. on HDTF and
MEAD); these are our exactly measurable stand-ins on the toy world:

- `read_opening`: the mouth opening read back from frames: the interior is drawn in a
  reserved green (`data.MOUTH`) no palette comes near, so per column the soft count of
  green pixels is the interior height; the tallest column over the identity's face
  width (estimated from the reference frame) gives the opening in label units;
- LipCorr (Pearson r with the true opening), amplitude ratio (r alone hides a mouth that
  barely moves), LipMAE, audio-visual offset and confidence (cross-correlation over
  +-8 frames), closure F1 on lips-closed sounds, identity error against the reference,
  seam ratio at clip boundaries, PSNR; `clip_metrics` gathers them for one clip.

Tracks are 1-D tensors (T,); videos (3, T, H, W) in [-1, 1]; frames (3, H, W).
"""

import torch

from minread.data import MOUTH, OPEN_GAIN

NOMINAL_FACE_RX = 0.295          # mid-range face half-width, used when no reference is given
GREEN_FLOOR = 0.1                # palettes stay below this greenness; the interior is 0.7


def _rgb(x):
    return (x.float().clamp(-1, 1) + 1) / 2                   # [-1, 1] -> [0, 1]


def mouth_mask(video):
    """Soft mouth-interior membership in [0, 1]: (3, ..., H, W) -> (..., H, W)."""
    r, g, b = _rgb(video).unbind(0)
    green = g - torch.maximum(r, b)
    top = MOUTH[1] - max(MOUTH[0], MOUTH[2])
    return ((green - GREEN_FLOOR) / (top - GREEN_FLOOR)).clamp(0, 1)


def face_stats(frame):
    """Background colour, skin colour (3,) and face half-width (frame units) of one frame (3, H, W)."""
    rgb = _rgb(frame)
    _, H, W = rgb.shape
    k = max(1, H // 16)
    corners = torch.cat([rgb[:, :k, :k], rgb[:, :k, -k:], rgb[:, -k:, :k], rgb[:, -k:, -k:]], 1)
    background = corners.reshape(3, -1).median(1).values
    box = rgb[:, int(0.42 * H):int(0.6 * H), int(0.32 * W):int(0.68 * W)]
    skin = box.reshape(3, -1).median(1).values
    near = (rgb - skin[:, None, None]).abs().sum(0) < 0.15                    # (H, W)
    cols = torch.arange(W, dtype=torch.float32)
    rows = near[int(0.3 * H):int(0.75 * H)]
    if not rows.any():
        return dict(background=background, skin=skin, face_rx=torch.tensor(NOMINAL_FACE_RX))
    left = torch.where(rows, cols, torch.tensor(float(W))).min(1).values
    right = torch.where(rows, cols, torch.tensor(-1.0)).max(1).values
    width = (right - left + 2).clamp(min=0).max() / W     # + the two blended edge pixels
    return dict(background=background, skin=skin, face_rx=width / 2)


def read_opening(video, reference=None):
    """Mouth opening read back from frames: (3, T, H, W) [-1, 1] -> (T,) in label units.

    The interior of height 2 * OPEN_GAIN * face_rx * opening (frame units) is measured
    as the tallest column of soft green membership; face_rx comes from `reference`
    (3, H, W) when given, else a nominal value.
    """
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be (3, T, H, W), got {tuple(video.shape)}")
    H = video.shape[-2]
    heights = mouth_mask(video).sum(-2) / H                     # (T, W) interior height per column
    height = heights.topk(min(2, heights.shape[-1]), dim=-1).values.mean(-1)  # (T,)
    face_rx = NOMINAL_FACE_RX if reference is None else float(face_stats(reference)["face_rx"])
    return height / (2 * OPEN_GAIN * face_rx)


def _pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = (a.square().sum() * b.square().sum()).sqrt()
    return float((a * b).sum() / den) if den > 0 else 0.0


def lip_corr(read, true):
    """LipCorr: Pearson r between read-back and true opening tracks (T,)."""
    return _pearson(read, true)


def amplitude_ratio(read, true):
    """How far the mouth moves against the truth: std(read) / std(true); 1 is right."""
    s = float(true.double().std())
    return float(read.double().std()) / s if s > 0 else float("nan")


def lip_mae(read, true):
    """Mean absolute error between read-back and true opening (label units)."""
    return float((read.double() - true.double()).abs().mean())


def av_offset(read, true, max_shift=8):
    """Audio-visual offset in frames (> 0: video lags audio) and its confidence.

    r(k) = Pearson(read[t + k], true[t]) for |k| <= max_shift; offset = argmax r(k);
    confidence = max r - median r (SyncNet's convention), near 0 for unrelated tracks.
    """
    T = len(true)
    if T <= 2 * max_shift + 2:
        raise ValueError(f"av_offset needs more than {2 * max_shift + 2} frames, got {T}")
    rs = []
    for k in range(-max_shift, max_shift + 1):
        a = read[max(k, 0):T + min(k, 0)]
        b = true[max(-k, 0):T - max(k, 0)]
        rs.append(_pearson(a, b))
    rs = torch.tensor(rs)
    return int(rs.argmax()) - max_shift, float(rs.max() - rs.median())


def _runs(mask):
    """Maximal runs of True in a (T,) bool tensor -> [(first, last)] frame indices."""
    edges = torch.diff(torch.cat([mask.new_zeros(1), mask, mask.new_zeros(1)]).int())
    starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
    return [(int(a), int(b) - 1) for a, b in zip(starts, ends)]


def closure_f1(read, closed, speaking=None, threshold=0.05, tolerance=1):
    """F1 of lips closing on lips-closed sounds (m, b, p): did the mouth close for each one,
    and does it close only there?

    A lips-closed sound is a run of `closed` frames (T,) bool; it is found when the read
    opening drops below `threshold` within `tolerance` frames of it (recall, per sound). A
    frame read closed is right when it lies within `tolerance` frames of such a sound
    (precision, per frame: a mouth that closes where speech opens it loses in proportion to
    how long it does). Only `speaking` frames count (pass viseme > 0 to leave silences out,
    where lips rest closed too); NaN where a clip has no such sound. The true frames of 16 of
    data_toy's held-out clips score 0.83 (recall 1.0, precision 0.73: /f/, /v/, /w/ are nearly
    closed too and read closed at 32 px), a mouth that never opens 0.44.
    """
    speaking = torch.ones_like(closed, dtype=torch.bool) if speaking is None else speaking.bool()
    pred = (read < threshold) & speaking
    sounds = _runs(closed.bool() & speaking)
    if not sounds:
        return float("nan")
    if not pred.any():
        return 0.0
    near, found = torch.zeros_like(pred), 0                   # frames within tolerance of a sound
    for a, b in sounds:
        window = slice(max(0, a - tolerance), b + tolerance + 1)
        near[window] = True
        found += bool(pred[window].any())
    recall = found / len(sounds)
    precision = float((pred & near).sum()) / float(pred.sum())
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def closure_f1_frames(read, closed, speaking=None, threshold=0.05):
    """The strict per-frame F1 of 'lips closed' (read < threshold) against `closed` frames.

    Every frame counts on its own, so a closure one frame early or late costs twice, and the
    frames of /f/, /v/, /w/ that read closed at 32 px count as errors even in the truth: the
    true frames of data_toy's 24 held-out clips score only 0.61 (precision 0.48, recall 0.94),
    the tiny VAE's reconstructions 0.52. Kept beside `closure_f1` as the harder reading.
    """
    speaking = torch.ones_like(closed, dtype=torch.bool) if speaking is None else speaking.bool()
    pred, true = (read < threshold) & speaking, closed.bool() & speaking
    tp = float((pred & true).sum())
    denom = float(pred.sum() + true.sum())
    return 2 * tp / denom if denom > 0 else float("nan")


def identity_error(video, reference):
    """Colour (background, skin: mean abs) + face-width (relative) error of frames vs reference."""
    ref = face_stats(reference)
    errs = []
    for t in range(video.shape[1]):
        s = face_stats(video[:, t])
        errs.append(float((s["background"] - ref["background"]).abs().mean()
                          + (s["skin"] - ref["skin"]).abs().mean()
                          + (s["face_rx"] - ref["face_rx"]).abs() / ref["face_rx"]))
    return sum(errs) / len(errs)


def seam_ratio(video, boundaries):
    """Frame-to-frame change at clip boundaries over the change inside clips (1 = seamless).

    boundaries: frame indices t where a new clip starts (change measured from t-1 to t).
    """
    diff = (video[:, 1:] - video[:, :-1]).abs().mean(dim=(0, 2, 3))            # (T-1,)
    at = torch.zeros_like(diff, dtype=torch.bool)
    idx = [t - 1 for t in boundaries if 1 <= t < video.shape[1]]
    if not idx:
        raise ValueError(f"no boundary inside the video of {video.shape[1]} frames: {boundaries}")
    at[idx] = True
    inside = diff[~at].mean()
    return float(diff[at].mean() / inside) if inside > 0 else float("inf")


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of two tensors in [-1, 1] (peak-to-peak 2)."""
    mse = float((a.double() - b.double()).square().mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()


def clip_metrics(video, sample):
    """All toy metrics of a generated clip (3, T, H, W) against a dataset sample dict."""
    read = read_opening(video, sample.get("reference"))
    true = sample["opening"]
    out = dict(lip_corr=lip_corr(read, true), amplitude_ratio=amplitude_ratio(read, true),
               lip_mae=lip_mae(read, true))
    if len(true) > 18:
        out["av_offset"], out["av_confidence"] = av_offset(read, true)
    if "closed" in sample:
        speaking = sample["viseme"] > 0
        out["closure_f1"] = closure_f1(read, sample["closed"], speaking)
        out["closure_f1_frames"] = closure_f1_frames(read, sample["closed"], speaking)
    if sample.get("reference") is not None:
        out["identity_error"] = identity_error(video, sample["reference"])
    if sample.get("video") is not None and sample["video"].shape == video.shape:
        out["psnr"] = psnr(video, sample["video"])
    return out
