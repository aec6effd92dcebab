#!/usr/bin/env bash
# Sample unit sequences from the prior and speak them with the VQ-VAE (speechvq-sample)
# -> OUT/sample_XXX.wav, OUT/units.txt, OUT/index.html (the listening page).
#   recipes/sample.sh --vqvae CKPT --prior CKPT --out DIR [--n 8] [key=value ...]
# Options:
#   --vqvae FILE           VQ-VAE checkpoint (speechvq-train's checkpoints/best.pt)
#   --prior FILE           prior checkpoint (speechvq-train-prior's checkpoints/best.pt)
#   --out DIR              where the clips and the page go
#   --n N                  clips (8)
# key=value arguments go to speechvq-sample (seconds=, speaker=, temperature=, top_p=, ...).
set -euo pipefail
# shellcheck source=recipes/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

vqvae=""
prior=""
out=""
n=8
parse_options "$@"
require vqvae prior out

run_step "$out" sample --after "$vqvae" --after "$prior" -- \
  speechvq-sample "vqvae=$vqvae" "prior_checkpoint=$prior" "n=$n" "out_dir=$out" "${overrides[@]}"
log "listening page: $out/index.html"
