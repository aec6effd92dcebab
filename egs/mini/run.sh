#!/usr/bin/env bash
# The mini demo on the shipped corpus (egs/mini/corpus: 10 minutes of phone-aligned synthetic speech,
# 4 voices): prepare -> VQ-VAE -> units -> PNMI/ABX against the phones -> prior -> samples ->
# resynthesis and voice conversion, on a CPU, with no download. Each step is skipped once done (a
# marker records its command line; a changed option re-runs it).
#   egs/mini/run.sh [--stage 0] [--stop-stage 6] [options] [STAGE:key=value ...] [key=value ...]
# Stages (the same numbers in every egs/*/run.sh; the corpus is shipped, so there is no -1
#   download): 0 prepare (DATA/{train,valid,test}.tsv, stats.json, alignments/); 1 train the
#   VQ-VAE; 2 units of every split (EXP/units/<split>.txt); 3 evaluate the test units
#   (EXP/eval/test.json); 4 train the prior; 5 sample from it (EXP/samples/index.html);
#   6 resynthesise the test utterances in every voice (EXP/resynth/index.html).
# Options (default):
#   --stage N, --stop-stage N  first and last stage to run (0, 6)
#   --force true               redo the steps of those stages even when their markers say done
#   --data-dir DIR             manifests, stats.json, alignments/ (data)
#   --exp-dir DIR              checkpoints, units, metrics, pages (exp/vqvae_<model>)
#   --model mel|wave           the VQ-VAE (mel)
#   --nproc N                  training processes for torchrun (1)
# Hydra overrides: STAGE:key=value goes to one stage (prepare train extract evaluate prior sample
# resynth); key=value to every stage whose config has the key (trainer.max_steps=N: both trainings).
set -euo pipefail
recipes=$(cd "$(dirname "$0")/../../recipes" && pwd)
# shellcheck source=recipes/lib.sh
. "$recipes/lib.sh"

stage=0 stop_stage=6 data_dir=data exp_dir="" model=mel nproc=1
parse_options "$@"
check_overrides
exp_dir=${exp_dir:-exp/vqvae_$model}
vqvae=$exp_dir/checkpoints/best.pt

if want_stage 0; then
  stage_args prepare
  "$recipes/prepare.sh" --data mini --out "$data_dir" "${args[@]}"
fi
if want_stage 1; then
  stage_args train
  "$recipes/train.sh" --manifest "$data_dir/train.tsv" --valid-manifest "$data_dir/valid.tsv" \
    --model "$model" --out "$exp_dir" --nproc "$nproc" trainer.max_steps=1500 trainer.max_minutes=14 \
    "${args[@]}"
fi
if want_stage 2; then
  stage_args extract
  for split in train valid test; do
    "$recipes/extract.sh" --checkpoint "$vqvae" --manifest "$data_dir/$split.tsv" \
      --out "$exp_dir/units/$split.txt" "${args[@]}"
  done
fi
if want_stage 3; then
  stage_args evaluate
  "$recipes/evaluate.sh" --units "$exp_dir/units/test.txt" --alignments "$data_dir/alignments" \
    --manifest "$data_dir/test.tsv" --train-manifest "$data_dir/train.tsv" --out "$exp_dir/eval/test.json" "${args[@]}"
fi
if want_stage 4; then
  stage_args prior
  "$recipes/train_prior.sh" --units "$exp_dir/units/train.txt" --valid-units "$exp_dir/units/valid.txt" \
    --vqvae "$vqvae" --manifest "$data_dir/manifest.tsv" --out "$exp_dir/prior" --nproc "$nproc" \
    prior=tiny trainer.max_steps=2000 "${args[@]}"
fi
if want_stage 5; then
  stage_args sample
  "$recipes/sample.sh" --vqvae "$vqvae" --prior "$exp_dir/prior/checkpoints/best.pt" \
    --out "$exp_dir/samples" speaker=all "${args[@]}"
fi
if want_stage 6; then
  stage_args resynth
  "$recipes/resynth.sh" --checkpoint "$vqvae" --manifest "$data_dir/test.tsv" --out "$exp_dir/resynth" \
    speaker=all "${args[@]}"
  log "listening pages: $exp_dir/samples/index.html and $exp_dir/resynth/index.html"
fi
