#!/usr/bin/env bash
# Reproduce the embedded default model end to end (stages 1-4 take about 2 h 40 min on a quiet 2-core
# Zen 4 CPU in bf16; stages 5, 6 and 7 took 82, 48 and 14 min in float32 on a 2-core AVX2-only
# EPYC, see the README):
#   1. synthetic data (seed 1) on the token grid: chat conversations, and reading-order and lookup
#      documents about the same training images (`--documents both`); and, for stage 4,
#      conversations that ask every question about 60000 new images, with ranked documents about
#      them (`--questions all --documents ranked`); for stage 6, conversations that ask every
#      question about 40000 new charts, tables and documents from seed 5, with ranked documents
#      about them for stage 7,
#   2. stage 1, from scratch, learns to read: configs/default_model_stage1.yaml (12000 steps),
#   3. stage 2, from stage 1, learns to answer: configs/default_model_stage2.yaml (24000 steps),
#   4. stage 3, from stage 2, trains on: configs/default_model_stage3.yaml (7000 steps),
#   5. stage 4, from stage 3, adds the second data set: configs/default_model_stage4.yaml (10000 steps),
#   6. stage 5, from stage 4, trains the vision encoder too: configs/default_model_stage5.yaml (8000 steps),
#   7. stage 6, from stage 5, trains on the weakest categories: configs/default_model_stage6.yaml (5000 steps),
#   8. stage 7, from stage 6, brings the documents back: configs/default_model_stage7.yaml (1500 steps),
#   9. install the weights into src/pixtral/assets/default_model/,
#  10. evaluate with `pixtral eval synth` on held-out data from seed 3 (never used in training),
#      with real and with blank images.
# Set RESUME=1 to continue an interrupted stage (`pixtral train --resume`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# One torch thread per core (measured: 6.3 steps/s with 2 threads alone on the machine; 3.3 each
# for two 1-thread runs side by side).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
PIXTRAL="$PY -m pixtral.cli.main"

data=runs/synth_default
if [[ ! -f $data/manifest.json || ! -f $data/pretrain_lookup.jsonl ]]; then
  $PIXTRAL data synth --out $data --n 60000 --seed 1 --workers 2 --layout grid --documents both --overwrite
fi
every=runs/synth_default_all
if [[ ! -f $every/manifest.json ]]; then
  $PIXTRAL data synth --out $every --n 60000 --seed 1 --val-frac 0 --test-frac 0 --workers 2 --layout grid \
    --questions all --documents ranked --overwrite
fi

weak=runs/synth_default_weak
if [[ ! -f $weak/manifest.json ]]; then
  $PIXTRAL data synth --out $weak --n 40000 --seed 5 --val-frac 0 --test-frac 0 --workers 2 --layout grid \
    --categories charts,tables,documents --questions all --documents ranked --overwrite
fi
# stages 6 and 7 keep 15000 of stage 4's conversations (3000 per category) next to the new ones;
# stage 7 trains on 10000 of the new images, with their conversations and documents
head -n 15000 $every/train.jsonl > $every/train_head15k.jsonl
head -n 10000 $weak/train.jsonl > $weak/train_head10k.jsonl
head -n 10000 $weak/pretrain.jsonl > $weak/pretrain_head10k.jsonl

train_stage() {  # config, run directory
  if [[ -f $2/final/mistral/params.json ]]; then
    return
  fi
  if [[ "${RESUME:-0}" == 1 && -f $2/checkpoint.pt ]]; then
    $PIXTRAL train --config "$1" --resume
  else
    rm -rf "$2"  # this script's own scratch run
    $PIXTRAL train --config "$1"
  fi
}
train_stage configs/default_model_stage1.yaml runs/default_model_stage1
train_stage configs/default_model_stage2.yaml runs/default_model_stage2
train_stage configs/default_model_stage3.yaml runs/default_model_stage3
train_stage configs/default_model_stage4.yaml runs/default_model_stage4
train_stage configs/default_model_stage5.yaml runs/default_model_stage5
train_stage configs/default_model_stage6.yaml runs/default_model_stage6
train_stage configs/default_model_stage7.yaml runs/default_model_stage7

dst=src/pixtral/assets/default_model
mkdir -p "$dst"
cp runs/default_model_stage7/final/mistral/{params.json,consolidated.safetensors,tekken.json} "$dst/"
du -ch "$dst"/* | tail -1

if [[ ! -f runs/synth_grid_heldout/manifest.json || ! -f runs/synth_grid_heldout/pretrain_lookup.jsonl ]]; then
  $PIXTRAL data synth --out runs/synth_grid_heldout --n 1700 --seed 3 --val-frac 0 --test-frac 0.6 \
    --layout grid --documents both --overwrite
fi
for variant in "" "--blank-images"; do
  $PIXTRAL eval synth --data runs/synth_grid_heldout --output-dir "runs/eval_default_model${variant:+_blank}" \
    --overwrite --no-progress $variant
done
