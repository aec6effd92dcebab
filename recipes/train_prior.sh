#!/usr/bin/env bash
# Train the Transformer prior on units (speechvq-train-prior) -> OUT/checkpoints/{last,best}.pt,
# OUT/perplexity.json.
#   recipes/train_prior.sh --units UNITS --vqvae CKPT --manifest M.tsv --out DIR
#                          [--valid-units UNITS] [--nproc N] [--nnodes N ...] [key=value ...]
# Options:
#   --units FILE           training units (speechvq-extract output, frame level)
#   --valid-units FILE     validation units ("": a held-out fraction of --units)
#   --vqvae FILE           the VQ-VAE checkpoint the units came from (speaker tokens = its speakers)
#   --manifest FILE        utterance -> speaker for the speaker tokens
#   --out DIR              the prior's experiment folder
#   --nproc N              processes per node, one per GPU (1 on one node: no torchrun)
#   --nnodes N             nodes (1). More than 1: torchrun with a c10d rendezvous; run the same
#                          command on every node, all writing the same OUT (a shared file system)
#   --node-rank R          this node's rank, 0..N-1 ("": the rendezvous numbers the nodes)
#   --rdzv-endpoint H:P    with --nnodes > 1: host:port of the rendezvous, e.g. the first node:29500
#   --rdzv-id ID           with --nnodes > 1: the job's name, the same on every node (speechvq)
# key=value arguments go to speechvq-train-prior (trainer=gpu: conf/trainer/gpu.yaml + the prior's
# own conf/prior_trainer/gpu.yaml). Skipped when OUT/.done.prior records the same command line and
# the units are older than it.
set -euo pipefail
# shellcheck source=recipes/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

units=""
valid_units=""
vqvae=""
manifest=""
out=""
nproc=1 nnodes=1 node_rank="" rdzv_endpoint="" rdzv_id=speechvq
parse_options "$@"
require units out

launcher train-prior
opt=()
[ -n "$valid_units" ] && opt+=("valid_units=$valid_units")
[ -n "$vqvae" ] && opt+=("vqvae=$vqvae")
[ -n "$manifest" ] && opt+=("data.manifest=$manifest")
run_step "$out" prior --after "$units" -- \
  "${cmd[@]}" "units=$units" "${opt[@]}" "out_dir=$out" resume=auto "${overrides[@]}"
