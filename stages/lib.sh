# Shared by the stage scripts: pick the Python and the launcher from the environment.
#   (default)          one plain process (CPU or one GPU)
#   NUM_GPUS=N         deepspeed on this node with N ranks (on a machine without CUDA: N CPU ranks, gloo)
#   LAUNCHER=torchrun  torchrun --nproc_per_node "${NUM_GPUS:-1}"
# Logs go to "$LOG_DIR/<command>.log" (default runs/logs) as well as the terminal.
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LOG_DIR=${LOG_DIR:-runs/logs}

rlhf_run() {
  local cmd=$1; shift
  mkdir -p "$LOG_DIR"
  if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
  local launch=("$PY" -m rlhf.cli)
  if [ "${LAUNCHER:-}" = torchrun ]; then
    launch=("$PY" -m torch.distributed.run --nproc_per_node "${NUM_GPUS:-1}" -m rlhf.cli)
  elif [ -n "${NUM_GPUS:-}" ]; then
    launch=("$(dirname "$PY")/deepspeed" --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" --module rlhf.cli)
  fi
  "${launch[@]}" "$cmd" "$@" 2>&1 | tee -a "$LOG_DIR/$cmd.log"
  return "${PIPESTATUS[0]}"
}
