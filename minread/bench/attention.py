"""Attention benchmark: `python -m minread.bench attention [--device cpu|cuda] [--quick]`.

For each sequence length and mask, times forward and forward+backward of compiled
FlexAttention ("flex"), SDPA with the dense boolean mask ("sdpa") and the written-out
softmax ("math"), side by side in one run, with flex/SDPA ratios and memory; for the
full mask also unmasked SDPA ("sdpa_nomask": the flash / memory-efficient kernel).
A first section times the tiny DiT's own calls (112-token self-attention, 112 -> 7
speech cross-attention) to show what impl="auto" should pick for small inputs.

Masks, with N = 16 tokens per latent frame (tiny and small presets):
- full:          every token sees every token (sdpa applies the all-True dense mask;
                 sdpa_nomask is the unmasked kernel that impl="auto" uses for it);
- clip_causal:   or_masks(clip_causal(N, 2 frames per clip, 3 context frames),
                 reference_visible(N)): the ANS window;
- audio_window:  audio_window(N, radius 1, kv_tokens_per_frame=N) with Lkv = Lq: video
                 frame f sees the speech tokens of frames f-1..f+1. (The tiny DiT has one
                 speech token per frame, so its cross-attention is short; N speech tokens
                 per frame make the same band pattern long enough to measure sparsity.)

Memory: on CUDA the peak of torch.cuda.max_memory_allocated during the call, above the
inputs. On CPU torch does not track its allocations, so we report the sizes of what
each path materialises: the dense (Lq, Lkv) bool mask for sdpa, mask + float scores for
math, the BlockMask tensors for flex (its fused kernel keeps scores in registers).
Compiled FlexAttention has no backward on CPU (torch 2.13), so CPU fwd+bwd rows show
sdpa and math only. CPU runs float32; CUDA runs bfloat16, and its forward rows time the
forward of a training step (inputs require grad), so each case compiles flex once. Each new (length, mask) compiles once; compile time is reported
and excluded from the timings.
"""

import argparse
import json
import statistics
import time

import torch

from minread import attention as A
from minread.bench import machine, report

N = 16  # tokens per latent frame


def make_masks():
    return {
        # and_masks(full()) is all-visible but not recognised as full, so "sdpa" really
        # applies the dense mask; "sdpa_nomask" is the unmasked kernel
        "full": A.and_masks(A.full()),
        "clip_causal": A.or_masks(A.clip_causal(N, 2, 3), A.reference_visible(N)),
        "audio_window": A.audio_window(N, 1, kv_tokens_per_frame=N),
    }


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, min_time=0.2, max_reps=50):
    """Median seconds per call after one warm-up call."""
    fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cpu_bytes(impl, mask, B, nh, lq, lkv):
    """What a CPU path materialises beyond q, k, v and the output (see docstring)."""
    if impl == "sdpa":
        return lq * lkv
    if impl == "math":
        return lq * lkv + 2 * B * nh * lq * lkv * 4  # mask + scores + probabilities
    if impl == "flex":
        bm = A.block_mask(mask, lq, lkv)
        parts = (bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                 bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)
    return 0


def run_case(impl, mask, q, k, v, backward):
    def fn():
        if backward:
            for t in (q, k, v):
                t.grad = None
            A.attention(q, k, v, mask, impl).backward(grad_out)
        elif q.requires_grad:  # CUDA: the forward of a training step (one compile per case)
            A.attention(q, k, v, mask, impl)
        else:
            with torch.no_grad():
                A.attention(q, k, v, mask, impl)
    grad_out = torch.randn_like(q)
    return fn


def measure(impl, mask, lq, lkv, args, backward):
    """One timing: (ms, memory bytes, compile seconds or None)."""
    device, dtype = args.device, args.dtype
    q = torch.randn(args.batch, args.heads, lq, args.head_dim, device=device, dtype=dtype)
    k = torch.randn(args.batch, args.heads, lkv, args.head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    for t in (q, k, v):
        t.requires_grad_(backward or device == "cuda")
    fn = run_case(impl if impl != "sdpa_nomask" else "sdpa", None if impl == "sdpa_nomask" else mask,
                  q, k, v, backward)
    compile_s = None
    if impl == "flex":
        A.block_mask(mask, lq, lkv, device)  # built once, cached, not timed
        t0 = time.perf_counter()
        fn()
        sync(device)
        compile_s = time.perf_counter() - t0
    seconds = timeit(fn, device)
    mem = peak_bytes(fn, device)
    if mem is None:
        mem = cpu_bytes(impl, mask, args.batch, args.heads, lq, lkv)
    return seconds * 1e3, mem, compile_s


def tiny_dit_calls(args):
    """Per-call cost of each impl at the tiny DiT's sizes (B=1, nh=4, hd=32)."""
    out = {}
    cases = {"self 112x112 clip_causal": (A.or_masks(A.clip_causal(N, 2, 3), A.reference_visible(N)), 112, 112),
             "cross 112x7 audio_window": (A.audio_window(N, 1, q_offset=N), 112, 7)}
    for name, (mask, lq, lkv) in cases.items():
        q = torch.randn(1, 4, lq, 32)
        k, v = torch.randn(1, 4, lkv, 32), torch.randn(1, 4, lkv, 32)
        row = {}
        for impl in ("sdpa", "math", "flex"):
            with torch.no_grad():
                A.attention(q, k, v, mask, impl)  # compile / build masks
                row[impl] = timeit(lambda: A.attention(q, k, v, mask, impl), "cpu", 0.3, 400) * 1e6
        with torch.no_grad():
            row["auto picks"] = A.choose_impl(q, k, mask)
        out[name] = row
        print(f"  {name:26s} " + "  ".join(f"{i} {row[i]:7.0f} us" for i in ("sdpa", "math", "flex"))
              + f"   auto -> {row['auto picks']}", flush=True)
    return out


def fmt(x, unit=""):
    return "-" if x is None else f"{x:.2f}{unit}"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m minread.bench attention", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"], help="where to run (default: cuda if available)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="sequence lengths (default cpu: 1024 2048 4096; cuda: 16384 8192 4096 1024, "
                        "longest first so the budget never cuts the >= 8k targets)")
    p.add_argument("--masks", nargs="+", default=["full", "clip_causal", "audio_window"],
                   help="masks to time (full, clip_causal, audio_window)")
    p.add_argument("--quick", action="store_true", help="a smoke run: lengths 256 and 1024, forward only on CPU")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--heads", type=int, default=None, help="heads (default cpu 4, cuda 8)")
    p.add_argument("--head-dim", type=int, default=64, help="head dim")
    p.add_argument("--math-max-length", type=int, default=None,
                   help="skip the math path above this length (default cpu 2048, cuda 8192)")
    p.add_argument("--cpu-backward-max-length", type=int, default=2048,
                   help="on CPU, time fwd+bwd (sdpa, math) only up to this length")
    p.add_argument("--kernel-options", type=json.loads, default={},
                   help='settings of the compiled flex kernel as JSON (default: torch\'s), '
                        'e.g. {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}')
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (default cpu 170, cuda 180)")
    args = p.parse_args(argv)
    A.KERNEL_OPTIONS.clear()
    A.KERNEL_OPTIONS.update(args.kernel_options)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    args.dtype = torch.bfloat16 if cuda else torch.float32
    args.heads = args.heads or (8 if cuda else 4)
    lengths = args.lengths or ([256, 1024] if args.quick else
                               [16384, 8192, 4096, 1024] if cuda else [1024, 2048, 4096])
    math_max = args.math_max_length or (8192 if cuda else 2048)
    budget = args.budget_s or (180 if cuda else 170)
    modes = ["fwd"] if args.quick and not cuda else ["fwd", "fwd+bwd"]
    masks = make_masks()
    unknown = set(args.masks) - set(masks)
    if unknown:
        raise SystemExit(f"unknown masks {sorted(unknown)}; choose from {list(masks)}")

    start = time.perf_counter()
    info = machine()
    print(f"attention benchmark on {args.device} ({info.get('gpu', info['cpu'])}, {info['threads']} threads), "
          f"B={args.batch} nh={args.heads} hd={args.head_dim} {str(args.dtype).replace('torch.', '')}", flush=True)
    figures = {"machine": info, "device": args.device, "batch": args.batch, "heads": args.heads,
               "head_dim": args.head_dim, "dtype": str(args.dtype), "kernel_options": args.kernel_options,
               "rows": []}
    if not cuda:
        print("tiny DiT calls (forward, per call):", flush=True)
        figures["tiny_dit"] = tiny_dit_calls(args)

    skipped = []
    for L in lengths:
        for mname in args.masks:
            mask = masks[mname]
            try:
                density = 1 - A.block_mask(mask, L, L, args.device).sparsity() / 100
            except Exception as e:  # e.g. out of memory building the mask
                print(f"  L={L} {mname}: block mask failed: {type(e).__name__}: {str(e)[:120]}")
                density = None
            for mode in modes:
                impls = ["flex", "sdpa", "math"] + (["sdpa_nomask"] if mname == "full" else [])
                if mode == "fwd+bwd" and not cuda:
                    impls.remove("flex")
                    if L > args.cpu_backward_max_length:
                        continue
                if L > math_max:
                    impls.remove("math")
                row = {"length": L, "mask": mname, "mode": mode, "tile_density": density}
                for impl in impls:
                    if time.perf_counter() - start > budget:
                        skipped.append(f"{L} {mname} {mode} {impl}")
                        continue
                    try:
                        ms, mem, comp = measure(impl, mask, L, L, args, mode == "fwd+bwd")
                        row[impl] = {"ms": ms, "mem_mb": mem / 2**20}
                        if comp is not None:
                            row[impl]["compile_s"] = comp
                    except Exception as e:  # e.g. out of memory: report it, keep going
                        row[impl] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
                    if cuda:
                        torch.cuda.empty_cache()
                ms = {i: row[i].get("ms") for i in impls if i in row}
                if ms.get("flex") and ms.get("sdpa"):
                    row["flex/sdpa"] = ms["flex"] / ms["sdpa"]
                if ms.get("flex") and ms.get("sdpa_nomask"):
                    row["flex/sdpa_nomask"] = ms["flex"] / ms["sdpa_nomask"]
                figures["rows"].append(row)
                print(f"  L={L:6d} {mname:12s} {mode:8s} " + "  ".join(
                    f"{i} {fmt(row[i].get('ms'), 'ms') if 'ms' in row[i] else 'ERR'}"
                    for i in impls if i in row) + f"   flex/sdpa {fmt(row.get('flex/sdpa'))}", flush=True)

    print("\n| L | mask | tiles computed | mode | flex ms | sdpa ms | math ms | sdpa no-mask ms "
          "| flex/sdpa | flex MB | sdpa MB | math MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(figures["rows"], key=lambda r: (r["length"], args.masks.index(r["mask"]), r["mode"])):
        get = lambda i, f: r.get(i, {}).get(f)  # noqa: E731
        print(f"| {r['length']} | {r['mask']} | {fmt(r['tile_density'] and 100 * r['tile_density'], '%')} "
              f"| {r['mode']} | {fmt(get('flex', 'ms'))} | {fmt(get('sdpa', 'ms'))} | {fmt(get('math', 'ms'))} "
              f"| {fmt(get('sdpa_nomask', 'ms'))} | {fmt(r.get('flex/sdpa'))} | {fmt(get('flex', 'mem_mb'))} "
              f"| {fmt(get('sdpa', 'mem_mb'))} | {fmt(get('math', 'mem_mb'))} |")
    mem_note = ("peak CUDA memory above inputs" if cuda else
                "CPU: bytes each path materialises (mask, scores, block mask), not measured peaks")
    print(f"\nmemory: {mem_note}; total {time.perf_counter() - start:.0f} s"
          + (f"; budget reached, skipped {len(skipped)} cases" if skipped else ""))
    figures.update(memory_note=mem_note, skipped=skipped, total_s=time.perf_counter() - start)
    report(figures)
