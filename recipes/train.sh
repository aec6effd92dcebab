#!/usr/bin/env bash
# Train a VQ-VAE (speechvq-train) -> OUT/checkpoints/{last,best}.pt, OUT/tb/, OUT/train.log.
#   recipes/train.sh --manifest TRAIN.tsv [--valid-manifest VALID.tsv] --out EXP [--model mel]
#                    [--nproc N] [--nnodes N --rdzv-endpoint HOST:PORT ...] [key=value ...]
# Options:
#   --manifest FILE        training utterances (stats.json beside it is used)
#   --valid-manifest FILE  validation utterances for best.pt ("": none)
#   --out DIR              the experiment folder
#   --model mel|wave       conf/model/*.yaml (mel)
#   --nproc N              processes per node, one per GPU (1 on one node: no torchrun)
#   --nnodes N             nodes (1). More than 1: torchrun with a c10d rendezvous; run the same
#                          command on every node, all writing the same OUT (a shared file system)
#   --node-rank R          this node's rank, 0..N-1 ("": the rendezvous numbers the nodes)
#   --rdzv-endpoint H:P    with --nnodes > 1: host:port of the rendezvous, e.g. the first node:29500
#   --rdzv-id ID           with --nnodes > 1: the job's name, the same on every node (speechvq)
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
nproc=1 nnodes=1 node_rank="" rdzv_endpoint="" rdzv_id=speechvq
parse_options "$@"
require manifest out

launcher train
valid=()
[ -n "$valid_manifest" ] && valid=("data.valid_manifest=$valid_manifest")
run_step "$out" train --after "$manifest" -- \
  "${cmd[@]}" "data.manifest=$manifest" "${valid[@]}" "model=$model" "out_dir=$out" resume=auto \
  "${overrides[@]}"
