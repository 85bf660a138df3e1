#!/usr/bin/env bash
# The manual exo test, automated and safe to rerun:
#   1. link Nemotron from LM Studio (zero-copy: the HF cache, and a folder of file links in the read-only
#      dir exo must be started with: EXO_MODELS_READ_ONLY_DIRS, the line `link` prints),
#   2. probe it against the running exo,
#   3. bring it up on exo (exo builds and keeps its card through POST /models/add) and ask "What is 2+2?"
#      (50 tokens at most): print the answer, tokens/s and the route.
# When Nemotron cannot run, `up` falls back to the Llama and says why. Exit 0 only when a model answered.
#
# Environment (all optional):
#   EXO_API          exo's API                         (default http://localhost:52415)
#   NEMOTRON_ID      the model to bring up             (default lmstudio-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit)
#   LLAMA_ID         the fallback                      (default mlx-community/Llama-3.2-1B-Instruct-4bit)
#   LMSTUDIO_MODELS  LM Studio's models folder         (default: where LM Studio keeps them)
#   ARTHUR_CLUSTER   the arthur-cluster command        (default arthur-cluster)
#   UP_TIMEOUT       seconds for one placement to load (default 600)
#   PROBE_FLAGS      extra probe flags                 (default --static-only; empty runs the local proof too)
# Options:
#   --dry-run   change nothing: show what link would do, probe, and which model/route `up` would pick
#   --down      stop the model again at the end
set -uo pipefail

usage() {
  sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

DRY=0
DOWN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --down) DOWN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $arg" >&2; usage >&2; exit 2 ;;
  esac
done

EXO_API="${EXO_API:-http://localhost:52415}"
NEMOTRON_ID="${NEMOTRON_ID:-lmstudio-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit}"
LLAMA_ID="${LLAMA_ID:-mlx-community/Llama-3.2-1B-Instruct-4bit}"
UP_TIMEOUT="${UP_TIMEOUT:-600}"
PROBE_FLAGS="${PROBE_FLAGS---static-only}"
QUESTION="What is 2+2?"
MAX_TOKENS=50
read -r -a AC <<< "${ARTHUR_CLUSTER:-arthur-cluster}"
if [ -n "${LMSTUDIO_MODELS:-}" ]; then
  export ARTHUR_LMSTUDIO_MODELS="$LMSTUDIO_MODELS"  # every arthur-cluster command reads it
fi

if ! command -v "${AC[0]}" >/dev/null 2>&1; then
  echo "error: ${AC[0]} not found: install arthur-cluster (pip install -e .) or set ARTHUR_CLUSTER" >&2
  exit 1
fi

step() { printf '\n== %s\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "1. Link $NEMOTRON_ID from LM Studio"
link_flags=()
if [ "$DRY" = 1 ]; then link_flags+=(--dry-run); fi
if ! run "${AC[@]}" link "$NEMOTRON_ID" ${link_flags[@]+"${link_flags[@]}"}; then
  echo "-> $NEMOTRON_ID could not be linked (above); bring-up falls back to $LLAMA_ID if it has to"
fi

step "2. Probe $NEMOTRON_ID on exo at $EXO_API"
# shellcheck disable=SC2086  # PROBE_FLAGS is a list of flags
run "${AC[@]}" probe "$NEMOTRON_ID" --exo "$EXO_API" --engine exo $PROBE_FLAGS
rc=$?
case "$rc" in
  0) echo "-> probe: an exo route is ok" ;;
  3) echo "-> probe: no exo route is ok yet (above); bring-up tries, then falls back" ;;
  4) echo "-> probe: exo's answer is not known yet (above); bring-up asks exo itself" ;;
  *) echo "-> probe could not finish (exit $rc); bring-up checks again" ;;
esac

up_args=("$NEMOTRON_ID" --fallback "$LLAMA_ID" --engine exo --exo "$EXO_API")
if [ "$DRY" = 1 ]; then
  step "3. Pick (dry run: nothing is placed)"
  run "${AC[@]}" pick "${up_args[@]}"
  rc=$?
  echo "-> would run: ${AC[*]} up ${up_args[*]} --timeout $UP_TIMEOUT --prompt '$QUESTION' --max-tokens $MAX_TOKENS"
  exit "$rc"
fi

step "3. Bring it up on exo and ask: $QUESTION"
run "${AC[@]}" up "${up_args[@]}" --timeout "$UP_TIMEOUT" --prompt "$QUESTION" --max-tokens "$MAX_TOKENS"
rc=$?
if [ "$rc" != 0 ]; then
  echo "FAILED: no model answered (exit $rc); the reasons are above"
  exit 1
fi
if [ "$DOWN" = 1 ]; then
  step "4. Down"
  run "${AC[@]}" down
fi
echo "OK: a model answered (the route and tokens/s are above; \`arthur-cluster down\` stops it)"
exit 0
