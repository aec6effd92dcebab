#!/usr/bin/env bash
# LibriSpeech: download -> manifests + feature statistics -> VQ-VAE -> units -> unit quality ->
# prior -> samples and resynthesis on listening pages. Each step is skipped once done (a marker
# records its command line; a changed option re-runs it).
#   egs/librispeech/run.sh [--stage -1] [--stop-stage 6] [--subsets "dev-clean train-clean-100"]
#       [options] [STAGE:key=value ...] [key=value ...] [-- key=value ...]
# Stages (the same numbers in every egs/*/run.sh; the download comes before them, as -1):
#   -1 download, check md5, extract; 0 manifests (DATA/manifests/<subset>.tsv and
#   {train,valid,test}.tsv by subset name) + stats.json [+ alignments/]; 1 train the VQ-VAE;
#   2 units of every subset (EXP/units/<subset>.txt), each encoded once, and of every split made
#   of several subsets, merged from theirs; 3 evaluate the valid/test units when
#   DATA/manifests/alignments/ exists; 4 train the prior on the train units; 5 sample from the
#   prior (EXP/samples/index.html); 6 resynthesise valid utterances (EXP/resynth/index.html).
# Options (default):
#   --stage N, --stop-stage N  first and last stage to run (-1, 6)
#   --force true               redo the steps of those stages even when their markers say done
#   --subsets "A B"            LibriSpeech subsets ("dev-clean train-clean-100")
#   --data-dir DIR             archives, LibriSpeech/ and manifests/ (data)
#   --exp-dir DIR              checkpoints, units, metrics, pages (exp/vqvae_<model>)
#   --base-url URL             OpenSLR resources root or a mirror (https://www.openslr.org/resources)
#   --checksums FILE           md5sum-format file replacing the built-in md5 table ("")
#   --model mel|wave           the VQ-VAE (mel)
#   --trainer NAME             conf/trainer/NAME.yaml for both trainings, + the prior's own
#                              conf/prior_trainer/NAME.yaml (gpu; `default` on a CPU)
#   --nproc N                  processes per node for both trainings, one per GPU; also the
#                              number of extraction jobs of stage 2 (1)
#   --nnodes N                 nodes for the trainings (1). More than 1 runs stage 1 or stage 4
#                              only (the others on one node): the same command on every node,
#                              with --rdzv-endpoint HOST:PORT (the first node) and a shared EXP
#   --node-rank R              this node's rank ("": the rendezvous numbers the nodes)
#   --rdzv-endpoint H:P        with --nnodes > 1: the c10d rendezvous, e.g. the first node:29500
#   --rdzv-id ID               with --nnodes > 1: the job's name, the same on every node (speechvq)
# Hydra overrides: STAGE:key=value goes to one stage (prepare train extract evaluate prior sample
# resynth); key=value to every stage whose config has the key (device=cpu, trainer.max_steps=N).
# An existing copy of the corpus: prepare:data.root=DIR (the folder holding LibriSpeech/).
set -euo pipefail
recipes=$(cd "$(dirname "$0")/../../recipes" && pwd)
# shellcheck source=recipes/lib.sh
. "$recipes/lib.sh"

stage=-1 stop_stage=6 subsets="dev-clean train-clean-100" data_dir=data exp_dir="" checksums=""
base_url=https://www.openslr.org/resources model=mel trainer=gpu nproc=1
nnodes=1 node_rank="" rdzv_endpoint="" rdzv_id=speechvq
parse_options "$@"
check_overrides
launch=(--nproc "$nproc" --nnodes "$nnodes" --node-rank "$node_rank" --rdzv-endpoint "$rdzv_endpoint"
        --rdzv-id "$rdzv_id")
if [ "$nnodes" != 1 ]; then  # the trainings are the only multi-node stages
  for one in -1 0 2 3 5 6; do
    if want_stage "$one"; then
      die "--nnodes $nnodes runs stage 1 or 4 only (--stage 1 --stop-stage 1): run stage $one on one node"
    fi
  done
fi
read -ra sets <<< "$subsets"
exp_dir=${exp_dir:-exp/vqvae_$model} manifests=$data_dir/manifests
vqvae=$exp_dir/checkpoints/best.pt

split_units() {  # the unit file of split $1: its subset's when the split is one subset
  for s in "${sets[@]}"; do
    if cmp -s "$manifests/$1.tsv" "$manifests/$s.tsv"; then echo "$exp_dir/units/$s.txt"; return; fi
  done
  echo "$exp_dir/units/$1.txt"
}
has() { [ -f "$manifests/$1.tsv" ]; }

stage_args prepare
corpus=(--data librispeech --out "$manifests" "data.subsets=[$(IFS=,; echo "${sets[*]}")]"
        "data.download_dir=$data_dir" "data.base_url=$base_url" ${checksums:+"data.checksums=$checksums"} "${args[@]}")
if want_stage -1; then "$recipes/prepare.sh" --download-only true "${corpus[@]}"; fi
if want_stage 0; then "$recipes/prepare.sh" "${corpus[@]}"; fi
if want_stage 1; then
  stage_args train
  valid=(); if has valid; then valid=(--valid-manifest "$manifests/valid.tsv"); fi
  "$recipes/train.sh" --manifest "$manifests/train.tsv" "${valid[@]}" --model "$model" \
    --out "$exp_dir" "${launch[@]}" "trainer=$trainer" "${args[@]}"
fi
if want_stage 2; then
  stage_args extract
  gpus=(); if ((nproc > 1)); then gpus=(--gpus "$(seq -s ' ' 0 $((nproc - 1)))"); fi
  subset_units=()
  for m in "${sets[@]}"; do  # every utterance is encoded once: in its subset
    has "$m" || continue
    "$recipes/extract.sh" --checkpoint "$vqvae" --manifest "$manifests/$m.tsv" \
      --out "$exp_dir/units/$m.txt" --nj "$nproc" "${gpus[@]}" "${args[@]}"
    subset_units+=("$exp_dir/units/$m.txt")
  done
  for m in train valid test; do  # a split that is not one subset: merged from the subsets' units
    has "$m" || continue
    [ "$(split_units "$m")" = "$exp_dir/units/$m.txt" ] || continue
    "$recipes/extract.sh" --checkpoint "$vqvae" --manifest "$manifests/$m.tsv" \
      --out "$exp_dir/units/$m.txt" --from-units "${subset_units[*]}" "${args[@]}"
  done
fi
if want_stage 3; then
  stage_args evaluate
  if [ ! -d "$manifests/alignments" ]; then
    log "no $manifests/alignments (prepare:data.alignments=DIR imports MFA TextGrids): skipping"
  else
    for m in valid test; do
      has "$m" || continue
      "$recipes/evaluate.sh" --units "$(split_units "$m")" --alignments "$manifests/alignments" \
        --manifest "$manifests/$m.tsv" --train-manifest "$manifests/train.tsv" --out "$exp_dir/eval/$m.json" "${args[@]}"
    done
  fi
fi
if want_stage 4; then
  stage_args prior
  valid=()  # held-out units, unless valid is the train split itself (a dev-only run)
  if has valid && [ "$(split_units valid)" != "$(split_units train)" ]; then valid=(--valid-units "$(split_units valid)"); fi
  "$recipes/train_prior.sh" --units "$(split_units train)" "${valid[@]}" --vqvae "$vqvae" \
    --manifest "$manifests/manifest.tsv" --out "$exp_dir/prior" "${launch[@]}" "trainer=$trainer" \
    "${args[@]}"
fi
if want_stage 5; then
  stage_args sample
  "$recipes/sample.sh" --vqvae "$vqvae" --prior "$exp_dir/prior/checkpoints/best.pt" --out "$exp_dir/samples" "${args[@]}"
fi
if want_stage 6; then
  stage_args resynth
  m=valid; has valid || m=train
  "$recipes/resynth.sh" --checkpoint "$vqvae" --manifest "$manifests/$m.tsv" --out "$exp_dir/resynth" "${args[@]}"
  log "listening pages: $exp_dir/samples/index.html and $exp_dir/resynth/index.html"
fi
