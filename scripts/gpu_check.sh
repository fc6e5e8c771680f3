#!/usr/bin/env bash
# The CUDA paths on one NVIDIA GPU, from a fresh clone, in a few minutes: QLoRA NF4 sft on the
# real SmolLM2 recipe, merge (the QLoRA adapter onto the bf16 base), reward, ppo, dpo, grpo,
# bench with latency (recipes/gpu-check.toml, `llmctl run`), then a bf16 LoRA sft and an FSDP
# sft on the one GPU. Prints one table (stage, wall time, key metric, peak GPU memory, from the
# manifests) and exits non-zero on any failure.
#
#   scripts/gpu_check.sh            install (.venv, the cuda extra), fetch the artifacts, run
#   scripts/gpu_check.sh --dry-run  CPU only: every command it would run, with --dry-run
#
# LLMCTL (default: .venv/bin/llmctl) and GPU_CHECK_DIR (default: runs/gpu-check) override.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "error: unknown argument $1 (usage: scripts/gpu_check.sh [--dry-run])" >&2; exit 2 ;;
esac
RECIPE=recipes/gpu-check.toml
OUT=${GPU_CHECK_DIR:-runs/gpu-check}
export LLMCTL_CACHE=.llmctl-cache
read -r -a LLMCTL <<< "${LLMCTL:-.venv/bin/llmctl}"
PYTHON=${PYTHON:-.venv/bin/python}

if [ "$DRY_RUN" = 0 ]; then
  if ! command -v nvidia-smi > /dev/null; then
    echo "error: no nvidia-smi: scripts/gpu_check.sh needs an NVIDIA GPU (--dry-run needs none)" >&2
    exit 2
  fi
  make install EXTRAS=dev,cuda
  "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    || { echo "error: torch sees no CUDA GPU" >&2; exit 1; }
  "$PYTHON" -m llmctl.real  # the pinned artifacts and datasets, into .llmctl-cache/
fi

# Each check: a run directory and the llmctl command line after the recipe.
CHECKS=(
  "main|run"
  "lora|sft --set sft.method=\"lora\""
  "fsdp|sft --set sft.method=\"lora\" --set distributed.strategy=\"fsdp\" --set sft.max_steps=5"
)
START=$(date +%s)
for check in "${CHECKS[@]}"; do
  name=${check%%|*}
  read -r -a args <<< "${check#*|}"
  cmd=("${LLMCTL[@]}" "${args[0]}" "$RECIPE" --run-dir "$OUT/$name" "${args[@]:1}")
  if [ "$DRY_RUN" = 1 ]; then
    "${cmd[@]}" --dry-run > /dev/null
    echo "ok: ${cmd[*]} --dry-run"
  else
    echo "== ${cmd[*]}"
    "${cmd[@]}"
  fi
done
[ "$DRY_RUN" = 1 ] && exit 0

echo
echo "total $(( $(date +%s) - START )) s on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
from datetime import datetime
from pathlib import Path

KEY = {"sft": "eval_loss", "merge": "max_abs_logit_diff", "reward": "eval_accuracy",
       "ppo": "reward_mean_last", "dpo": "eval_rewards_accuracy", "grpo": "reward_mean_last",
       "bench": "merge/perplexity"}
print(f"{'run/stage':<14} {'wall s':>7}  {'key metric':<34} {'peak GPU MiB':>12}")
for manifest in sorted(Path(sys.argv[1]).glob("*/*/manifest.json"), key=lambda p: p.stat().st_mtime):
    m = json.loads(manifest.read_text())
    wall = (datetime.fromisoformat(m["finished_at"]) - datetime.fromisoformat(m["started_at"])).total_seconds()
    key = KEY.get(m["stage"])
    metrics = m["metrics"]
    if key not in metrics:  # bench names its metrics after the models
        key = next((k for k in metrics if k.endswith("tokens_per_second")), next(iter(metrics)))
    peak = metrics.get("peak_gpu_memory_bytes")
    print(f"{manifest.parent.parent.name + '/' + m['stage']:<14} {wall:>7.1f}  "
          f"{key + ' ' + format(metrics[key], '.4g'):<34} "
          f"{'-' if peak is None else format(peak / 2**20, '.0f'):>12}")
PY
