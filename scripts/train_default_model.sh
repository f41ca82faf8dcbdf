#!/usr/bin/env bash
# Reproduce the embedded default model end to end (about 80 minutes on a 2-core Zen 4 CPU):
#   1. synthetic data (seed 1) on the token grid: chat conversations and pre-training documents,
#   2. train from scratch: configs/default_model.yaml,
#   3. install the weights into src/pixtral/assets/default_model/,
#   4. evaluate with `pixtral eval synth` on held-out data from seed 3 (never used in training),
#      with real and with blank images.
# Set RESUME=1 to continue an interrupted run (`pixtral train --resume`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# One torch thread per core (the shipped model was trained with 2 on a quiet 2-core machine; on a
# busy one, fewer threads than cores is faster).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
PIXTRAL="$PY -m pixtral.cli.main"

if [[ ! -f runs/synth_grid/manifest.json || ! -f runs/synth_grid/pretrain.jsonl ]]; then
  $PIXTRAL data synth --out runs/synth_grid --n 60000 --seed 1 --workers 2 --layout grid --documents lookup --overwrite
fi
# RESUME=1 continues an interrupted run (`pixtral train --resume`).
run=runs/default_model
if [[ ! -f $run/final/mistral/params.json ]]; then
  if [[ "${RESUME:-0}" == 1 && -f $run/checkpoint.pt ]]; then
    $PIXTRAL train --config configs/default_model.yaml --resume
  else
    rm -rf "$run"  # this script's own scratch run
    $PIXTRAL train --config configs/default_model.yaml
  fi
fi
dst=src/pixtral/assets/default_model
mkdir -p "$dst"
cp runs/default_model/final/mistral/{params.json,consolidated.safetensors,tekken.json} "$dst/"
du -ch "$dst"/* | tail -1

if [[ ! -f runs/synth_grid_heldout/manifest.json ]]; then
  $PIXTRAL data synth --out runs/synth_grid_heldout --n 1700 --seed 3 --val-frac 0 --test-frac 0.6 \
    --layout grid --documents lookup --overwrite
fi
for variant in "" "--blank-images"; do
  $PIXTRAL eval synth --data runs/synth_grid_heldout --output-dir "runs/eval_default_model${variant:+_blank}" \
    --overwrite --no-progress $variant
done
