#!/usr/bin/env bash
# Evaluate units against phone alignments (speechvq-evaluate): PNMI, purities, ABX, bitrate, with
# the MFCC + k-means baseline beside them -> a metrics JSON and a printed table.
#   recipes/evaluate.sh --units UNITS --alignments DIR --manifest M.tsv [--train-manifest T.tsv]
#                       --out METRICS.json [key=value ...]
# Options:
#   --units FILE           frame-level unit file (speechvq-extract output)
#   --alignments PATH      a folder of .phn/.TextGrid files or a frame TSV
#   --manifest FILE        the evaluated utterances (ABX needs their audio and speakers)
#   --train-manifest FILE  what the MFCC + k-means baseline is fitted on ("": no baseline)
#   --out FILE             the metrics JSON
# key=value arguments go to speechvq-evaluate. Skipped when .done.evaluate.<FILE name> beside FILE
# records the same command line and the units are older than it.
set -euo pipefail
# shellcheck source=recipes/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

units=""
alignments=""
manifest=""
train_manifest=""
out=""
parse_options "$@"
require units alignments manifest out

baseline=(baseline.enabled=false)
[ -n "$train_manifest" ] && baseline=("baseline.train_manifest=$train_manifest")
run_step "$(dirname "$out")" "evaluate.$(basename "$out")" --after "$units" -- \
  speechvq-evaluate "units=$units" "alignments=$alignments" "data.manifest=$manifest" \
  "${baseline[@]}" "out=$out" "${overrides[@]}"
