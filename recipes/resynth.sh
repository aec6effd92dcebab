#!/usr/bin/env bash
# Resynthesise utterances through the units (speechvq-resynth): reconstruction in the speaker's
# voice and, with speaker=..., voice conversion -> OUT/{original,reconstruction,converted}/,
# OUT/index.html (the listening page).
#   recipes/resynth.sh --checkpoint CKPT --manifest M.tsv --out DIR [--n 4] [key=value ...]
# Options:
#   --checkpoint FILE      VQ-VAE checkpoint
#   --manifest FILE        utterances to choose from
#   --out DIR              where the clips and the page go
#   --n N                  utterances (4)
# key=value arguments go to speechvq-resynth (speaker=all|NAME|[A,B], ids=[...], ...).
set -euo pipefail
# shellcheck source=recipes/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

checkpoint=""
manifest=""
out=""
n=4
parse_options "$@"
require checkpoint manifest out

run_step "$out" resynth --after "$checkpoint" --after "$manifest" -- \
  speechvq-resynth "checkpoint=$checkpoint" "data.manifest=$manifest" "n=$n" "out_dir=$out" \
  "${overrides[@]}"
log "listening page: $out/index.html"
