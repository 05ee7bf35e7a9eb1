#!/usr/bin/env bash
# Stage: sft. Usage: bash stages/01_sft.sh CONFIG [--set key=value ...] [--restart]
# Launch mode from the environment (see stages/lib.sh): NUM_GPUS=2 for two ranks under deepspeed;
# DRY_RUN=1 prints the command each node would run and starts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG [--set key=value ...]}; shift
source stages/lib.sh
rlhf_preflight sft --config "$CONFIG" "$@"
rlhf_run sft --config "$CONFIG" "$@"
