#!/usr/bin/env bash
# Extract units (speechvq-extract): one unit file for a manifest, its sidecar FILE.json
# [+ FILE.durations].
#   recipes/extract.sh --checkpoint CKPT --manifest M.tsv --out UNITS [--format gslm]
#                      [--dedup false] [--nj 1] [--gpus ""] [--from-units "A B"] [key=value ...]
# Options:
#   --checkpoint FILE      VQ-VAE checkpoint
#   --manifest FILE        utterances to encode
#   --out FILE             the unit file
#   --format F             gslm | kaldi | espnet | npy | km (gslm)
#   --dedup BOOL           collapse repeated units, run lengths in FILE.durations (false)
#   --nj N                 parallel jobs, each a block of the manifest (shard=i nshards=N), joined
#                          at the end (1)
#   --gpus "0 1"           job i sees only GPU i mod (number of GPUs listed) ("": all of them)
#   --from-units "A B"     encode nothing: OUT holds the manifest's utterances, in its order, taken
#                          from these unit files (the subsets a split is made of), which must be
#                          of this checkpoint, format and dedup ("": encode)
# key=value arguments go to speechvq-extract. Skipped when .done.extract.<FILE name> beside FILE
# records the same command line and checkpoint, manifest (and --from-units files) are older than
# it. A crashed extraction resumes from its last finished part (speechvq-extract part_seconds).
set -euo pipefail
# shellcheck source=recipes/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

checkpoint=""
manifest=""
out=""
format=gslm
dedup=false
nj=1
gpus=""
from_units=""
parse_options "$@"
require checkpoint manifest out

if [ -n "$from_units" ]; then
  read -ra sources <<< "$from_units"
  after=() quoted=()
  for f in "${sources[@]}"; do after+=(--after "$f"); quoted+=("'${f//\'/\\\'}'"); done
  run_step "$(dirname "$out")" "extract.$(basename "$out")" --after "$checkpoint" --after "$manifest" \
    "${after[@]}" -- speechvq-extract "checkpoint=$checkpoint" "data.manifest=$manifest" "out=$out" \
    "format=$format" "dedup=$dedup" "from_units=[$(IFS=,; echo "${quoted[*]}")]" "${overrides[@]}"
  exit 0
fi

extract=(speechvq-extract "checkpoint=$checkpoint" "data.manifest=$manifest" "out=$out"
         "format=$format" "dedup=$dedup" "${overrides[@]}")
if [ "$nj" -le 1 ]; then
  run_step "$(dirname "$out")" "extract.$(basename "$out")" --after "$checkpoint" --after "$manifest" \
    -- "${extract[@]}"
  exit 0
fi

read -ra gpu_list <<< "$gpus"
extract_shards() {  # every shard at once; wait for all, fail if one failed
  local i pids=() failed=0
  for ((i = 0; i < nj; i++)); do
    if ((${#gpu_list[@]})); then
      CUDA_VISIBLE_DEVICES=${gpu_list[i % ${#gpu_list[@]}]} "$@" "shard=$i" "nshards=$nj" &
    else
      "$@" "shard=$i" "nshards=$nj" &
    fi
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || failed=1; done
  ((failed == 0)) || die "a shard of $out failed (see the messages above)"
  speechvq-extract "out=$out" "format=$format" "nshards=$nj" merge=true remove_shards=true
}
run_step "$(dirname "$out")" "extract.$(basename "$out")" --after "$checkpoint" --after "$manifest" \
  -- extract_shards "${extract[@]}"
