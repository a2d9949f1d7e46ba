"""Attention for minread: one entry point, three implementations, a library of masks.

Every attention call of the A2V-DiT (DESIGN §6) goes through `attention(q, k, v, mask,
impl)`. A mask is a *mask_mod* in PyTorch FlexAttention's convention: a function
`(b, h, q_idx, kv_idx) -> bool tensor`, True where query q_idx may attend to key kv_idx.
The same function drives three implementations that must agree (tests/test_attention.py):

- "flex":  FlexAttention compiled by torch.compile. The mask becomes a *block mask*: the
           (Lq, Lkv) grid cut into 128x128 tiles, each marked empty, partial or full, so
           the fused kernel skips empty tiles and never evaluates the mask on full ones.
           Sparse masks (audio window, clip-causal) then cost less than dense attention.
- "sdpa":  torch's scaled_dot_product_attention with the dense boolean (Lq, Lkv) mask
           built from the same mask_mod: the reference path.
- "math":  softmax(q kᵀ / √hd) v written out, for teaching.
- "auto":  what is fastest where it runs: compiled flex on CUDA; on CPU, SDPA when
           gradients are needed (FlexAttention has no CPU backward in torch 2.13) and for
           small inputs (a compiled call costs more fixed overhead than a tiny SDPA),
           compiled flex for large, sparse CPU inference (CPU_FLEX_MIN_SCORES and
           CPU_FLEX_MAX_TILES below). Unmasked attention always uses SDPA.
Two more for teaching and testing: "flex_eager" (FlexAttention without compile; forward
only on CPU) and "blockwise" (the block-sparse online-softmax algorithm of the fused
kernel written out in PyTorch; differentiable everywhere, slow).

Rules shared by all implementations:
- Masks here are the same for every batch element and head (b and h are ignored), so
  one block mask and one dense mask serve the whole batch.
- Lengths need not be multiples of the 128 block size: create_block_mask is told the
  true Q_LEN and KV_LEN and pads internally; the dense mask is exactly (Lq, Lkv).
- A query row that sees no key outputs zeros (and passes no gradient), in every
  implementation. (Softmax over an empty set is undefined; zeros is FlexAttention's
  choice, and we make SDPA and math follow it.)
- Block masks and dense masks are cached per (mask key, Lq, Lkv, device), so a
  12-layer forward pass builds each mask once. A factory gives its mask_mod a `key`
  attribute (factory name and arguments) because two closures made by two calls of
  `frame_causal(16)` are different objects but the same mask.

What is READ's (arXiv 2508.03457): the A2V-DiT aligns each video latent frame with its
speech latents. Everything in this file (FlexAttention, the mask set, the clip-causal
window, the audio window of ±r frames) is our reconstruction.
"""

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

IMPLS = ("auto", "flex", "flex_eager", "sdpa", "math", "blockwise")
BLOCK_SIZE = 128  # FlexAttention's tile; one block-mask entry covers 128 x 128 scores

# CPU inference uses compiled flex only where it measured faster than SDPA (`python -m
# minread.bench attention`, 2 threads): at >= 2048^2 scores per head with at most half of
# the 128x128 tiles computed (audio window: flex/sdpa 0.34 at 2k, 0.23 at 4k tokens).
# Below that the fixed cost of a compiled call loses (tiny DiT self-attention, 112 tokens:
# flex 0.90 ms, sdpa 0.34 ms), and denser masks break even at best.
CPU_FLEX_MIN_SCORES = 2048 * 2048
CPU_FLEX_MAX_TILES = 0.5

# Tile sizes, warps and pipeline stages of the compiled flex kernel (FlexAttention's
# `kernel_options`, e.g. {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2});
# empty = torch's defaults for the GPU. `python -m minread.bench attention --kernel-options`
# sets it to compare settings on one GPU; on CPU torch ignores what its kernel has no use for.
KERNEL_OPTIONS = {}

# One compiled FlexAttention per process. Static shapes: each new (shape, mask) compiles
# once (seconds), and torch 2.13's CPU kernel fails to build with dynamic shapes, which
# dynamo's default would switch to on the second shape. Allow more recompiles than the
# default 8 (a benchmark sweeps many lengths and masks).
_flex_compiled = torch.compile(flex_attention, dynamic=False)
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)


# ----------------------------------------------------------------------------- masks

def _keyed(mask_mod, *key):
    """Attach a hashable identity (factory name and arguments) to a mask_mod."""
    mask_mod.key = key
    mask_mod.__name__ = key[0]
    return mask_mod


def mask_key(mask):
    """The cache identity of a mask: its `key`, or the function object itself."""
    return getattr(mask, "key", mask)


def full():
    """Every query sees every key (plain bidirectional attention)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx >= 0  # all True, as a tensor of the right shape
    return _keyed(mask_mod, "full")


def frame_causal(tokens_per_frame):
    """A token of latent frame f = idx // N sees all tokens of frames <= f."""
    n = int(tokens_per_frame)
    if n < 1:
        raise ValueError(f"frame_causal: tokens_per_frame must be >= 1, got {tokens_per_frame}")

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx // n <= q_idx // n
    return _keyed(mask_mod, "frame_causal", n)


def clip_causal(tokens_per_frame, frames_per_clip, context_frames=0):
    """The ANS window: the first `context_frames` frames (reference + motion anchors) are
    context, the frames after them form clips of `frames_per_clip` frames. A clip sees
    itself, earlier clips and the context; the context sees only itself."""
    n, c, p = int(tokens_per_frame), int(frames_per_clip), int(context_frames)
    if n < 1 or c < 1 or p < 0:
        raise ValueError(f"clip_causal: need tokens_per_frame >= 1, frames_per_clip >= 1, "
                         f"context_frames >= 0; got {tokens_per_frame}, {frames_per_clip}, "
                         f"{context_frames}")
    ctx = n * p            # context tokens
    per_clip = n * c       # tokens per clip

    def clip_of(idx):      # context tokens -> clip -1, then clips 0, 1, 2, ...
        return ((idx - ctx) // per_clip).clamp(min=-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return clip_of(kv_idx) <= clip_of(q_idx)
    return _keyed(mask_mod, "clip_causal", n, c, p)


def reference_visible(reference_tokens, start=0):
    """Every query sees the reference frame's tokens, kv in [start, start + reference_tokens).
    Combine with or_masks: or_masks(clip_causal(...), reference_visible(16))."""
    n, s = int(reference_tokens), int(start)
    if n < 1 or s < 0:
        raise ValueError(f"reference_visible: need reference_tokens >= 1 and start >= 0, "
                         f"got {reference_tokens}, {start}")

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= s) & (kv_idx < s + n)
    return _keyed(mask_mod, "reference_visible", n, s)


def audio_window(tokens_per_frame, radius, q_offset=0, kv_tokens_per_frame=1):
    """Cross-attention video -> speech: the query token of latent frame
    f = (q_idx - q_offset) // tokens_per_frame sees the speech tokens of frames g with
    |f - g| <= radius, where g = kv_idx // kv_tokens_per_frame. Query tokens before
    q_offset (e.g. the reference frame, which has no time) see no speech at all."""
    n, r, o, m = int(tokens_per_frame), int(radius), int(q_offset), int(kv_tokens_per_frame)
    if n < 1 or r < 0 or o < 0 or m < 1:
        raise ValueError(f"audio_window: need tokens_per_frame >= 1, radius >= 0, "
                         f"q_offset >= 0, kv_tokens_per_frame >= 1; got {tokens_per_frame}, "
                         f"{radius}, {q_offset}, {kv_tokens_per_frame}")

    def mask_mod(b, h, q_idx, kv_idx):
        f = (q_idx - o) // n
        g = kv_idx // m
        return (q_idx >= o) & ((f - g).abs() <= r)
    return _keyed(mask_mod, "audio_window", n, r, o, m)


def and_masks(*masks):
    """Visible where every mask says visible."""
    if not masks:
        raise ValueError("and_masks needs at least one mask")

    def mask_mod(b, h, q_idx, kv_idx):
        out = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out
    return _keyed(mask_mod, "and", *(mask_key(m) for m in masks))


def or_masks(*masks):
    """Visible where any mask says visible."""
    if not masks:
        raise ValueError("or_masks needs at least one mask")

    def mask_mod(b, h, q_idx, kv_idx):
        out = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out
    return _keyed(mask_mod, "or", *(mask_key(m) for m in masks))


# ---------------------------------------------------------- dense and block masks (cached)

_CACHE_SIZE = 64
_dense_cache = OrderedDict()
_block_cache = OrderedDict()


def _cached(cache, key, build):
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    with torch.inference_mode(False):  # a mask first built under inference_mode must serve training too
        value = cache[key] = build()
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _device(device):
    """torch.device with an explicit index, so "cuda" and "cuda:0" share cache entries."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def clear_cache():
    """Forget all cached dense and block masks."""
    _dense_cache.clear()
    _block_cache.clear()


def dense_mask(mask, q_len, kv_len=None, device="cpu"):
    """The mask as a boolean (Lq, Lkv) tensor, True = visible (cached)."""
    kv_len = q_len if kv_len is None else kv_len
    device = _device(device)

    def build():
        q_idx = torch.arange(q_len, device=device)[:, None]    # (Lq, 1)
        kv_idx = torch.arange(kv_len, device=device)[None, :]  # (1, Lkv)
        zero = torch.zeros((), dtype=torch.long, device=device)
        out = mask(zero, zero, q_idx, kv_idx)
        return torch.as_tensor(out, device=device).to(torch.bool).expand(q_len, kv_len).contiguous()
    return _cached(_dense_cache, (mask_key(mask), q_len, kv_len, str(device)), build)


def block_mask(mask, q_len, kv_len=None, device="cpu"):
    """The FlexAttention BlockMask of `mask` for these lengths (cached; same object for the
    same mask key, lengths and device). Ragged lengths are padded inside create_block_mask."""
    kv_len = q_len if kv_len is None else kv_len
    device = _device(device)
    return _cached(_block_cache, (mask_key(mask), q_len, kv_len, str(device)),
                   lambda: create_block_mask(mask, None, None, q_len, kv_len, device=device,
                                             BLOCK_SIZE=BLOCK_SIZE))


def block_sparsity(mask, q_len, kv_len=None, block=BLOCK_SIZE):
    """Per 128x128 tile: 0 = empty (skipped), 1 = partial (mask evaluated), 2 = full.
    Returns ((ceil(Lq/block), ceil(Lkv/block)) long tensor, fraction of tiles computed)."""
    kv_len = q_len if kv_len is None else kv_len
    m = dense_mask(mask, q_len, kv_len)
    nq, nk = -(-q_len // block), -(-kv_len // block)
    padded = torch.zeros(nq * block, nk * block, dtype=torch.bool)
    valid = torch.zeros_like(padded)
    padded[:q_len, :kv_len] = m
    valid[:q_len, :kv_len] = True
    tiles = padded.view(nq, block, nk, block).sum((1, 3))   # visible scores per tile
    sizes = valid.view(nq, block, nk, block).sum((1, 3))    # real scores per tile
    kind = torch.where(tiles == 0, 0, torch.where(tiles == sizes, 2, 1))
    return kind, (kind > 0).float().mean().item()


def mask_to_text(mask, q_len, kv_len=None):
    """The mask as text: one row per query, '#' visible, '.' hidden."""
    m = dense_mask(mask, q_len, kv_len)
    return "\n".join("".join("#" if x else "." for x in row) for row in m.tolist())


def draw_mask(mask, q_len, kv_len=None, ax=None, title=None):
    """Draw the dense mask with matplotlib (queries down, keys across)."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(4, 4))[1]
    ax.imshow(dense_mask(mask, q_len, kv_len).numpy(), cmap="Blues", interpolation="nearest")
    ax.set_xlabel("key / value token")
    ax.set_ylabel("query token")
    ax.set_title(title or str(mask_key(mask)))
    return ax


# ----------------------------------------------------------------------- implementations

def _visible(mask, q_len, kv_len, device):
    """Dense mask made safe for softmax: rows with no visible key attend everywhere (any
    finite result) and are zeroed afterwards by `has_key`. Returns (mask, has_key)."""
    key = ("safe", mask_key(mask), q_len, kv_len, str(device))

    def build():
        m = dense_mask(mask, q_len, kv_len, device)        # (Lq, Lkv)
        has_key = m.any(-1, keepdim=True)                  # (Lq, 1)
        return m | ~has_key, (None if bool(has_key.all()) else has_key)
    return _cached(_dense_cache, key, build)


def sdpa_attention(q, k, v, mask=None):
    """Reference: scaled_dot_product_attention with the dense boolean mask."""
    if mask is None or mask_key(mask) == ("full",):
        return F.scaled_dot_product_attention(q, k, v)
    m, has_key = _visible(mask, q.shape[-2], k.shape[-2], q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # (B, nh, Lq, hd)
    return out if has_key is None else out * has_key


def math_attention(q, k, v, mask=None):
    """softmax(q kᵀ / √hd) v, written out."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, Lq, Lkv)
    if mask is None:
        return scores.softmax(-1) @ v
    m, has_key = _visible(mask, q.shape[-2], k.shape[-2], q.device)
    scores = scores.masked_fill(~m, float("-inf"))
    out = scores.softmax(-1) @ v                               # (B, nh, Lq, hd)
    return out if has_key is None else out * has_key


def flex(q, k, v, mask=None, compiled=True):
    """FlexAttention with the cached block mask; compiled (fused kernel) or eager."""
    bm = None if mask is None else block_mask(mask, q.shape[-2], k.shape[-2], q.device)
    if not compiled:
        return flex_attention(q, k, v, block_mask=bm)
    return _flex_compiled(q, k, v, block_mask=bm, kernel_options=dict(KERNEL_OPTIONS) or None)


def blockwise_attention(q, k, v, mask=None):
    """What the fused FlexAttention kernel computes, written out (and differentiable on
    CPU): each 128-row query block visits only the key blocks its BlockMask lists,
    evaluates the mask only on partial blocks, and merges blocks with an online softmax
    (running max m, running sum l), so the (Lq, Lkv) score matrix never exists."""
    B, nh, Lq, hd = q.shape
    Lkv, n = k.shape[-2], BLOCK_SIZE
    bm = block_mask(mask or full(), Lq, Lkv, q.device)
    partial = [row[:c].tolist() for row, c in zip(bm.kv_indices[0, 0], bm.kv_num_blocks[0, 0])]
    whole = ([row[:c].tolist() for row, c in zip(bm.full_kv_indices[0, 0], bm.full_kv_num_blocks[0, 0])]
             if bm.full_kv_indices is not None else [[] for _ in partial])
    outs = []
    for i in range(-(-Lq // n)):
        rows = torch.arange(i * n, min(Lq, (i + 1) * n), device=q.device)
        qi = q[:, :, i * n:(i + 1) * n] / math.sqrt(hd)             # (B, nh, n, hd)
        m = qi.new_full((B, nh, len(rows), 1), float("-inf"))      # running max
        l = qi.new_zeros((B, nh, len(rows), 1))                    # running softmax sum
        acc = qi.new_zeros((B, nh, len(rows), hd))                 # running weighted sum
        for j, is_full in [(j, False) for j in partial[i]] + [(j, True) for j in whole[i]]:
            cols = torch.arange(j * n, min(Lkv, (j + 1) * n), device=q.device)
            s = qi @ k[:, :, cols].transpose(-2, -1)               # (B, nh, n, n)
            if not is_full:
                s = s.masked_fill(~mask(0, 0, rows[:, None], cols[None, :]), float("-inf"))
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing seen yet
            p = torch.exp(s - m_safe)
            corr = torch.exp(m - m_safe)                           # rescale what came before
            l = l * corr + p.sum(-1, keepdim=True)
            acc = acc * corr + p @ v[:, :, cols]                   # (B, nh, n, hd)
            m = m_new
        outs.append(acc / l.clamp_min(torch.finfo(l.dtype).tiny))  # no key seen -> zeros
    return torch.cat(outs, dim=2)                                  # (B, nh, Lq, hd)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def choose_impl(q, k, mask=None, needs_grad=False):
    """What impl="auto" runs for these inputs (see the module docstring)."""
    if mask is None or mask_key(mask) == ("full",):
        return "sdpa"  # the fused kernel torch picks (flash, cuDNN, ...): no mask to apply
    if q.device.type == "cuda":
        return "flex"
    if needs_grad or q.shape[-2] * k.shape[-2] < CPU_FLEX_MIN_SCORES:
        return "sdpa"
    tiles = 1 - block_mask(mask, q.shape[-2], k.shape[-2], q.device).sparsity() / 100
    return "flex" if tiles <= CPU_FLEX_MAX_TILES else "sdpa"


def _check(q, k, v, mask, impl):
    if impl not in IMPLS:
        raise ValueError(f"attention: impl must be one of {IMPLS}, got {impl!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor (B, nh, L, hd), got "
                             f"{getattr(t, 'shape', type(t).__name__)}; reshape tokens "
                             f"(B, L, D) to (B, nh, L, D // nh) and transpose(1, 2)")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}; need q (B, nh, Lq, hd), k = v (B, nh, Lkv, hd)")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v must share dtype and device, got "
                         f"{q.dtype}/{k.dtype}/{v.dtype} on {q.device}/{k.device}/{v.device}")
    if mask is not None and not callable(mask):
        raise ValueError("attention: mask must be a mask_mod (b, h, q_idx, kv_idx) -> bool, "
                         "e.g. frame_causal(16), or None")


def attention(q, k, v, mask=None, impl="auto"):
    """Masked scaled-dot-product attention. q (B, nh, Lq, hd), k and v (B, nh, Lkv, hd)
    -> (B, nh, Lq, hd). mask: a mask_mod or None (= full); impl: see IMPLS."""
    _check(q, k, v, mask, impl)
    if impl == "auto":
        impl = choose_impl(q, k, mask, _needs_grad(q, k, v))
    if impl in ("flex", "flex_eager") and q.device.type == "cpu" and _needs_grad(q, k, v):
        raise ValueError("attention: FlexAttention has no backward on CPU in this torch; use "
                         "impl='auto' or 'sdpa' for CPU training, 'blockwise' for the same "
                         "block-sparse algorithm in plain PyTorch, or run under torch.no_grad()")
    if impl == "flex":
        return flex(q, k, v, mask, compiled=True)
    if impl == "flex_eager":
        return flex(q, k, v, mask, compiled=False)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, mask)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, mask)
    return math_attention(q, k, v, mask)
