#!/usr/bin/env bash
# Reproduce the embedded default model end to end: about 2 h 53 min on a quiet 2-core Xeon with
# AMX (float32, 2 threads; README "The default model" has the time of each part):
#   1. synthetic data on the token grid (`--layout grid`), all from seeds never used for the
#      held-out set (seed 3):
#      - seed 1: chat conversations with reading-order and lookup documents about the same
#        training images (`--documents both`), and, about 60000 other images, conversations that
#        ask every question with documents that rank what questions compare (`--questions all
#        --documents ranked`);
#      - seed 5: every question about 40000 charts, tables and documents, with ranked documents;
#      - seed 6: every question about 30000 diagrams and scenes;
#      - seed 7: every question about 20000 charts, tables and documents; seed 8: about 8000
#        tables; seed 9: about 16000 diagrams and scenes; seed 10: about 10000 charts, with ranked
#        documents.
#   2. stage 1, from scratch with the vision encoder frozen, learns to read and answer:
#      configs/default_model_stage1.yaml (20000 steps),
#   3. stage 2, from stage 1, everything training, mostly on images stage 1 has not seen:
#      configs/default_model_stage2.yaml (8000 steps),
#   4. stage 3, from stage 2, at half stage 2's peak rate, on new images of every category:
#      configs/default_model_stage3.yaml (6000 steps),
#   5. stage 4, from stage 3, on new charts with their ranked documents beside stage 3's data:
#      configs/default_model_stage4.yaml (3000 steps),
#   6. install the weights into src/pixtral/assets/default_model/,
#   7. evaluate with `pixtral eval synth` on held-out data from seed 3 (never used in training),
#      with real and with blank images.
# Set RESUME=1 to continue an interrupted stage (`pixtral train --resume`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# One torch thread per core (two runs side by side, or data written beside training, slow both
# down far more than they gain).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
PIXTRAL="$PY -m pixtral.cli.main"

synth() {  # output folder, then `pixtral data synth` options; skipped when already written
  if [[ ! -f $1/manifest.json ]]; then
    $PIXTRAL data synth --out "$@" --workers 2 --layout grid --overwrite --quiet
  fi
}
# the three folders the `head -n` files below come from
data=runs/synth_default
every=runs/synth_default_all
weak=runs/synth_default_weak
synth $data --n 60000 --seed 1 --documents both
synth $every --n 60000 --seed 1 --val-frac 0 --test-frac 0 --questions all --documents ranked
synth $weak --n 40000 --seed 5 --val-frac 0 --test-frac 0 --categories charts,tables,documents --questions all --documents ranked
synth runs/synth_default_scenes --n 30000 --seed 6 --val-frac 0 --test-frac 0 --categories diagrams,misc --questions all
synth runs/synth_default_weak7 --n 20000 --seed 7 --val-frac 0 --test-frac 0 --categories charts,tables,documents --questions all
synth runs/synth_default_tables8 --n 8000 --seed 8 --val-frac 0 --test-frac 0 --categories tables --questions all
synth runs/synth_default_scenes9 --n 16000 --seed 9 --val-frac 0 --test-frac 0 --categories diagrams,misc --questions all
synth runs/synth_default_charts10 --n 10000 --seed 10 --val-frac 0 --test-frac 0 --categories charts --questions all --documents ranked
# The first lines of some files: stage 1 reads 30000 of each document kind beside everything else,
# stages 2-4 keep some of seed 1's conversations in the mix.
head -n 30000 $data/pretrain_lookup.jsonl > $data/pretrain_lookup_head30k.jsonl
head -n 30000 $every/pretrain.jsonl > $every/pretrain_head30k.jsonl
head -n 15000 $data/train.jsonl > $data/train_head15k.jsonl
head -n 10000 $weak/pretrain.jsonl > $weak/pretrain_head10k.jsonl
head -n 15000 $every/train.jsonl > $every/train_head15k.jsonl

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

dst=src/pixtral/assets/default_model
mkdir -p "$dst"
cp runs/default_model_stage4/final/mistral/{params.json,consolidated.safetensors,tekken.json} "$dst/"
du -ch "$dst"/* | tail -1

synth runs/synth_grid_heldout --n 1700 --seed 3 --val-frac 0 --test-frac 0.6 --documents both
for variant in "" "--blank-images"; do
  $PIXTRAL eval synth --data runs/synth_grid_heldout --output-dir "runs/eval_default_model${variant:+_blank}" \
    --overwrite --no-progress $variant
done
