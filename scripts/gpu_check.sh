#!/usr/bin/env bash
# One-GPU check, about 10 minutes: the GPU attention tests and benchmark, a short small-preset
# training run (128 px, 32x32x8 VAE, 512-wide DiT), then generation and the results tables.
#
#   bash scripts/gpu_check.sh                  # from the repository root, torch with CUDA installed
#   VAE_STEPS=50 SPEECH_STEPS=50 DIT_STEPS=50 bash scripts/gpu_check.sh   # shorter
#   DEVICE=cpu DATA=/tmp/toy_small IDS=1 VAE_STEPS=2 SPEECH_STEPS=2 DIT_STEPS=2 BATCH=2 bash scripts/gpu_check.sh
#
# The VAE alone, trained to quality on rendered faces: python scripts/gpu_vae_small.py (its own ~10 minutes).
#
# Everything is printed (and kept in $OUT_DIR/gpu_check.log). PyAV is needed to read data_toy's mp4 and wav
# files: it is pip-installed when missing and a registry is reachable; without it the data-dependent steps
# (training, generation) are reported as SKIPPED and the attention steps still run. The exit status is
# non-zero when any step that ran failed.
#
# The training step calls minread.train.train() directly: the command line equivalent,
# `python -m minread train --stage all --preset small --out-dir $OUT_DIR --restart --vae-steps N
# --speech-steps N --dit-steps N --batch-size B --data-root DATA`, has no flag for the VAE's face bank
# (1600 faces rendered: minutes) or for forcing the CPU, which this short check needs.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
DATA=${DATA:-data_toy}
OUT_DIR=${OUT_DIR:-runs/gpu_check}
VAE_STEPS=${VAE_STEPS:-300}        # small-preset VAE steps
SPEECH_STEPS=${SPEECH_STEPS:-100}  # SpeechAE steps (train_speech_ae runs on the CPU only)
DIT_STEPS=${DIT_STEPS:-400}        # A2V-DiT steps
BATCH=${BATCH:-16}                 # DiT batch (the small preset's)
EXTRA_CLIPS=${EXTRA_CLIPS:-0}      # clips rendered in memory for the DiT (preset 640; needs praat-parselmouth)
VAE_IDENTITIES=${VAE_IDENTITIES:-0}  # faces the VAE renders to train on (preset 400: minutes on one core;
                                     # 0 = DATA's train split)
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-330}  # seconds for the whole training step
IDS=${IDS:-2}                      # held-out identities in the generation benchmarks
LONG_SECONDS=${LONG_SECONDS:-20}   # length of the long-video check (10 s windows)
# flex kernel settings to time beside torch's defaults at 8k tokens after the attention benchmark
# (JSON objects without spaces, space-separated); empty = skip. E.g.
# KERNEL_SWEEP='{"ROWS_GUARANTEED_SAFE":true} {"bwd_BLOCK_M1":64,"bwd_BLOCK_N1":64,"bwd_BLOCK_M2":64,"bwd_BLOCK_N2":64}'
KERNEL_SWEEP=${KERNEL_SWEEP:-}
AUTOTUNE=${AUTOTUNE:-0}            # 1: also time flex with compiler-chosen tiles (max_autotune) at 8k
ATTN_BATCH=${ATTN_BATCH:-4}        # also time the 8k full and clip-causal masks at this batch (more kernel
                                   # programs than batch 1 keeps SMs busy under the causal mask); 0 = skip
export OMP_WAIT_POLICY=PASSIVE MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
exec > >(tee "$OUT_DIR/gpu_check.log") 2>&1

start=$(date +%s)
declare -a results
failed=0

step() {  # step NAME TIMEOUT_S COMMAND...: run, time and record one step
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo; echo "=== $name  ($(date -u +%H:%M:%S), limit ${limit} s)"; echo "+ $*"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then results+=("ok      $name (${took} s)")
  else results+=("FAILED  $name (rc $rc$( ((rc == 124)) && echo ', timed out'), ${took} s)"); failed=1; fi
}

skip() { echo; echo "=== $1: SKIPPED ($2)"; results+=("SKIPPED $1 ($2)"); }

echo "=== machine"
nvidia-smi || echo "(no nvidia-smi)"
python - <<'EOF' || { echo "torch missing"; exit 1; }
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
if [[ $DEVICE == cuda ]] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "DEVICE=cuda but torch sees no GPU"; exit 1
fi

for pkg in numpy tqdm pytest; do
  python -c "import $pkg" 2>/dev/null || timeout 120 pip install -q "$pkg" || echo "could not install $pkg"
done
python -c "import av" 2>/dev/null || timeout 120 pip install -q av || echo "PyAV could not be installed (no registry?)"
if python -c "import av" 2>/dev/null; then HAVE_AV=1; else HAVE_AV=0; fi
python -c "import parselmouth" 2>/dev/null || echo "(praat-parselmouth absent: only needed to render data, not to read data_toy)"

# 1. the GPU tests (attention kernels, the DiT's CUDA graphs) and the attention benchmark
if [[ $DEVICE == cuda ]]; then
  step "pytest -m gpu (attention, DiT CUDA graphs)" 180 python -m pytest -q -m gpu tests/test_attention.py tests/test_dit.py
  step "bench attention --device cuda" 200 python -m minread.bench attention --device cuda --budget-s 120
  if (( ATTN_BATCH > 0 )); then
    step "bench attention at batch $ATTN_BATCH" 150 python -m minread.bench attention --device cuda \
      --lengths 8192 --masks full clip_causal --math-max-length 1 --batch "$ATTN_BATCH" --budget-s 100
  fi
  if [[ -n $KERNEL_SWEEP ]]; then
    # shellcheck disable=SC2086  # one argument per JSON object
    step "bench attention, kernel settings side by side" 200 python -m minread.bench attention --device cuda \
      --lengths 8192 --masks full clip_causal --math-max-length 1 --kernel-options '{}' $KERNEL_SWEEP --budget-s 150
  fi
  if (( AUTOTUNE )); then
    step "bench attention --autotune" 200 python -m minread.bench attention --device cuda --lengths 8192 \
      --masks clip_causal full --modes fwd+bwd --math-max-length 1 --autotune --budget-s 150
  fi
else
  skip "attention GPU tests and benchmark" "DEVICE=$DEVICE"
fi

# 2. a short small-preset training run: VAE -> SpeechAE -> A2V-DiT, then the generation bundle
if (( HAVE_AV )) && [[ -f $DATA/manifest.json ]]; then
  step "train --stage all --preset small (${VAE_STEPS}/${SPEECH_STEPS}/${DIT_STEPS} steps)" "$TRAIN_TIMEOUT" \
    python - "$OUT_DIR" "$DATA" "$VAE_STEPS" "$SPEECH_STEPS" "$DIT_STEPS" "$BATCH" "$DEVICE" "$VAE_IDENTITIES" "$EXTRA_CLIPS" <<'EOF'
import sys, time
from dataclasses import replace
import torch
from minread import train as tr
from minread import vae as vae_mod
out, data, vae_steps, speech_steps, dit_steps, batch, device, vae_ids, extra = sys.argv[1:]
if device == "cpu":                   # train() picks CUDA whenever it is there; hide it for a CPU check
    torch.cuda.is_available = lambda: False
# train() passes only the step count on to train_vae; the face bank size goes in here
_train_vae = vae_mod.train_vae
vae_mod.train_vae = lambda *a, **k: _train_vae(*a, **{"identities": int(vae_ids), **k})
vae_cfg, speech_cfg, dit_cfg, tc = tr.presets("small")
speech_cfg = replace(speech_cfg, batch_size=min(speech_cfg.batch_size, 4 * int(batch)),
                     eval_every=max(1, int(speech_steps) // 2))
dit_steps = int(dit_steps)
tc = replace(tc, out_dir=out, data_root=data, vae_steps=int(vae_steps), speech_steps=int(speech_steps),
             steps=dit_steps, batch_size=int(batch), warmup=min(tc.warmup, max(1, dit_steps // 5)),
             ckpt_every=max(1, dit_steps), eval_every=max(1, dit_steps), eval_clips=2 if dit_steps >= 10 else 0,
             log_every=max(1, dit_steps // 10), extra_clips=int(extra))
t0 = time.time()
stats = tr.train("all", "small", vae_cfg=vae_cfg, speech_cfg=speech_cfg, dit_cfg=dit_cfg, tc=tc, resume=False)
print(f"small preset: {time.time() - t0:.0f} s; last DiT records: {stats['dit']['history'][-2:]}")
for name in ("vae", "speech_ae"):
    print(name, {k: v for k, v in stats[name].items() if k != "history"})
EOF
else
  skip "small-preset training" "$( ((HAVE_AV)) && echo "no $DATA/manifest.json" || echo "PyAV missing: data_toy cannot be read")"
fi

# 3. generation and the results tables from the bundle just trained
BUNDLE=$OUT_DIR/model.pt
if [[ -f $BUNDLE ]]; then
  step "bench generate (small, $DEVICE)" 120 python -m minread.bench generate --ckpt "$BUNDLE" --data "$DATA" \
    --identities "$IDS" --sentences 2 --device "$DEVICE"
  step "bench long (small, $DEVICE, $LONG_SECONDS s)" 150 python -m minread.bench long --ckpt "$BUNDLE" \
    --data "$DATA" --seconds "$LONG_SECONDS" --window 10 --identities 1 --device "$DEVICE" --curves "$OUT_DIR/long_curves.json" \
    --plot "$OUT_DIR/long_curves.png" --video "$OUT_DIR/long"
  step "demo mp4 (held-out clip)" 60 python -m minread demo --ckpt "$BUNDLE" --data "$DATA" --out "$OUT_DIR/demo.mp4"
else
  skip "generation benchmarks" "no bundle $BUNDLE (training did not finish)"
fi

echo; echo "=== summary ($(( $(date +%s) - start )) s in all)"
printf '%s\n' "${results[@]}"
exit $failed
