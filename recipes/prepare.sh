#!/usr/bin/env bash
# Prepare a corpus (speechvq-prepare): manifests, stats.json, rejected.tsv [, alignments/].
#   recipes/prepare.sh --data NAME --out DIR [--download-only true] [key=value ...]
# Options:
#   --data NAME            conf/data/NAME.yaml: folder | mini | librispeech
#   --out DIR              where the manifests go (speechvq-prepare's out_dir)
#   --download-only BOOL   data=librispeech: only download, check and extract the subsets (false)
# key=value arguments go to speechvq-prepare. Skipped when DIR/.done.prepare (.done.download with
# --download-only) records the same command line.
set -euo pipefail
# shellcheck source=recipes/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

data=""
out=""
download_only=false
parse_options "$@"
require data out

if [ "$download_only" = true ]; then
  run_step "$out" download -- \
    speechvq-prepare "data=$data" "out_dir=$out" data.download_only=true "${overrides[@]}"
else
  run_step "$out" prepare -- speechvq-prepare "data=$data" "out_dir=$out" "${overrides[@]}"
fi
