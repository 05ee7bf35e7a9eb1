# Shared by the stage scripts: pick the Python and the launcher from the environment.
#   (default)                one plain process (CPU or one GPU)
#   NUM_GPUS=N               deepspeed on this node with N ranks (no CUDA: N CPU ranks with gloo)
#   HOSTFILE=path            deepspeed over the hosts in a hostfile (pdsh/ssh), NUM_GPUS per host
#   NNODES=M NODE_RANK=r MASTER_ADDR=host [MASTER_PORT=29500]
#                            deepspeed --no_ssh: run the same command on every node with its NODE_RANK
#   LAUNCHER=torchrun        torchrun --nproc_per_node NUM_GPUS (with NNODES/NODE_RANK/MASTER_ADDR if set)
# Without a GPU, OMP_WAIT_POLICY defaults to PASSIVE (see below).
# NET_IFNAME=eth0 names the network interface that reaches the other nodes (see below).
# Logs go to "<run dir>/logs/<command>.log" (<command>.node<NODE_RANK>.log with NNODES; LOG_DIR overrides
# the dir) as well as the terminal.
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# Without a GPU, idle OpenMP threads sleep instead of spinning: on a shared CPU machine spinning threads made
# the CPU work of a run up to 7x slower (OMP_WAIT_POLICY set by the caller wins).
if ! command -v nvidia-smi >/dev/null 2>&1; then export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}; fi
# Ranks talk over two transports: gloo's TCP (host-side collectives: flags, step numbers, file copies) and
# NCCL (GPU tensors). Each picks its own interface and may pick one the other nodes cannot reach (docker0,
# a management NIC), so one knob sets both; GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME set by the caller win.
if [ -n "${NET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NET_IFNAME} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$NET_IFNAME}
fi

rlhf_log_dir() {  # ARGS: --config FILE [--set k=v ...] -> the run dir's logs/ (runs/logs if the config is bad)
  [ -n "${LOG_DIR:-}" ] && { echo "$LOG_DIR"; return; }
  "$PY" -c 'import sys; from rlhf.config import load_config
a = sys.argv[1:]; sets = [a[i + 1] for i, x in enumerate(a[:-1]) if x == "--set"]
print(load_config(a[a.index("--config") + 1], sets).run.dir / "logs")' "$@" 2>/dev/null || echo runs/logs
}

rlhf_launcher() {
  local port=${MASTER_PORT:-29500}
  if [ "${LAUNCHER:-}" = torchrun ]; then
    LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "${NUM_GPUS:-1}" --nnodes "${NNODES:-1}" \
      --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$port" -m rlhf.cli)
  elif [ -n "${NNODES:-}" ]; then
    local hosts=${HOSTFILE:-}
    if [ -z "$hosts" ]; then  # --no_ssh still takes the world layout from a hostfile; the names need not resolve
      hosts=$(mktemp "${TMPDIR:-/tmp}/rlhf-hostfile.XXXXXX")
      for ((i = 0; i < NNODES; i++)); do echo "node$i slots=${NUM_GPUS:-1}"; done > "$hosts"
    fi
    LAUNCH=("$PY" -m deepspeed.launcher.runner --no_ssh --hostfile "$hosts" --num_nodes "$NNODES" \
      --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" \
      --master_port "$port" --num_gpus "${NUM_GPUS:-1}" --module rlhf.cli)
  elif [ -n "${HOSTFILE:-}" ]; then
    LAUNCH=("$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "$port" \
      ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} --module rlhf.cli)
  elif [ -n "${NUM_GPUS:-}" ]; then
    LAUNCH=("$PY" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "$port" --module rlhf.cli)
  else
    LAUNCH=("$PY" -m rlhf.cli)
  fi
}

rlhf_run() {
  local cmd=$1; shift
  local log_dir; log_dir=$(rlhf_log_dir "$@")
  mkdir -p "$log_dir"
  if ! command -v nvidia-smi >/dev/null 2>&1; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; fi
  rlhf_launcher
  "${LAUNCH[@]}" "$cmd" "$@" 2>&1 | tee -a "$log_dir/$cmd${NNODES:+.node${NODE_RANK:-0}}.log"
  return "${PIPESTATUS[0]}"
}
