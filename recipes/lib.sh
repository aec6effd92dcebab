# shellcheck shell=bash
# recipes/lib.sh: what every recipe sources. Shell orders the stages; the speechvq-* commands
# (python) do the work.
#
#   log MESSAGE...               time and file:line of the caller, on stderr
#   die MESSAGE...               log it and exit 1
#   parse_options "$@"           --name value | --name=value sets the variable `name` (dashes become
#                                underscores) the script defined before; --help prints the script's
#                                header comment. key=value, ~key and everything after `--` are hydra
#                                overrides, collected in the array `overrides`.
#   stage_args STAGE             fills the array `args` with the overrides meant for STAGE: those
#                                written STAGE:key=value (prefix removed), and unprefixed ones whose
#                                first key part is in STAGE's config (conf/<config>.yaml has it as a
#                                key or a config group): device=cpu reaches every stage with a
#                                device, trainer.max_steps=N both trainings, features.* prepare and
#                                train
#   check_overrides [STAGE...]   dies when an override reaches none of the STAGEs (default: all), so a
#                                typo is not dropped silently
#   require NAME...              dies naming the options --NAME that are still empty
#   want_stage N                 true when stage <= N <= stop_stage
#   run_step DIR NAME [--after FILE]... -- COMMAND...
#                                runs COMMAND unless DIR/.done.NAME says it ran with the same command
#                                line (hashed, less any --node-rank=R) and no --after FILE is newer
#                                than that marker; the marker is written only when COMMAND succeeds.
#                                force=true re-runs.
#   speechvq_bin NAME            the path of the console script speechvq-NAME (for torchrun)
#   launcher NAME                fills the array `cmd` with how to start speechvq-NAME on $nproc
#                                processes per node and $nnodes nodes: the command itself (one
#                                process), `torchrun --standalone` (one node), or torchrun with a
#                                c10d rendezvous at $rdzv_endpoint named $rdzv_id (several nodes;
#                                --node-rank=$node_rank when set). The caller defines nproc, nnodes,
#                                node_rank, rdzv_endpoint and rdzv_id (its --nproc ... options).

STAGE_NAMES=(prepare train extract evaluate prior sample resynth)
# the primary hydra config of each stage's command
declare -A STAGE_CONFIG=([prepare]=prepare [train]=train [extract]=extract [evaluate]=evaluate
                         [prior]=train_prior [sample]=sample [resynth]=resynth)
conf_dir=${SPEECHVQ_CONF:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../conf" && pwd)}
force=${force:-false}

_log_at() {  # _log_at DEPTH MESSAGE...
  local depth=$1; shift
  local file=${BASH_SOURCE[depth + 1]:-$0}
  echo "$(date '+%Y-%m-%d %H:%M:%S') (${file##*/}:${BASH_LINENO[depth]}) $*" >&2
}

log() { _log_at 1 "$@"; }

die() { _log_at 1 "ERROR: $*"; exit 1; }

_usage() {  # the script's header: the comment lines after the shebang
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
}

parse_options() {
  overrides=()
  local name value
  while (($#)); do
    case $1 in
      -h|--help) _usage; exit 0 ;;
      --) shift; overrides+=("$@"); break ;;
      --*=*) name=${1%%=*}; value=${1#*=}; shift ;;
      --*)
        (($# >= 2)) || die "option $1 needs a value (see $0 --help)"
        name=$1; value=$2; shift 2 ;;
      *=*|~*) overrides+=("$1"); shift; continue ;;
      *) die "unexpected argument '$1': options are --name value, hydra overrides key=value (see $0 --help)" ;;
    esac
    name=${name#--}; name=${name//-/_}
    if [[ ! $name =~ ^[a-z][a-z0-9_]*$ || $name == overrides || $name == args ]] || [[ ! -v $name ]]; then
      die "unknown option --${name//_/-} (see $0 --help)"
    fi
    printf -v "$name" '%s' "$value"
  done
  export force  # --force true reaches the recipes a corpus script calls
}

_config_has() {  # _config_has CONFIG KEY: CONFIG.yaml has KEY at the top or as a config group
  local file=$conf_dir/$1.yaml
  [ -f "$file" ] || return 0  # no config to look into: let the command judge
  grep -Eq "^(${2}:|  - (override )?${2}( *:|$))" "$file"
}

_routes() {  # _routes STAGE ARG: does the override ARG go to STAGE? (prints it, prefix removed)
  local stage=$1 arg=$2 key
  if [[ $arg =~ ^([a-z_]+):(.*)$ ]]; then
    [[ " ${STAGE_NAMES[*]} " == *" ${BASH_REMATCH[1]} "* ]] \
      || die "override '$arg': unknown stage '${BASH_REMATCH[1]}' (one of: ${STAGE_NAMES[*]})"
    [ "${BASH_REMATCH[1]}" = "$stage" ] || return 1
    printf '%s' "${BASH_REMATCH[2]}"
  else
    key=${arg#\~}; key=${key#++}; key=${key#+}; key=${key%%[.=@]*}
    _config_has "${STAGE_CONFIG[$stage]}" "$key" || return 1
    printf '%s' "$arg"
  fi
}

stage_args() {
  local arg routed
  args=()
  for arg in ${overrides[@]+"${overrides[@]}"}; do
    if routed=$(_routes "$1" "$arg"); then args+=("$routed"); fi
  done
}

check_overrides() {
  local arg stage used
  (($#)) || set -- "${STAGE_NAMES[@]}"
  for arg in ${overrides[@]+"${overrides[@]}"}; do
    used=""
    for stage in "$@"; do
      if _routes "$stage" "$arg" >/dev/null; then used=1; break; fi
    done
    [ -n "$used" ] && continue
    if [[ $arg =~ ^([a-z_]+): ]]; then
      die "override '$arg' is for stage ${BASH_REMATCH[1]}, which $0 does not run (its stages: $*)"
    fi
    die "override '$arg' reaches none of the stages $* (no such key in their configs): check its spelling, or send it to one stage as STAGE:$arg"
  done
}

require() {
  local name missing=()
  for name in "$@"; do [ -n "${!name}" ] || missing+=("--${name//_/-}"); done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]} (see $0 --help)"
}

want_stage() {
  [[ ${stage:?} =~ ^-?[0-9]+$ && ${stop_stage:?} =~ ^-?[0-9]+$ ]] \
    || die "--stage and --stop-stage take numbers (got '$stage' and '$stop_stage')"
  [ "$stage" -le "$1" ] && [ "$stop_stage" -ge "$1" ]
}

run_step() {
  local dir=$1 name=$2 after=() dep
  shift 2
  while (($#)) && [ "$1" != -- ]; do
    if [ "$1" != --after ] || (($# < 2)); then
      die "run_step: expected '--after FILE' or '--', got '$1'"
    fi
    after+=("$2"); shift 2
  done
  (($#)) || die "run_step: missing '--' before the command"
  shift
  local marker=$dir/.done.$name command hash
  command=$(printf '%q ' "$@")
  # the same step on every node of a multi-node job: its node rank is not part of what it does
  hash=$(printf '%q ' "${@/#--node-rank=*/}" | sha256sum | cut -c1-16)
  if [ -f "$marker" ] && [ "$force" != true ]; then
    if [ "$(head -n 1 "$marker")" != "$hash" ]; then
      _log_at 1 "$name: the command changed since $marker was written: re-running"
    else
      local newer=""
      for dep in ${after[@]+"${after[@]}"}; do
        [ "$dep" -nt "$marker" ] && newer=$dep && break
      done
      if [ -z "$newer" ]; then
        _log_at 1 "$name: done, skipping (marker $marker; delete it or pass --force true to redo)"
        return 0
      fi
      _log_at 1 "$name: $newer is newer than $marker: re-running"
    fi
  fi
  mkdir -p "$dir"
  rm -f "$marker"
  _log_at 1 "$name: $command"
  "$@"
  printf '%s\n%s\n' "$hash" "$command" > "$marker.tmp"
  mv "$marker.tmp" "$marker"
}

speechvq_bin() {
  command -v "speechvq-$1" || die "speechvq-$1 not found: activate the environment speechvq is installed in (pip install -e .)"
}

launcher() {
  local bin
  [[ ${nproc:?} =~ ^[1-9][0-9]*$ ]] || die "--nproc takes a positive number (got '$nproc')"
  [[ ${nnodes:?} =~ ^[1-9][0-9]*$ ]] || die "--nnodes takes a positive number (got '$nnodes')"
  if ((nnodes == 1 && nproc == 1)); then cmd=("speechvq-$1"); return; fi
  bin=$(speechvq_bin "$1")
  if ((nnodes == 1)); then cmd=(torchrun --standalone "--nproc_per_node=$nproc" "$bin"); return; fi
  [ -n "${rdzv_endpoint:-}" ] || die "--nnodes $nnodes needs --rdzv-endpoint HOST:PORT (the first node's address and a free port, the same on every node)"
  cmd=(torchrun "--nnodes=$nnodes" "--nproc_per_node=$nproc" --rdzv-backend=c10d
       "--rdzv-endpoint=$rdzv_endpoint" "--rdzv-id=${rdzv_id:-speechvq}")
  if [ -n "${node_rank:-}" ]; then cmd+=("--node-rank=$node_rank"); fi
  cmd+=("$bin")
}
