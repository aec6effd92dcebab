#!/usr/bin/env bash
# Train the Transformer prior on units (speechvq-train-prior) -> OUT/checkpoints/{last,best}.pt,
# OUT/perplexity.json.
#   recipes/train_prior.sh --units UNITS --vqvae CKPT --manifest M.tsv --out DIR
#                          [--valid-units UNITS] [--nproc N] [key=value ...]
# Options:
#   --units FILE           training units (speechvq-extract output, frame level)
#   --valid-units FILE     validation units ("": a held-out fraction of --units)
#   --vqvae FILE           the VQ-VAE checkpoint the units came from (speaker tokens = its speakers)
#   --manifest FILE        utterance -> speaker for the speaker tokens
#   --out DIR              the prior's experiment folder
#   --nproc N              processes for torchrun (1: no torchrun)
# key=value arguments go to speechvq-train-prior. Skipped when OUT/.done.prior records the same
# command line and the units are older than it.
set -euo pipefail
# shellcheck source=recipes/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

units=""
valid_units=""
vqvae=""
manifest=""
out=""
nproc=1
parse_options "$@"
require units out

cmd=(speechvq-train-prior)
if [ "$nproc" -gt 1 ]; then
  cmd=(torchrun --standalone "--nproc_per_node=$nproc" "$(speechvq_bin train-prior)")
fi
opt=()
[ -n "$valid_units" ] && opt+=("valid_units=$valid_units")
[ -n "$vqvae" ] && opt+=("vqvae=$vqvae")
[ -n "$manifest" ] && opt+=("data.manifest=$manifest")
run_step "$out" prior --after "$units" -- \
  "${cmd[@]}" "units=$units" "${opt[@]}" "out_dir=$out" resume=auto "${overrides[@]}"
