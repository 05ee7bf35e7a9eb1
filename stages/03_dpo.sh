#!/usr/bin/env bash
# Stage: dpo (final stage). Usage: bash stages/03_dpo.sh CONFIG [--set key=value ...] [--restart]
# Launch mode from the environment (see stages/README.md): NUM_GPUS=2 for two ranks under deepspeed;
# DRY_RUN=1 prints the command each node would run and starts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG [--set key=value ...]}; shift
source stages/lib.sh
rlhf_preflight dpo --config "$CONFIG" "$@"
rlhf_run dpo --config "$CONFIG" "$@"
