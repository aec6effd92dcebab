#!/usr/bin/env bash
# Train a VQ-VAE (speechvq-train) -> OUT/checkpoints/{last,best}.pt, OUT/tb/, OUT/train.log.
#   recipes/train.sh --manifest TRAIN.tsv [--valid-manifest VALID.tsv] --out EXP [--model mel]
#                    [--nproc N] [key=value ...]
# Options:
#   --manifest FILE        training utterances (stats.json beside it is used)
#   --valid-manifest FILE  validation utterances for best.pt ("": none)
#   --out DIR              the experiment folder
#   --model mel|wave       conf/model/*.yaml (mel)
#   --nproc N              processes for torchrun: one per GPU (1: no torchrun)
# key=value arguments go to speechvq-train. An interrupted run resumes from OUT's last.pt
# (resume=auto); a finished one is skipped while OUT/.done.train records the same command line
# and the manifest is older than it.
set -euo pipefail
# shellcheck source=recipes/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

manifest=""
valid_manifest=""
out=""
model=mel
nproc=1
parse_options "$@"
require manifest out

cmd=(speechvq-train)
if [ "$nproc" -gt 1 ]; then
  cmd=(torchrun --standalone "--nproc_per_node=$nproc" "$(speechvq_bin train)")
fi
valid=()
[ -n "$valid_manifest" ] && valid=("data.valid_manifest=$valid_manifest")
run_step "$out" train --after "$manifest" -- \
  "${cmd[@]}" "data.manifest=$manifest" "${valid[@]}" "model=$model" "out_dir=$out" resume=auto \
  "${overrides[@]}"
