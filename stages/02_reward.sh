#!/usr/bin/env bash
# Stage: reward. Usage: bash stages/02_reward.sh CONFIG [--set key=value ...] [--restart]
# Launch mode from the environment (see stages/lib.sh): NUM_GPUS=2 for two ranks under deepspeed;
# DRY_RUN=1 prints the command each node would run and starts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: $0 CONFIG [--set key=value ...]}; shift
source stages/lib.sh
rlhf_preflight reward --config "$CONFIG" "$@"
rlhf_run reward --config "$CONFIG" "$@"
