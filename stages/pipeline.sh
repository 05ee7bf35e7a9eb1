#!/usr/bin/env bash
# Every stage the config's final_stage needs, in order. Complete stages (stage.json present) are skipped,
# incomplete ones resume from their last checkpoint; a failing stage stops the pipeline with its exit code.
# With NNODES>1 the nodes agree first: a stage runs on all of them unless every node holds it complete; in
# the hostfile mode this host's run dir decides for every host. Then every node fetches the models they read.
# Usage: bash stages/pipeline.sh CONFIG [--set key=value ...]    (launch mode, DRY_RUN: see stages/lib.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG [--set key=value ...]}; shift
source stages/lib.sh
if [ "${DRY_RUN:-0}" = 0 ]; then
  "$PY" -m rlhf.cli preflight --config "$CONFIG" "$@"
else  # preflight probes the master port and writes this node's versions file
  echo "[dry-run] preflight: $PY -m rlhf.cli preflight --config $CONFIG $*"
fi
stages=$("$PY" -m rlhf.cli pipeline --config "$CONFIG" "$@" --stages)
# Decided once, here, never per stage or node: each launch starts its stage on every node (the hostfile mode:
# DeepSpeed's runner sends this host's command to every host through pdsh).
pending=$("$PY" -m rlhf.cli pipeline --config "$CONFIG" "$@" --pending)
pending=$(rlhf_agree "$stages" "$pending")
rlhf_first_host_note  # the hostfile mode, started elsewhere than on its first host
echo "[pipeline] stages to run on every node: ${pending:-none}"
rlhf_fetch "$pending" --config "$CONFIG" "$@"
for stage in $stages; do
  case " $pending " in
    *" $stage "*) echo "[pipeline] $stage: starting"; rlhf_run "$stage" --config "$CONFIG" "$@" ;;
    *) echo "[pipeline] $stage: complete, skipping" ;;
  esac
done
echo "[pipeline] done"
