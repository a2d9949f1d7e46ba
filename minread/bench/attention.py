"""Attention benchmark: `python -m minread.bench attention [--device cpu|cuda] [--quick]`.

For each sequence length and mask, times forward and forward+backward of compiled
FlexAttention ("flex"), SDPA with the dense boolean mask ("sdpa") and the written-out
softmax ("math"), side by side in one run, with flex/SDPA ratios and memory; for the
full mask also unmasked SDPA ("sdpa_nomask": whichever fused kernel torch picks, named in
the output; on CUDA also "sdpa_flash" and "sdpa_cudnn", the same call held to the flash and
to cuDNN's kernel).
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

Timings: "ms" is the median time of one call, waited for (the host issues the call and
waits until the device has finished it). On CUDA two more figures per call: "queued"
(calls issued back to back and waited for once, timed with CUDA events: the GPU's time
per call when the host runs ahead of it, as in a training loop) and "host" (the host's
time to issue one call: Python, dispatch, compiled-code guards, kernel launches). Where
host work before a call's first kernel is a large share, as for compiled flex fwd+bwd
below 8k tokens, the waited-for time counts it on every call and queued does not.

Memory: on CUDA the peak of torch.cuda.max_memory_allocated during the call, above the
inputs. On CPU torch does not track its allocations, so we report the sizes of what
each path materialises: the dense (Lq, Lkv) bool mask for sdpa, mask + float scores for
math, the BlockMask tensors for flex (its fused kernel keeps scores in registers).
Compiled FlexAttention has no backward on CPU (torch 2.13), so CPU fwd+bwd rows show
sdpa and math only. CPU runs float32; CUDA runs bfloat16, and its forward rows time the
forward of a training step (inputs require grad), so each case compiles flex once. Each new
(length, mask) compiles once; compile time is reported and excluded from the timings.

Kernel settings (CUDA): `--kernel-options` takes one or more JSON objects of FlexAttention
kernel options; with several, flex is timed once per setting in the same run ("flex" is
the first, "flex@1", "flex@2", ... the others) against the same SDPA baselines.
`--autotune` lets the compiler time its candidate tile sizes for each new shape instead
of taking its default (inductor's max_autotune: slower first compile, then the fastest
kernel it found).
"""

import argparse
import json
import statistics
import time

import torch
import torch._inductor.config  # noqa: F401  (max_autotune, set by --autotune)

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


def timeit_queued(fn, seconds_per_call, budget_s=0.05):
    """CUDA: (GPU ms, host ms) per call with calls queued back to back and waited for once,
    timed by CUDA events: the GPU's time per call when the host runs ahead of it, as in a
    training loop, and the host's time to issue one call (Python, dispatch, guards, launches).
    `timeit` waits for every call, so it adds whatever host work comes before a call's
    first kernel to each call; queued, that work overlaps the GPU's and is hidden wherever
    the GPU is the slower of the two (where the host is slower, GPU ms ~ host ms)."""
    reps = max(10, min(200, int(budget_s / max(seconds_per_call, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    gpu, host = [], []
    for _ in range(3):
        torch.cuda.synchronize()
        fn()           # the GPU is busy with this one while the host issues the timed calls
        start.record()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host.append((time.perf_counter() - t0) / reps)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(gpu) * 1e3, statistics.median(host) * 1e3


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


def sdpa_backend(q):
    """Name of the kernel unmasked SDPA picks for q (B, nh, L, hd) as key and value too."""
    from torch.nn.attention import SDPBackend
    choice = torch._fused_sdp_choice(q, q, q)
    names = [b.name for b in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.CUDNN_ATTENTION) if int(b) == choice]
    return names[0] if names else str(choice)


def call(q, k, v, mask, impl):
    if impl in ("sdpa_flash", "sdpa_cudnn"):  # unmasked SDPA held to one kernel
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
        with sdpa_kernel(backend):
            return A.attention(q, k, v, None, "sdpa")
    return A.attention(q, k, v, mask, impl)


def run_case(impl, mask, q, k, v, backward):
    def fn():
        if backward:
            for t in (q, k, v):
                t.grad = None
            call(q, k, v, mask, impl).backward(grad_out)
        elif q.requires_grad:  # CUDA: the forward of a training step (one compile per case)
            call(q, k, v, mask, impl)
        else:
            with torch.no_grad():
                call(q, k, v, mask, impl)
    grad_out = torch.randn_like(q)
    return fn


def measure(impl, mask, lq, lkv, args, backward):
    """One timing: {"ms": per call, each waited for; on CUDA also "queued_ms" and "host_ms"
    (timeit_queued); "mem_mb"; for flex "compile_s"}. impl "flex@i" is flex with the i-th
    --kernel-options setting."""
    device, dtype = args.device, args.dtype
    if impl.startswith("flex"):
        A.KERNEL_OPTIONS.clear()
        A.KERNEL_OPTIONS.update(args.kernel_options[int(impl[5:] or 0)])
        impl = "flex"
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
    out = {"ms": seconds * 1e3}
    if device == "cuda":
        out["queued_ms"], out["host_ms"] = timeit_queued(fn, seconds)
    mem = peak_bytes(fn, device)
    out["mem_mb"] = (cpu_bytes(impl, mask, args.batch, args.heads, lq, lkv) if mem is None else mem) / 2**20
    if compile_s is not None:
        out["compile_s"] = compile_s
    return out


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


def timing_text(fig):
    """One impl's timings for the progress line: "0.80ms" or, on CUDA, "0.80ms (queued 0.52, host 0.31)"."""
    if "ms" not in fig:
        return "ERR"
    return fmt(fig["ms"], "ms") + (f" (queued {fmt(fig['queued_ms'])}, host {fmt(fig['host_ms'])})"
                                   if "queued_ms" in fig else "")


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
    p.add_argument("--kernel-options", type=json.loads, nargs="+", default=[{}],
                   help='settings of the compiled flex kernel as JSON (default: torch\'s), '
                        'e.g. {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}; '
                        'several are timed side by side (flex, flex@1, ...)')
    p.add_argument("--autotune", action="store_true",
                   help="CUDA: let the compiler time candidate flex tile sizes per shape (max_autotune)")
    p.add_argument("--modes", nargs="+", default=None, choices=["fwd", "fwd+bwd"],
                   help="what to time (default both; CPU --quick: fwd)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new cases after this many seconds (default cpu 170, cuda 180)")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    args.dtype = torch.bfloat16 if cuda else torch.float32
    args.heads = args.heads or (8 if cuda else 4)
    lengths = args.lengths or ([256, 1024] if args.quick else
                               [16384, 8192, 4096, 1024] if cuda else [1024, 2048, 4096])
    math_max = args.math_max_length or (8192 if cuda else 2048)
    budget = args.budget_s or (180 if cuda else 170)
    modes = args.modes or (["fwd"] if args.quick and not cuda else ["fwd", "fwd+bwd"])
    flexes = ["flex"] + [f"flex@{i}" for i in range(1, len(args.kernel_options))]
    masks = make_masks()
    unknown = set(args.masks) - set(masks)
    if unknown:
        raise SystemExit(f"unknown masks {sorted(unknown)}; choose from {list(masks)}")

    saved = dict(A.KERNEL_OPTIONS), torch._inductor.config.max_autotune   # set for this run only
    torch._inductor.config.max_autotune = args.autotune or saved[1]
    try:
        figures = run(args, lengths, masks, modes, flexes, math_max, budget, cuda)
    finally:
        A.KERNEL_OPTIONS.clear()
        A.KERNEL_OPTIONS.update(saved[0])
        torch._inductor.config.max_autotune = saved[1]
    report(figures)


def run(args, lengths, masks, modes, flexes, math_max, budget, cuda):
    start = time.perf_counter()
    info = machine()
    print(f"attention benchmark on {args.device} ({info.get('gpu', info['cpu'])}, {info['threads']} threads), "
          f"B={args.batch} nh={args.heads} hd={args.head_dim} {str(args.dtype).replace('torch.', '')}", flush=True)
    figures = {"machine": info, "device": args.device, "batch": args.batch, "heads": args.heads,
               "head_dim": args.head_dim, "dtype": str(args.dtype), "kernel_options": args.kernel_options,
               "autotune": args.autotune, "rows": []}
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
                impls = flexes + ["sdpa", "math"] + (["sdpa_nomask"] if mname == "full" else [])
                if mname == "full" and cuda:
                    impls += ["sdpa_flash", "sdpa_cudnn"]
                if mode == "fwd+bwd" and not cuda:
                    impls = [i for i in impls if not i.startswith("flex")]
                    if L > args.cpu_backward_max_length:
                        continue
                if L > math_max:
                    impls.remove("math")
                row = {"length": L, "mask": mname, "mode": mode, "tile_density": density}
                if mname == "full":
                    try:
                        row["sdpa_nomask_backend"] = sdpa_backend(torch.randn(args.batch, args.heads, L, args.head_dim,
                                                                              device=args.device, dtype=args.dtype))
                    except Exception as e:
                        row["sdpa_nomask_backend"] = f"unknown ({type(e).__name__})"
                for impl in impls:
                    if time.perf_counter() - start > budget:
                        skipped.append(f"{L} {mname} {mode} {impl}")
                        continue
                    try:
                        row[impl] = measure(impl, mask, L, L, args, mode == "fwd+bwd")
                    except Exception as e:  # e.g. out of memory: report it, keep going
                        row[impl] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
                    if cuda:
                        torch.cuda.empty_cache()
                for timing, suffix in (("ms", ""), ("queued_ms", " queued")):
                    ms = {i: row[i].get(timing) for i in impls if i in row}
                    for f in flexes:
                        for base in ("sdpa", "sdpa_nomask", "sdpa_flash", "sdpa_cudnn"):
                            if ms.get(f) and ms.get(base):
                                row[f"{f}/{base}{suffix}"] = ms[f] / ms[base]
                figures["rows"].append(row)
                print(f"  L={L:6d} {mname:12s} {mode:8s} " + "  ".join(
                    f"{i} {timing_text(row[i])}" for i in impls if i in row) + "  " + "  ".join(
                    f"{r} {fmt(row[r])}" for r in row if "/" in r)
                    + (f"  (sdpa_nomask = {row['sdpa_nomask_backend']})" if "sdpa_nomask_backend" in row else ""),
                    flush=True)

    queued = " flex / sdpa queued ms | flex/sdpa queued | flex host ms |" if cuda else ""
    print("\n| L | mask | tiles computed | mode | flex | flex ms | sdpa ms | math ms | sdpa no-mask ms "
          f"| flex/sdpa |{queued} flex MB | sdpa MB | math MB |")
    print("|---" * (13 + 3 * cuda) + "|")
    for r in sorted(figures["rows"], key=lambda r: (r["length"], args.masks.index(r["mask"]), r["mode"])):
        get = lambda i, f: r.get(i, {}).get(f)  # noqa: E731
        for f in flexes:
            if f not in r and f != "flex":
                continue
            q = (f" {fmt(get(f, 'queued_ms'))} / {fmt(get('sdpa', 'queued_ms'))} | {fmt(r.get(f + '/sdpa queued'))} "
                 f"| {fmt(get(f, 'host_ms'))} |" if cuda else "")
            print(f"| {r['length']} | {r['mask']} | {fmt(r['tile_density'] and 100 * r['tile_density'], '%')} "
                  f"| {r['mode']} | {f} | {fmt(get(f, 'ms'))} | {fmt(get('sdpa', 'ms'))} | {fmt(get('math', 'ms'))} "
                  f"| {fmt(get('sdpa_nomask', 'ms'))} | {fmt(r.get(f + '/sdpa'))} |{q} {fmt(get(f, 'mem_mb'))} "
                  f"| {fmt(get('sdpa', 'mem_mb'))} | {fmt(get('math', 'mem_mb'))} |")
    if len(flexes) > 1:
        print("kernel options: " + "; ".join(f"{f} {json.dumps(o)}" for f, o in zip(flexes, args.kernel_options)))
    mem_note = ("peak CUDA memory above inputs" if cuda else
                "CPU: bytes each path materialises (mask, scores, block mask), not measured peaks")
    print(f"\nmemory: {mem_note}; total {time.perf_counter() - start:.0f} s"
          + (f"; budget reached, skipped {len(skipped)} cases" if skipped else ""))
    figures.update(memory_note=mem_note, skipped=skipped, total_s=time.perf_counter() - start)
    return figures
