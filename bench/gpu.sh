#!/usr/bin/env bash
# One GPU, one run, one table: tokens/s, MFU and peak memory of each variant of a spec's plan,
# beside the plan's predictions (llama3gen.lock.json). Made for a single H200 or H100; finishes in
# under 8 minutes (each variant is capped at --variant-timeout seconds).
#
#   bash bench/gpu.sh                        # specs/1.36e21.yaml, every variant, torch.compile on
#   bash bench/gpu.sh --out DIR              # keep the compiled repo, results.jsonl and table.md
#   bash bench/gpu.sh --dry-cpu              # the same pipeline on CPU with specs/tiny-cpu.yaml
#   bash bench/gpu.sh --repo DIR             # measure an already compiled repo (skip compiling)
#   bash bench/gpu.sh --compile off          # eager, for comparison
#
# What runs (bench/gpu_train.py does the measuring): the generated repo's own model.py, AdamW and
# gradient clipping, wrapped as its train.py wraps them for FSDP2 (here a world of one rank),
# bf16 parameters with fp32 reduction, torch.compile block by block, flash-attn if installed
# (else PyTorch SDPA), synthetic tokens, the plan's micro-batch (override: --micro-batch N),
# --warmup steps then --steps timed steps.
#
# Needs python3 with torch (CUDA build) on the GPU machine; llama3gen is used when installed,
# otherwise from this checkout (numpy, pydantic, pyyaml, jinja2 must then be importable).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SPEC="specs/1.36e21.yaml"
OUT_DIR=""
REPO=""
STEPS=10
WARMUP=3
MICRO=0
DEVICE=cuda
VARIANT_TIMEOUT=200
EXTRA=()

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --spec) SPEC="$2"; shift 2 ;;
    --out) OUT_DIR="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --micro-batch) MICRO="$2"; shift 2 ;;
    --variant-timeout) VARIANT_TIMEOUT="$2"; shift 2 ;;
    --compile) EXTRA+=(--compile "$2"); shift 2 ;;  # on (default), off, or plan
    --dry-cpu)  # a smoke run of the whole pipeline where there is no GPU
      SPEC="specs/tiny-cpu.yaml"; DEVICE=cpu; STEPS=2; WARMUP=1
      EXTRA+=(--compile off --matmul 256); shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

START=$SECONDS
if [ -z "$OUT_DIR" ]; then OUT_DIR="$(mktemp -d -t llama3gen-gpu-bench.XXXXXX)"; fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
RESULTS="$OUT_DIR/results.jsonl"
: > "$RESULTS"
cd "$ROOT"
export PYTHONUNBUFFERED=1
# Keep inductor's caches with the results (and off a small /tmp); several compile workers.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$OUT_DIR/inductor-cache}"

echo "== environment"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
fi
"$PY" - <<'EOF'
import importlib.util, torch
print(f"python torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
print("flash-attn:", "installed" if importlib.util.find_spec("flash_attn") else "not installed (SDPA)")
EOF

# llama3gen: installed, else this checkout's compiler/ under the import name llama3gen.
if command -v llama3gen >/dev/null 2>&1; then
  L3G=(llama3gen)
elif "$PY" -c "import llama3gen.cli" >/dev/null 2>&1; then
  L3G=("$PY" -m llama3gen.cli)
else
  mkdir -p "$OUT_DIR/pkg"
  ln -sfn "$ROOT/compiler" "$OUT_DIR/pkg/llama3gen"
  export PYTHONPATH="$OUT_DIR/pkg${PYTHONPATH:+:$PYTHONPATH}"
  L3G=("$PY" -m llama3gen.cli)
fi

if [ -z "$REPO" ]; then
  REPO="$OUT_DIR/repo"
  echo "== ${L3G[*]} compile $SPEC -o $REPO"
  rm -rf "$REPO"
  t0=$SECONDS
  "${L3G[@]}" compile "$SPEC" -o "$REPO"
  echo "(compiled in $((SECONDS - t0)) s)"
fi
REPO="$(cd "$REPO" && pwd)"

VARIANTS=$("$PY" -c 'import json,sys; print(" ".join(v["name"] for v in json.load(open(sys.argv[1]))["plan"]["variants"]))' "$REPO/llama3gen.lock.json")
FAILED=()
for variant in $VARIANTS; do
  echo "== $variant: $STEPS steps after $WARMUP warm-up steps (limit ${VARIANT_TIMEOUT} s)"
  t0=$SECONDS
  if ! timeout --signal=TERM --kill-after=15 "$VARIANT_TIMEOUT" \
      "$PY" bench/gpu_train.py --repo "$REPO" --variant "$variant" --steps "$STEPS" \
      --warmup "$WARMUP" --micro-batch "$MICRO" --device "$DEVICE" --out "$RESULTS" \
      ${EXTRA[@]+"${EXTRA[@]}"}; then
    echo "!! $variant failed or ran past ${VARIANT_TIMEOUT} s" >&2
    FAILED+=("$variant")
  fi
  echo "($variant took $((SECONDS - t0)) s)"
done

echo
echo "== results ($((SECONDS - START)) s in all; spec $SPEC)"
"$PY" bench/gpu_train.py --table "$RESULTS" | tee "$OUT_DIR/table.md"
echo "results: $RESULTS"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
