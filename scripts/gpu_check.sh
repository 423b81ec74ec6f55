#!/usr/bin/env bash
# The paper-scale GPU check (issue 12) in one run, sized to finish in under 8 minutes on one H100/H200 (machine
# start not included). Parts, each under its own timeout and all under one overall budget, so that one hang cannot
# eat the rest; a part that fails or times out is recorded and the next one runs:
#   preflight  versions, GPU, and that spatial_mllm and the benchmark import
#   inference  benchmarks/paper_scale.py --parts projector inference: every paper projector, bf16, SDPA (prefill and
#              decode tokens/s at batch 1 and 8; transformers' Llava beside mlp2x_gelu)
#   train      --parts train: stage 1, stage 2 LoRA r=128 and full, for the four paper projectors
#   fsdp       a few stage-2 (LoRA) steps under FSDP on one GPU (accelerate launch with launch_fsdp.yaml; weights
#              stored in float32, as FSDP needs one dtype, computed in bf16) on a synthetic run
#              (scripts/gpu_check_fixture.py: 7B-wide LLM cut to 4 layers, a small built-in world), then the trained
#              folder loaded with from_pretrained and asked one question
#   fast       --parts fast: static KV cache + CUDA graphs (compiled decode) against transformers' Llava
#   qlora      skipped: bitsandbytes is not installed, or the training engine has no 4-bit path to run
#   vllm       skipped: vLLM is not installed (its contract is checked without it by the CPU test suite:
#              tests/test_vllm_contract.py, `spatial-mllm vllm-check`); with vLLM present, says nothing serves it here
# Writes OUT_DIR/summary.json (each part's status and time, the FSDP run's facts), OUT_DIR/gpu_check.log (all
# output) and the benchmark's OUT_DIR/{inference,train,fast}.json: five files. Large scratch files (the synthetic
# model) go to $GPU_CHECK_WORK (default /tmp/gpu_check_work).
#
# Usage: scripts/gpu_check.sh OUT_DIR [--dry-run] [PART ...]
#   --dry-run  the same parts at the benchmark's --small sizes on CPU (float32, no compilation; DDP on CPU in place
#              of FSDP, which needs a GPU): checks the script before GPU time is spent on it
#   PART ...   run only these parts (preflight always runs)
# Exits 1 if the preflight did not pass or a part failed or timed out (the summary is written all the same).
# Environment: PYTHON (default python3, or .venv/bin/python where it exists), GPU_CHECK_BUDGET_S (default 460,
# 1800 for --dry-run). Wheels in .whl/ (scripts/gpu_wheels.sh) are installed first, without network, so that the
# GPU image runs the transformers version this repository is tested with.
set -euo pipefail

usage() { echo "usage: scripts/gpu_check.sh OUT_DIR [--dry-run] [PART ...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DRY=0; ONLY=()
ALL_PARTS=(inference train fsdp fast qlora vllm)
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    inference|train|fsdp|fast|qlora|vllm) ONLY+=("$arg") ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (parts: ${ALL_PARTS[*]})" >&2; exit 2 ;;
  esac
done
[ ${#ONLY[@]} -gt 0 ] || ONLY=("${ALL_PARTS[@]}")

mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: the rest runs from the repository root
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
if [ -e "$WORK" ] && [ ! -f "$WORK/.gpu_check" ]; then
  echo "gpu_check.sh: $WORK exists and was not made by this script; set GPU_CHECK_WORK to a new folder" >&2; exit 2
fi
rm -rf "$WORK"; mkdir -p "$WORK"; : > "$WORK/.gpu_check"  # scratch of an earlier run is replaced
WORK=$(cd "$WORK" && pwd)
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LOG=$OUT/gpu_check.log; : > "$LOG"
PARTS_FILE=$WORK/parts.jsonl; : > "$PARTS_FILE"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl \
    >>"$LOG" 2>&1
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ $DRY -eq 1 ]; then
  BUDGET_S=${GPU_CHECK_BUDGET_S:-1800}
  DEVICE=cpu
  BENCH=(--small --dtype float32 --reps 1 --train-steps 1 --no-compile)
  INFER_PROJECTORS=(mlp2x_gelu saep); TRAIN_PROJECTORS=(mlp2x_gelu saep)
  FIXTURE=(--size small --llm-layers 2)
  LAUNCH=(--cpu --num_processes 1)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  BUDGET_S=${GPU_CHECK_BUDGET_S:-460}
  DEVICE=cuda
  BENCH=(--dtype bfloat16)
  INFER_PROJECTORS=(mlp2x_gelu llava_sp_pooling llava_sp_cropping saep ldpv2 c_abstractor tokenpacker)
  TRAIN_PROJECTORS=(mlp2x_gelu llava_sp_pooling llava_sp_cropping saep)
  FIXTURE=(--size paper --llm-layers 4)
  LAUNCH=(--config_file src/spatial_mllm/configs/launch_fsdp.yaml --num_processes 1)
fi

# record NAME STATUS SECONDS RC DETAIL: one JSON line per part.
record() {
  "$PYTHON" -c 'import json, sys; print(json.dumps(dict(zip(["part", "status", "seconds", "rc", "detail"], [sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]]))))' \
    "$@" >> "$PARTS_FILE"
  echo "== $1: $2 (${3}s) $5" | tee -a "$LOG"
}

# run_part NAME CAP_S COMMAND...: runs COMMAND (a shell function or program) under min(CAP_S, budget left).
run_part() {
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then record "$name" "skipped: out of time" 0 0 "${left}s of the budget left"; return 0; fi
  local limit=$(( cap < left ? cap : left ))
  echo "== $name: starting (limit ${limit}s): $*" >> "$LOG"
  local began rc=0
  began=$(date +%s)
  # timeout runs a program, so the part (a function of this script) runs in a bash given its definitions;
  # timeout signals that bash's whole process group, python children included.
  local script
  script="$(declare -p PYTHON DEVICE WORK BENCH FIXTURE LAUNCH); $(declare -f preflight bench fsdp); set -euo pipefail; $(printf '%q ' "$@")"
  timeout --kill-after=15 "$limit" bash -c "$script" >> "$LOG" 2>&1 || rc=$?
  local took=$(( $(date +%s) - began ))
  case $rc in
    0) record "$name" ok "$took" 0 "" ;;
    124|137) record "$name" "timed out" "$took" "$rc" "limit ${limit}s" ;;
    *) record "$name" failed "$took" "$rc" "see gpu_check.log" ;;
  esac
}

wanted() { local part; for part in "${ONLY[@]}"; do [ "$part" = "$1" ] && return 0; done; return 1; }

preflight() {
  "$PYTHON" - "$DEVICE" "$WORK/environment.json" <<'EOF'
import json, platform, sys
import accelerate, peft, torch, transformers
import spatial_mllm.training.engine  # noqa: F401  (the package and its dependencies import)
device, out = sys.argv[1], sys.argv[2]
facts = {
    "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
    "peft": peft.__version__, "accelerate": accelerate.__version__, "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None,
}
print(json.dumps(facts))
json.dump(facts, open(out, "w"))
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("no CUDA device: run with --dry-run on a machine without a GPU")
EOF
  if [ "$DEVICE" = cuda ]; then nvidia-smi || true; fi
}

bench() { "$PYTHON" benchmarks/paper_scale.py --device "$DEVICE" "${BENCH[@]}" "$@"; }

fsdp() {
  "$PYTHON" scripts/gpu_check_fixture.py make "$WORK/fixture" --device "$DEVICE" "${FIXTURE[@]}" | tail -n 1 > "$WORK/fixture.json"
  cat "$WORK/fixture.json"
  "$PYTHON" -m accelerate.commands.launch "${LAUNCH[@]}" -m spatial_mllm.cli train --config llava15_stage2 \
    "stage.init_from=$WORK/fixture/model" model.projector=llava_sp_pooling model.dtype=float32 \
    "data.train_json=$WORK/fixture/world/llava_stage2_train.json" "data.image_folder=$WORK/fixture/world" \
    data.num_workers=0 data.max_length=1024 optimisation.max_steps=4 optimisation.global_batch_size=4 \
    optimisation.micro_batch_size=2 checkpoint.every_steps=2 "output_dir=$WORK/fsdp_run"
  "$PYTHON" scripts/gpu_check_fixture.py load "$WORK/fsdp_run" "$WORK/fixture/world" --device "$DEVICE" \
    | tail -n 1 > "$WORK/fsdp_load.json"
  cat "$WORK/fsdp_load.json"
}

absent_or() {  # absent_or MODULE REASON: exits 0 either way, saying why nothing ran
  if "$PYTHON" -c "import $1" >/dev/null 2>&1; then echo "skipped: $2"; else echo "skipped: not installed ($1)"; fi
}

run_part preflight 90 preflight
if ! grep -q '"part": "preflight", "status": "ok"' "$PARTS_FILE"; then
  echo "preflight failed: nothing else runs (see $LOG)" | tee -a "$LOG" >&2
else
  wanted inference && run_part inference 170 bench --parts projector inference --projectors "${INFER_PROJECTORS[@]}" \
    --out "$OUT/inference.json"
  wanted train && run_part train 130 bench --parts train --projectors "${TRAIN_PROJECTORS[@]}" --out "$OUT/train.json"
  wanted fsdp && run_part fsdp 130 fsdp
  wanted fast && run_part fast 200 bench --parts fast --projectors mlp2x_gelu --no-llava-compiled --out "$OUT/fast.json"
  for part in qlora vllm; do
    if wanted $part; then
      if [ $part = qlora ]; then
        why=$(absent_or bitsandbytes "bitsandbytes is installed but the training engine has no 4-bit (QLoRA) path to run")
      else
        why=$(absent_or vllm "vLLM is installed but this check does not serve through it (the contract is checked by spatial-mllm vllm-check)")
      fi
      record $part "$why" 0 0 ""
    fi
  done
fi

"$PYTHON" - "$WORK" "$OUT/summary.json" "$DRY" "$(( $(date +%s) - START ))" "$BUDGET_S" <<'EOF'
import json, sys
from pathlib import Path
work, out, dry, seconds, budget = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
def read(name):
    path = work / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
summary = {
    "dry_run": dry,
    "seconds": seconds,
    "budget_s": budget,
    "environment": read("environment.json"),
    "parts": [json.loads(line) for line in (work / "parts.jsonl").read_text().splitlines() if line.strip()],
    "fsdp": {
        "launch": "DDP on CPU (dry run)" if dry else "accelerate launch, launch_fsdp.yaml, 1 process",
        "fixture": read("fixture.json"),
        "load_and_generate": read("fsdp_load.json"),
        "metrics": [json.loads(l) for l in (work / "fsdp_run" / "metrics.jsonl").read_text().splitlines()]
        if (work / "fsdp_run" / "metrics.jsonl").is_file() else None,
    },
}
tmp = out.with_suffix(".json.tmp")
tmp.write_text(json.dumps(summary, indent=2))
tmp.replace(out)
for part in summary["parts"]:
    print(f"{part['part']:>10}: {part['status']} ({part['seconds']}s)")
print(f"total {seconds}s of a {budget}s budget; wrote {out}")
preflight_ok = any(p["part"] == "preflight" and p["status"] == "ok" for p in summary["parts"])
sys.exit(0 if preflight_ok and not any(p["status"] in ("failed", "timed out") for p in summary["parts"]) else 1)
EOF
