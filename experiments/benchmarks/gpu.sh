#!/usr/bin/env bash
# The benchmarks at realistic sizes on one GPU, the paper-size training step, then one table (floors and shares).
#
#   bash experiments/benchmarks/gpu.sh [--tiny] [OUT_DIR]        # default OUT_DIR: /tmp/spectral_soup_gpu_bench
#
# Steps (each with its own timeout; one that fails or times out is reported and the others still run; the exit
# status is 1 when any step's JSON is missing or unreadable):
#   online   65,536 users x 30 bases x 64 comparisons; the scikit-learn loop on 2,048 users
#   params   SmolLM2-shaped q / v LoRA merges (30 layers), 64 users x 8 bases
#   train    an 8-layer, 512-wide backbone, 8 bases: K bases in one step vs K separate models
#   train_1b the paper-size step: Gemma 3 1B-shaped random backbone, K = 30 LoRA bases and K = 30 heads, bf16, the
#            step of spectral_soup/offline/steps.py sharded as offline/train.py shards it, one pair of 128 + 192
#            tokens per device: step time, tokens/s, MFU, peak memory
#   decode   SmolLM2 (random weights of its shape where the GGUF is not installed), 64 users x 8 bases x 64 new
#            tokens, the backbone alone and the head soups (explicit, params, naive K+1 passes, PyTorch's K+1-pass
#            loop), float32 matmuls at full precision so that the greedy tokens can be checked against PyTorch
#   decode_256  256 users, the backbone alone and the explicit soup, at jax's default matmul precision
# Budget: under 10 minutes on one H200 (the timeouts add up to 550 s; run nothing else on the machine meanwhile:
# compiles are CPU-bound). Needs jax with a GPU backend; the PyTorch
# baselines run on the GPU when torch has CUDA, else on the CPU (the PyTorch decode loop is then skipped).
# --tiny: every step at toy sizes, on whatever backend jax has (CPU included): tests/test_gpu_bench.py runs it so
# that this script cannot rot between GPU runs.
# Packages the machine lacks: `python -m experiments.benchmarks.gpu_prepare` here prints the command to run there.
set -uo pipefail
cd "$(dirname "$0")/../.."
TINY=0
if [[ "${1:-}" == "--tiny" ]]; then TINY=1; shift; fi
OUT="${1:-/tmp/spectral_soup_gpu_bench}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Every variant of `decode` runs in its own process next to the parent's: no process may grab 75% of the card.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SPECTRAL_SOUP_PROGRESS=0
# The wait for an idle CPU (up to 120 s per variant on a 2-core machine) does not fit a GPU budget: rows still
# record the load they ran at.
export SPECTRAL_SOUP_BENCH_IDLE_WAIT_S="${SPECTRAL_SOUP_BENCH_IDLE_WAIT_S:-0}"

BACKEND="$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null | tail -1)"
if [[ "$TINY" == 0 && "$BACKEND" != "gpu" ]]; then
  echo "gpu.sh: jax sees no GPU (backend: ${BACKEND:-jax failed to import}); --tiny runs the toy sizes anywhere." >&2
  exit 1
fi
"$PY" - <<'EOF'
import importlib, platform, jax
d = jax.devices()[0]
versions = []
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "transformers", "torch", "numpy"):
  try:
    versions.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
  except Exception as e:  # pylint: disable=broad-except
    versions.append(f"{name} missing ({type(e).__name__})")
print(f"device: {d.device_kind} x {jax.device_count()} ({jax.default_backend()}); Python {platform.python_version()}; "
      + ", ".join(versions), flush=True)
EOF
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  TORCH_DEVICE=cuda TORCH_CHECK=""
else
  TORCH_DEVICE=cpu TORCH_CHECK="--no_torch_check"  # A CPU PyTorch loop at GPU sizes outlasts the budget.
  [[ "$TINY" == 1 ]] && TORCH_CHECK=""            # At toy sizes it is quick.
  echo "PyTorch has no CUDA: its loops run on the CPU."
fi
DECODE_VARIANTS="single,explicit/heads,params/heads,naive/heads"  # LoRA soups: decode.py at the CPU's sizes.
[[ "$TORCH_DEVICE" == cuda || "$TINY" == 1 ]] && DECODE_VARIANTS="$DECODE_VARIANTS,torch-mod/heads"

step() {  # step LABEL MODULE TIMEOUT_S ARGS...: one benchmark, logged to $OUT/LABEL.log; never stops the script.
  local label="$1" name="$2" limit="$3"; shift 3
  local t0=$SECONDS
  if timeout "$limit" "$PY" -m "experiments.benchmarks.$name" "$@" --json="$OUT/$label.json" > "$OUT/$label.log" 2>&1
  then
    echo "$label: done in $((SECONDS - t0)) s"
  else
    echo "$label: FAILED or timed out after $((SECONDS - t0)) s (see $OUT/$label.log)"
    rm -f "$OUT/$label.json"
  fi
}

if [[ "$TINY" == 1 ]]; then
  # Toy sizes are compile-bound, about one core per step: two lanes of steps at once (2-core CPU: 69 s, not 102).
  # Their limits only catch a hang: a loaded CPU (a test suite beside it) slows the compiles several times.
  TINY_LIMIT=400
  (
    step online online $TINY_LIMIT --users=256 --bases=4 --comparisons=16 --baseline_users=16 --loop_users=8 \
      --min_time_s=0
    step params params $TINY_LIMIT --users=4 --bases=2 --layers=2 --embed=64 --kv_dim=32 --rank=2 --min_time_s=0 \
      --torch_device="$TORCH_DEVICE"
    step train train $TINY_LIMIT --bases=2 --layers=1 --embed=32 --heads=2 --head_dim=16 --mlp=64 --vocab=128 \
      --prompt_len=8 --response_len=8 --batch=2 --steps=1 --devices=0
    step decode_256 decode $TINY_LIMIT --model=tiny --users=8 --bases=2 --new_tokens=4 --prompt_len=4 --repeats=1 \
      --variants=single,explicit/heads --matmul_size=256 --copy_mb=8 --no_torch_check
  ) &
  step train_1b train $TINY_LIMIT --preset=gemma3_1b --bases=3 --layers=2 --embed=64 --head_dim=16 --mlp=128 \
    --vocab=512 --prompt_len=8 --response_len=8 --steps=1
  step decode decode $TINY_LIMIT --model=tiny --users=4 --bases=2 --new_tokens=4 --prompt_len=4 --repeats=1 \
    --variants=explicit/heads,naive/heads,torch-mod/heads --torch_device="$TORCH_DEVICE" --matmul_size=256 \
    --copy_mb=8 $TORCH_CHECK
  wait
else
  # scikit-learn's liblinear solver fits ~10 users/s: the loop baseline is its newton-cholesky solver.
  step online online 45 --users=65536 --bases=30 --comparisons=64 --baseline_users=2048 --loop_users=256 \
    --solvers=newton-cholesky
  step params params 45 --users=64 --bases=8 --layers=30 --embed=576 --kv_dim=192 --rank=8 \
    --torch_device="$TORCH_DEVICE"
  step train train 50 --bases=8 --layers=8 --embed=512 --heads=8 --head_dim=64 --mlp=1536 --vocab=8192 \
    --prompt_len=128 --response_len=128 --batch=16 --steps=5 --devices=0
  step train_1b train 180 --preset=gemma3_1b --kinds=lora,heads --steps=3
  JAX_DEFAULT_MATMUL_PRECISION=highest step decode decode 170 --users=64 --bases=8 --new_tokens=64 --prompt_len=32 \
    --repeats=2 --variants="$DECODE_VARIANTS" --torch_device="$TORCH_DEVICE" $TORCH_CHECK
  step decode_256 decode 60 --users=256 --bases=8 --new_tokens=64 --prompt_len=32 --repeats=2 \
    --variants=single,explicit/heads --no_torch_check
fi

"$PY" -m experiments.benchmarks.gpu_table "$OUT"
