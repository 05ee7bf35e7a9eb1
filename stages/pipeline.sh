#!/usr/bin/env bash
# Every stage the config's final_stage needs, in order. Complete stages (stage.json present) are skipped,
# incomplete ones resume from their last checkpoint; a failing stage stops the pipeline with its exit code.
# Usage: bash stages/pipeline.sh CONFIG [--set key=value ...]    (launch mode: see stages/lib.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG [--set key=value ...]}; shift
source stages/lib.sh
"$PY" -m rlhf.cli preflight --config "$CONFIG" "$@"
pending=$("$PY" -m rlhf.cli pipeline --config "$CONFIG" "$@" --pending)
for stage in $("$PY" -m rlhf.cli pipeline --config "$CONFIG" "$@" --stages); do
  case " $pending " in
    *" $stage "*) echo "[pipeline] $stage: starting"; rlhf_run "$stage" --config "$CONFIG" "$@" ;;
    *) echo "[pipeline] $stage: complete, skipping" ;;
  esac
done
echo "[pipeline] done"
