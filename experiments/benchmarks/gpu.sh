#!/usr/bin/env bash
# The four benchmarks at realistic sizes on one GPU, then one table (and the decode's physical floor).
#
#   bash experiments/benchmarks/gpu.sh [OUT_DIR]        # default OUT_DIR: /tmp/spectral_soup_gpu_bench
#
# Budget: under 8 minutes on one H100 (the steps' timeouts add up to 470 s; a step that fails or times out is reported
# and the others still run). Needs jax with CUDA; the PyTorch baselines run on the GPU when torch has CUDA, else
# the PyTorch decode baseline is skipped (a CPU PyTorch MOD loop at these sizes would take longer than the budget)
# and the parameter-merging loops run on the CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
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

if ! "$PY" -c 'import jax, sys; sys.exit(0 if jax.default_backend() == "gpu" else 1)' 2>/dev/null; then
  echo "gpu.sh: jax sees no GPU (backend: $("$PY" -c 'import jax; print(jax.default_backend())' 2>&1 | tail -1))." >&2
  exit 1
fi
"$PY" -c 'import jax; d = jax.devices()[0]; print(f"device: {d.device_kind} x {jax.device_count()}, jax {jax.__version__}")'
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  TORCH_DEVICE=cuda PARAMS_USERS=64
  DECODE_VARIANTS="single,explicit/heads,params/heads,explicit/lora,params/lora,naive/heads,torch-mod/heads"
else
  TORCH_DEVICE=cpu PARAMS_USERS=16  # The CPU loops must fit the step's timeout.
  DECODE_VARIANTS="single,explicit/heads,params/heads,explicit/lora,params/lora,naive/heads"
  DECODE_EXTRA="--no_torch_check"  # A CPU PyTorch loop at these sizes outlasts the budget; naive/heads checks.
  echo "PyTorch has no CUDA: the PyTorch decode baseline and token check are skipped; the params loops run on the CPU."
fi

step() {  # step NAME TIMEOUT_S ARGS...: runs one benchmark, logs to $OUT/NAME.log, never stops the script.
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$PY" -m "experiments.benchmarks.$name" "$@" --json="$OUT/$name.json" > "$OUT/$name.log" 2>&1; then
    echo "$name: done in $((SECONDS - t0)) s"
  else
    echo "$name: FAILED or timed out after $((SECONDS - t0)) s (see $OUT/$name.log)"
  fi
}

# 1. Online: 65,536 users x 30 bases x 64 comparisons; the scikit-learn loop on 2,048 of them (users/s).
step online 60 --users=65536 --bases=30 --comparisons=64 --baseline_users=2048 --loop_users=512
# 2. Params: SmolLM2-shaped q / v LoRA merges (30 layers, 576 -> 576 and 576 -> 192), 64 users x 8 bases.
step params 60 --users="$PARAMS_USERS" --bases=8 --layers=30 --embed=576 --kv_dim=192 --rank=8 --torch_device="$TORCH_DEVICE"
# 3. Train: an 8-layer, 512-wide backbone, 8 bases, 16 pairs x (128 + 128) tokens (no fake devices on a GPU).
step train 80 --bases=8 --layers=8 --embed=512 --heads=8 --head_dim=64 --mlp=1536 --vocab=8192 \
  --prompt_len=128 --response_len=128 --batch=16 --steps=5 --devices=0
# 4. Decode: the embedded SmolLM2, 64 users x 8 bases x 64 new tokens after 32-token prompts.
step decode 270 --users=64 --bases=8 --new_tokens=64 --prompt_len=32 --repeats=2 --variants="$DECODE_VARIANTS" \
  --torch_device="$TORCH_DEVICE" ${DECODE_EXTRA:-}

"$PY" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]
rows = []
def load(name):
  path = os.path.join(out, f"{name}.json")
  return json.load(open(path)) if os.path.exists(path) else None

if (r := load("online")):
  for x in r["rows"]:
    rows.append(("online", x["variant"], f"{x['users_per_s']:,.0f} users/s", f"{x['speedup_vs_strongest_baseline']:.1f}x",
                 f"max|dlam| {x['max_abs_lam_diff_vs_ours']:.1e}"))
if (r := load("params")):
  for x in r["rows"]:
    rows.append(("params", f"{x['workload']}: {x['variant']}", f"{x['users_per_s']:,.1f} users/s",
                 f"{x['speedup_vs_strongest_baseline']:.2f}x", f"{x['output_mb_per_s']:,.0f} MB/s out"))
if (r := load("train")):
  for x in r["rows"]:
    rows.append(("train", x["variant"], f"{x['basis_tokens_per_s']:,.0f} basis-tokens/s", f"{x['vs_separate']:.2f}x",
                 f"{x['update_ms']:.1f} ms/update"))
decode = load("decode")
if decode:
  key = decode["config"]["memory_measure"]
  for x in decode["rows"]:
    rows.append(("decode", x["variant"], f"{x['tokens_per_s']:,.0f} tokens/s",
                 f"{x['vs_naive']:.2f}x" if x.get("vs_naive") else "-",
                 f"{x.get(key, 0):,.0f} MiB peak, {x['share_of_floor']:.0%} of floor"))
widths = [max(len(str(r[i])) for r in rows + [("bench", "variant", "rate", "vs baseline", "notes")]) for i in range(5)]
fmt = "  ".join(f"{{:<{w}}}" for w in widths)
print(fmt.format("bench", "variant", "rate", "vs baseline", "notes"))
print(fmt.format(*["-" * w for w in widths]))
for r in rows:
  print(fmt.format(*r))
for name in ("online", "params", "train", "decode"):
  r = load(name)
  if r is not None:
    print(f"{name}: speedup {r['speedup']:.2f}x" + (f", targets {r['targets']}" if r.get("targets") else ""))
if decode:
  rates, c = decode["rates"], decode["config"]
  bw = rates["bandwidth_bytes_per_s"]
  for x in decode["rows"]:
    if x["variant"] in ("single", "explicit/heads", "naive/heads"):
      read_mb = x["passes_per_step"] * x["weight_mb"] + x["kv_cache_mb"]
      floor_ms = read_mb * 2**20 / bw * 1e3
      print(f"decode floor, {x['variant']}: {x['passes_per_step']} x {x['weight_mb']:.0f} MiB weights + "
            f"{x['kv_cache_mb']:.0f} MiB KV cache read per token step / {bw / 1e9:.0f} GB/s = {floor_ms:.2f} ms "
            f"-> at most {c['users'] * 1e3 / floor_ms:,.0f} tokens/s for {c['users']} users "
            f"(measured {x['tokens_per_s']:,.0f}).")
EOF
