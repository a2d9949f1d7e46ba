"""Asynchronous noise scheduler (ANS): per-frame rectified flow, schedules, samplers.

DESIGN §7. Every latent frame f carries its own noise level τ_f ∈ [0, 1] (0 clean, 1 pure
noise). Rectified flow moves a frame along the straight line

    x_τ = (1 - τ)·x₀ + τ·ε,        velocity v = dx/dτ = ε - x₀,

so a model that predicts x̂₀ gives v̂ = (x_τ - x̂₀)/τ, and a step from τ to τ' < τ is
x_τ' = x_τ + (τ' - τ)·v̂ (Euler; Heun averages v̂ at both ends).

From the READ paper (arXiv 2508.03457): an asynchronous noise scheduler used in training
("asynchronous add-noise": frames of one sample carry different noise levels) and in
inference ("asynchronous motion-guided generation": a long video is generated clip by
clip, each clip guided by the motion of the previous one). The formulas are not
published; everything below is our reconstruction:
- a schedule for F latent frames is a matrix levels[m, f] of shape (steps+1, F): the
  level of frame f after step m. Row 0 is all ones, the last row all zeros, columns never
  increase. Every schedule here is one formula, "clip c starts at step c·stride and
  falls from 1 to 0 in S steps", with a different clip size and stride:
  synchronous (stride S), asynchronous (READ's ANS: stride S/W, W clips in flight),
  rolling / pyramid (clips of one frame, FIFO-Diffusion and Diffusion Forcing);
- one generic sampler runs any such matrix: at step m the model sees the active frames
  (levels[m] != levels[m+1]), up to M clean frames before them (motion anchors) and the
  reference frame. Noise for a frame is drawn when it enters, from a per-frame seed, so
  device memory holds one window and results do not depend on the video's length;
- the training sampler draws the same level patterns the schedules produce
  (clip j of the window at τ = (j + u)/W), including the start and the end of a video;
  a test checks that every pattern inference meets has non-zero training probability.
"""

import math
from typing import NamedTuple

import torch
from tqdm import tqdm


# ----------------------------------------------------------------------------- flow

def _per_frame(levels, x):
    """levels (B, F) or (F,) -> broadcastable against x (B, C, F, h, w)."""
    if levels.device != x.device or levels.dtype != x.dtype:
        levels = levels.to(device=x.device, dtype=x.dtype)
    return levels.view(-1, 1, levels.shape[-1], 1, 1) if levels.dim() == 2 else levels.view(1, 1, -1, 1, 1)


def add_noise(x0, noise, levels):
    """x_τ = (1 - τ)·x₀ + τ·ε, one τ per latent frame; x0, noise (B, C, F, h, w), levels (B, F)."""
    tau = _per_frame(levels, x0)
    return (1 - tau) * x0 + tau * noise


def velocity_target(x0, noise):
    """The rectified-flow velocity v = ε - x₀ (what a "v" model regresses)."""
    return noise - x0


def to_velocity(x_t, x0_hat, levels):
    """v̂ = (x_τ - x̂₀)/τ. Meaningless at τ = 0 (clean frames do not move); τ is floored to
    keep the result finite there, and the steps below never use it for such frames."""
    return (x_t - x0_hat) / _per_frame(levels, x_t).clamp_min(1e-6)


def to_x0(x_t, velocity, levels):
    """x̂₀ = x_τ - τ·v̂."""
    return x_t - _per_frame(levels, x_t) * velocity


def euler_step(x, velocity, levels, next_levels):
    """Move every frame from its level to its next one: x + (τ' - τ)·v. Frames whose level
    does not change are returned bit-identical (not x + 0·v, which would spread NaNs)."""
    tau, tau_next = _per_frame(levels, x), _per_frame(next_levels, x)
    return torch.where(tau_next != tau, x + (tau_next - tau) * velocity, x)


def heun_step(x, velocity, next_velocity, levels, next_levels):
    """Heun: average v̂ at τ (x) and at τ' (the Euler estimate x'). Frames that reach τ' = 0
    take the Euler result (an x̂₀ model gives no velocity at τ = 0); frames that do not move
    are returned bit-identical."""
    tau, tau_next = _per_frame(levels, x), _per_frame(next_levels, x)
    euler = x + (tau_next - tau) * velocity
    heun = x + (tau_next - tau) * 0.5 * (velocity + next_velocity)
    return torch.where(tau_next == tau, x, torch.where(tau_next > 0, heun, euler))


# ----------------------------------------------------------------------------- schedules

def _staggered(F, n, stride, S):
    """Clip c (frames c·n .. c·n+n-1) starts at step ⌈c·stride⌉ and falls linearly from 1 to
    0 in S steps: levels[m, f] = clamp(1 - (m - ⌈c·stride⌉)/S, 0, 1). -> (steps+1, F).
    Starts are whole steps, so every level is a multiple of 1/S and no more than ⌈S/stride⌉
    clips are ever in flight."""
    if F < 1 or n < 1 or S < 1 or not stride > 0:
        raise ValueError(f"need F >= 1, n >= 1, S >= 1, stride > 0; got F={F}, n={n}, S={S}, stride={stride}")
    start = ((torch.arange(F, dtype=torch.float64) // n) * stride - 1e-9).ceil()  # (F,) first step of its clip
    steps = int(start[-1]) + S
    m = torch.arange(steps + 1, dtype=torch.float64)[:, None]  # (steps+1, 1)
    return (1 - (m - start[None]) / S).clamp(0, 1).float()  # (steps+1, F)


def synchronous(F, n, S):
    """Clip by clip: clips of n frames, each denoised from 1 to 0 in S steps after the
    previous one has finished (with M clean anchors from it: the usual baseline)."""
    return _staggered(F, n, S, S)


def synchronous_overlap(F, n, W, S):
    """Windows of W·n frames advanced by n frames, every window from noise again.

    Only the first n frames of a window are kept; the other (W-1)·n are a look-ahead that
    is denoised alongside and thrown away. A matrix holds the kept levels only, so the
    matrix is that of `synchronous` and the sampler must be told the look-ahead:
    `generate_latents(..., lookahead=(W - 1) * n)`.
    """
    if W < 1:
        raise ValueError(f"W (clips in the window) must be >= 1, got {W}")
    return _staggered(F, n, S, S)


def asynchronous(F, n, W, S):
    """READ's ANS as reconstructed: W clips of n frames in flight, staggered by 1/W.

    Clip c is denoised during global steps [c·S/W, c·S/W + S), so every call advances W
    clips at once (the nearly clean older clip guides the newer ones) and one clip
    finishes every S/W calls; warm-up (pipeline filling) and tail (draining) included.
    With W = 1 it is `synchronous`.
    """
    if W < 1 or S % W:
        raise ValueError(f"S (steps per clip) must be a multiple of W (clips in flight); got S={S}, W={W}")
    return _staggered(F, n, S // W, S)


def rolling(F, window, S):
    """Rolling / FIFO diffusion: clips of one frame, `window` frames in flight on a linear
    ramp of levels; a frame enters every S/window steps (need not be whole)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 frame, got {window}")
    return _staggered(F, 1, S / window, S)


def pyramid(F, S, slope=1.0):
    """Diffusion Forcing's pyramid: frame f starts `slope` steps after frame f-1, so later
    frames stay noisier ("causal uncertainty"); about S/slope frames are in flight."""
    return _staggered(F, 1, slope, S)


class Window(NamedTuple):
    """What one step of a schedule touches (slices of latent frame indices)."""
    anchors: slice  # clean frames just before the active ones (motion anchors)
    active: slice  # frames whose level moves from row m to row m+1
    lookahead: slice  # frames after them, denoised alongside and thrown away

    @property
    def frames(self):
        """The frames the model sees, in order (the reference frame comes on top)."""
        return slice(self.anchors.start, self.lookahead.stop)


def step_windows(levels, n_anchors=2, lookahead=0):
    """For each row pair (m, m+1) of a schedule, its Window (None where nothing moves).

    Checks that the schedule can be streamed: row 0 all ones, last row all zeros, columns
    never increase, the moving frames of a step are contiguous, everything before them is
    already clean and everything after them is still pure noise.
    """
    if levels.dim() != 2 or levels.shape[0] < 2:
        raise ValueError(f"a schedule is a (steps+1, F) matrix with steps >= 1, got shape {tuple(levels.shape)}")
    levels = levels.detach().cpu().float()
    R, F = levels.shape
    if (levels[0] != 1).any() or (levels[-1] != 0).any():
        raise ValueError("a schedule must start from pure noise (row 0 all ones) and end clean (last row all zeros)")
    if (levels[1:] > levels[:-1]).any():
        raise ValueError("a schedule's columns must never increase (a frame never gets noisier)")
    moving = levels[:-1] != levels[1:]  # (steps, F)
    any_moving = moving.any(1)
    first = moving.float().argmax(1)  # (steps,)
    last = F - 1 - moving.flip(1).float().argmax(1)
    f = torch.arange(F)
    before, after = f[None] < first[:, None], f[None] > last[:, None]  # (steps, F)
    ok = (moving.sum(1) == last - first + 1) & ~(before & (levels[:-1] != 0)).any(1) \
        & ~(after & (levels[1:] != 1)).any(1)
    if not ok[any_moving].all():
        m = int(torch.nonzero(any_moving & ~ok)[0])
        raise ValueError(f"step {m} of the schedule cannot be streamed: the moving frames must be contiguous, "
                         "with every frame before them clean and every frame after them pure noise")
    windows = []
    for m, (moves, s, e) in enumerate(zip(any_moving.tolist(), first.tolist(), (last + 1).tolist())):
        windows.append(Window(slice(max(0, s - n_anchors), s), slice(s, e), slice(e, min(F, e + lookahead)))
                       if moves else None)
    return windows


def count_calls(levels, solver="euler"):
    """Model calls a schedule costs (per sample; guidance batches both passes in one call)."""
    moving = (levels[:-1] != levels[1:]).any(1)
    if solver == "euler":
        return int(moving.sum())
    # Heun's second call is skipped on steps where every moving frame lands on τ = 0.
    needs_second = ((levels[:-1] != levels[1:]) & (levels[1:] > 0)).any(1)
    return int(moving.sum() + needs_second.sum())


# ----------------------------------------------------------------------------- training noise

class LevelDraw(NamedTuple):
    """One training batch's noise pattern; see `sample_levels`."""
    levels: torch.Tensor  # (B, n_anchors + window frames)
    n_anchors: int  # the first n_anchors frames are anchors (dit_loss skips them)
    drop_audio: torch.Tensor  # (B,) bool: use the null audio tokens
    drop_ref: torch.Tensor  # (B,) bool: use the null reference tokens


def sample_levels(batch_size, n=2, W=2, M=2, *, generator=None, p_sync=0.1, p_start=0.1, p_end=0.1,
                  anchor_noise=0.0, p_drop_audio=0.1, p_drop_ref=0.05):
    """Asynchronous add-noise: levels for a training window of up to M anchors + W·n frames.

    Per sample u ~ U(0, 1]; frame i of the window lies in clip j = i // n and gets
    τ = (j + u)/W (asynchronous) or τ = u for every frame (synchronous, with probability
    p_sync: the `synchronous` window of n frames or the `synchronous_overlap` window of
    W·n, equally likely). The layout is one draw per batch, so the batch stacks:
    - start of a video (p_start): fewer anchors, n_anchors ∈ {k·n < M} (usually 0); with
      no anchors an asynchronous window may also lose its first clips, as when the
      pipeline fills (its first clip then sits at (j + u)/W with j > 0);
    - end of a video (p_end): the window is cut after a random frame (draining, or a
      video that ends mid-clip).
    Anchors get τ = 0, or U[0, anchor_noise) per sample when anchor_noise > 0.
    drop_audio / drop_ref: independent per-sample Bernoulli(p) masks for guidance.

    The contract with `dit_loss(model, batch, levels)`: cut F = levels.shape[1] contiguous
    latent frames (preferably from frame 0 of a clip when n_anchors == 0, as at the start
    of a video) and pass batch = {"latents" (B, C, F, h, w), "audio" (B, F, Da),
    "reference" (B, C, 1, h, w), "n_anchors": draw.n_anchors, "drop_audio": draw.drop_audio,
    "drop_ref": draw.drop_ref, "noise" (optional)} with levels = draw.levels.
    """
    if min(n, W) < 1 or M < 0 or batch_size < 1:
        raise ValueError(f"need n >= 1, W >= 1, M >= 0, batch_size >= 1; got n={n}, W={W}, M={M}, B={batch_size}")
    g, B = generator, batch_size
    u = 1 - torch.rand(B, generator=g)  # (B,) in (0, 1]
    coin = torch.rand(3, generator=g).tolist()
    sync, start, end = coin[0] < p_sync, coin[1] < p_start, coin[2] < p_end
    clip = torch.arange(W * n) // n  # (W*n,) the clip of each window frame
    window = u[:, None].expand(B, W * n) if sync else ((clip[None] + u[:, None]) / W).clamp(0, 1)  # (B, W*n)

    def pick(k):  # uniform integer in [0, k)
        return int(torch.randint(k, (1,), generator=g))

    a, i0, i1 = M, 0, W * n  # anchors, then window frames i0 .. i1-1
    if sync:
        i1 = n * (1 + pick(W))
    if start:
        a = n * pick(math.ceil(M / n)) if M else 0
        if a == 0 and not sync:
            i0 = n * pick(W)
    if end:
        i1 = i0 + 1 + pick(i1 - i0)
    anchors = torch.zeros(B, a)
    if anchor_noise > 0:
        anchors = anchors + anchor_noise * torch.rand(B, 1, generator=g)
    levels = torch.cat([anchors, window[:, i0:i1]], dim=1)  # (B, a + i1 - i0)
    drop_audio = torch.rand(B, generator=g) < p_drop_audio
    drop_ref = torch.rand(B, generator=g) < p_drop_ref
    return LevelDraw(levels, a, drop_audio, drop_ref)


# ----------------------------------------------------------------------------- long-video sampler

def frame_noise(seed, frame, shape, device=None, dtype=torch.float32):
    """ε of one latent frame (shape (B, C, 1, h, w)), from its own seed: the same frame
    gets the same noise whatever the video's length, window or device."""
    gen = torch.Generator().manual_seed((int(seed) % 2**31) * 2**32 + int(frame))
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


class CountCalls:
    """Wraps a model; counts its calls and the latent frames they see (reference excluded)."""

    def __init__(self, model):
        self.model, self.calls, self.frames = model, 0, 0

    @property
    def prediction(self):
        return getattr(self.model, "prediction", "x0")

    def __call__(self, x, *args, **kwargs):
        self.calls += 1
        self.frames += x.shape[2]
        return self.model(x, *args, **kwargs)


class Oracle:
    """A perfect model of one known latent video x0 (B, C, F, h, w), for tests and teaching.

    It learns which frames it is shown from the audio: feed it `oracle.speech_latents()`,
    whose channel 0 is the frame index, so a sampler that misaligns audio and frames
    fails. Returns the exact x̂₀ (prediction "x0") or the velocity (x_τ - x₀)/τ ("v").
    """

    def __init__(self, x0, prediction="x0"):
        self.x0, self.prediction = x0, prediction

    def speech_latents(self, Da=4):
        B, C, F, h, w = self.x0.shape
        return torch.arange(F, dtype=self.x0.dtype).view(1, F, 1).expand(B, F, Da).clone()  # (B, F, Da)

    def __call__(self, x, levels, audio, reference, drop_audio=None, drop_ref=None):
        x0 = self.x0[:, :, audio[0, :, 0].round().long()]  # (B, C, Fw, h, w)
        x0 = x0.repeat(x.shape[0] // x0.shape[0], 1, 1, 1, 1)  # guidance doubles the batch
        return x0 if self.prediction == "x0" else to_velocity(x, x0, levels)


def generate_latents(model, speech_latents, reference_latent, schedule, *, n_anchors=2, lookahead=0,
                     cfg_scale=1.0, solver="euler", seed=0, generator=None, progress=True):
    """Walk a schedule matrix and yield (first_frame, clip (B, C, k, h, w)) as frames finish.

    model(x, levels, audio, reference, drop_audio=None) -> x̂₀ or v̂ (per `model.prediction`,
    default "x0"), x holding anchors + active (+ look-ahead) frames. speech_latents
    (B, F, Da) fix the length F; reference_latent (B, C, 1, h, w) fixes device and dtype;
    schedule (steps+1, F) from the functions above. cfg_scale > 1 applies classifier-free
    guidance on audio (conditional and null-audio passes batched in one call of 2B);
    solver "euler" or "heun"; the noise of frame f is `frame_noise(seed, f, ...)` (a
    `generator` instead draws the seed). Device memory holds the window and its anchors,
    never the whole video; the level matrix stays on the CPU.
    """
    if speech_latents.dim() != 3:
        raise ValueError(f"speech_latents must be (B, F, Da), got shape {tuple(speech_latents.shape)}")
    B, F, Da = speech_latents.shape
    if reference_latent.dim() != 5 or reference_latent.shape[0] != B or reference_latent.shape[2] != 1:
        raise ValueError(f"reference_latent must be (B={B}, C, 1, h, w), got shape {tuple(reference_latent.shape)}")
    if schedule.dim() != 2 or schedule.shape[1] != F:
        raise ValueError(f"the schedule has shape {tuple(schedule.shape)} but the speech latents have F={F} frames; "
                         f"build it for F = speech_latents.shape[1]")
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    prediction = getattr(model, "prediction", "x0")
    if prediction not in ("x0", "v"):
        raise ValueError(f"model.prediction must be 'x0' or 'v', got {prediction!r}")
    if n_anchors < 0 or lookahead < 0:
        raise ValueError(f"n_anchors and lookahead must be >= 0, got {n_anchors}, {lookahead}")
    if generator is not None:
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))
    schedule = schedule.detach().cpu().float()
    windows = step_windows(schedule, n_anchors, lookahead)
    finished = torch.where((schedule[1:] > 0).any(1), (schedule[1:] > 0).float().argmax(1),
                           torch.tensor(F)).tolist()  # after step m, frames < finished[m] are clean
    second = ((schedule[:-1] != schedule[1:]) & (schedule[1:] > 0)).any(1).tolist()  # Heun's 2nd call needed
    _, C, _, h, w = reference_latent.shape
    device, dtype = reference_latent.device, reference_latent.dtype
    noise = lambda f: frame_noise(seed, f, (B, C, 1, h, w), device, dtype)  # noqa: E731
    patterns = {}  # window level patterns repeat (S/W of them in steady state): build each once
    buf, lo = reference_latent.new_zeros(B, C, 0, h, w), 0  # frames lo .. lo+buf.shape[2]-1 (anchors + active)
    scratch, scratch_at = None, None  # look-ahead states and where they start
    emitted = 0
    bar = tqdm(total=F, unit="frame", desc="latent frames", disable=not progress)
    try:
        for m, win in enumerate(windows):
            if win is None:
                continue
            a0, s, e, la = win.anchors.start, win.active.start, win.active.stop, win.lookahead
            hi, k = lo + buf.shape[2], la.stop - la.start
            buf = buf[:, :, a0 - lo:]  # frames before the anchors are finished and yielded: drop them
            if e > hi:  # frames entering the window, each from its own noise
                buf = torch.cat([buf] + [noise(f) for f in range(hi, e)], dim=2)  # (B, C, e - a0, h, w)
            lo, x = a0, buf
            key = (s - a0, k, *schedule[m:m + 2, s:e].flatten().tolist())
            if key not in patterns:
                patterns[key] = _WindowLevels.build(key, B, prediction, device, dtype)
            lv = patterns[key]
            if k:  # look-ahead restarts from noise with every new window
                if scratch_at != la.start or schedule[m, e - 1] == 1:
                    scratch, scratch_at = torch.cat([noise(f) for f in range(la.start, la.stop)], dim=2), la.start
                x = torch.cat([buf, scratch], dim=2)  # (B, C, Fw, h, w)
            audio = speech_latents[:, win.frames].to(device=device, dtype=dtype)  # (B, Fw, Da)
            x = _step(model, prediction, x, lv, audio, reference_latent, cfg_scale, solver == "heun" and second[m])
            buf = x[:, :, :e - a0]
            if k:
                scratch = x[:, :, e - a0:]
            if finished[m] > emitted:
                done = finished[m]
                yield emitted, buf[:, :, emitted - lo:done - lo].clone()  # (B, C, k, h, w)
                bar.update(done - emitted)
                emitted = done
    finally:
        bar.close()


class _WindowLevels(NamedTuple):
    """The levels of one window pattern, ready on the device."""
    tau: torch.Tensor  # (Fw,) levels now: anchors 0, active, look-ahead (as the newest active frame)
    tau_next: torch.Tensor  # (Fw,) levels after the step
    levels: torch.Tensor  # (B, Fw) what the model is told
    moving: torch.Tensor  # (1, 1, Fw, 1, 1) bool
    rate: torch.Tensor  # (1, 1, Fw, 1, 1): Euler is x + rate·(x - x̂₀) for "x0", x + rate·v̂ for "v"

    @staticmethod
    def build(key, B, prediction, device, dtype):
        n_anchors, k, *pair = key
        cur, nxt = torch.tensor(pair, dtype=torch.float64).view(2, -1)  # (active,) each
        tau = torch.cat([torch.zeros(n_anchors, dtype=cur.dtype), cur, cur[-1:].expand(k)])  # (Fw,)
        tau_next = torch.cat([torch.zeros(n_anchors, dtype=cur.dtype), nxt, nxt[-1:].expand(k)])
        moving = tau_next != tau
        # x' = x + (τ' - τ)·v̂ with v̂ = (x - x̂₀)/τ: one rate per frame, folded in float64
        rate = torch.where(moving, (tau_next - tau) / (tau.clamp_min(1e-6) if prediction == "x0" else 1), 0)
        to = dict(device=device, dtype=dtype)
        return _WindowLevels(tau.to(**to), tau_next.to(**to), tau.to(**to).expand(B, -1),
                             moving.to(device).view(1, 1, -1, 1, 1), rate.to(**to).view(1, 1, -1, 1, 1))


@torch.no_grad()
def _step(model, prediction, x, lv, audio, reference, cfg_scale, heun):
    """One step of the window x (B, C, Fw, h, w) from levels lv.tau to lv.tau_next."""
    pred = _predict(model, x, lv.levels, audio, reference, cfg_scale)
    if not heun:  # fused Euler: the same as euler_step(x, to_velocity(x, pred, tau), tau, tau_next)
        return torch.where(lv.moving, torch.addcmul(x, lv.rate, x - pred if prediction == "x0" else pred), x)
    v = to_velocity(x, pred, lv.tau) if prediction == "x0" else pred
    x_euler = euler_step(x, v, lv.tau, lv.tau_next)
    pred_next = _predict(model, x_euler, lv.tau_next.expand_as(lv.levels), audio, reference, cfg_scale)
    v_next = to_velocity(x_euler, pred_next, lv.tau_next) if prediction == "x0" else pred_next
    return heun_step(x, v, v_next, lv.tau, lv.tau_next)


def _predict(model, x, levels, audio, reference, cfg_scale):
    """The model's x̂₀ or v̂ for the window, with classifier-free guidance on audio when
    cfg_scale != 1 (guidance is linear, so guiding x̂₀ or v̂ is the same)."""
    B = x.shape[0]
    if cfg_scale == 1:
        pred = model(x, levels, audio, reference)
    else:
        drop = torch.arange(2 * B, device=x.device) >= B  # (2B,) second half: null audio
        both = model(torch.cat([x, x]), torch.cat([levels, levels]), torch.cat([audio, audio]),
                     torch.cat([reference, reference]), drop_audio=drop)  # (2B, C, Fw, h, w)
        cond, uncond = both[:B], both[B:]
        pred = uncond + cfg_scale * (cond - uncond)
    if pred.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(pred.shape)} for an input of shape {tuple(x.shape)}")
    return pred
