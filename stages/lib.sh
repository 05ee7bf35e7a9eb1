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
# Stop signals (see "Stopping a run" in stages/README.md): SIGTERM or SIGUSR1 sent to this script, to its
# process group or to every process of a job makes every rank finish its step, save a checkpoint and exit;
# the script then exits 143 (SIGTERM) or 138 (SIGUSR1). SIGINT and SIGHUP are relayed too (no checkpoint).
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

# The stage script relays each stop signal it gets to the launcher's process group, so a signal sent to the
# script alone (`docker stop` signals PID 1 only) reaches the ranks, and waits until the last rank is gone.
# Between launches there is nothing to save: it exits at once. Either way the status is 128 + the number of
# the first signal, whatever the launcher reports (DeepSpeed's exits 1 once it has stopped its ranks).
RLHF_STOP=""  # the first stop signal received
RLHF_JOB=""   # process group (and pid) of the launcher while one runs
rlhf_relay() {
  [ -n "$RLHF_STOP" ] || RLHF_STOP=$1
  if [ -z "$RLHF_JOB" ]; then exit $((128 + $(kill -l "$RLHF_STOP"))); fi
  # before the launcher has made its own group (its first milliseconds) the pid alone is there to signal
  kill -s "$1" -- "-$RLHF_JOB" 2>/dev/null || kill -s "$1" "$RLHF_JOB" 2>/dev/null || true
}
# shellcheck disable=SC2064  # the signal name goes into the trap now, on purpose
for _sig in TERM USR1 INT HUP; do trap "rlhf_relay $_sig" "$_sig"; done; unset _sig
# Runs its arguments as the leader of a new process group (what the relay signals), with SIGINT and SIGQUIT
# back at their defaults (bash makes a background command ignore them).
RLHF_OWN_GROUP='import os, signal, sys
os.setpgid(0, 0)
for sig in (signal.SIGINT, signal.SIGQUIT): signal.signal(sig, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])'

rlhf_log_dir() {  # ARGS: --config FILE [--set k=v ...] -> the run dir's logs/ (runs/logs if the config is bad)
  [ -n "${LOG_DIR:-}" ] && { echo "$LOG_DIR"; return; }
  "$PY" -c 'import sys; from rlhf.config import load_config
a = sys.argv[1:]; sets = [a[i + 1] for i, x in enumerate(a[:-1]) if x == "--set"]
print(load_config(a[a.index("--config") + 1], sets).run.dir / "logs")' "$@" 2>/dev/null || echo runs/logs
}

rlhf_launcher() {
  local port=${MASTER_PORT:-29500}
  if [ "${LAUNCHER:-}" = torchrun ]; then
    # torchrun starts each worker in a session of its own: only the agent can relay a signal, and by default
    # it relays SIGTERM, SIGINT, SIGHUP and SIGQUIT but dies on SIGUSR1
    # shellcheck disable=SC2054  # the commas separate torchrun's list of signals
    LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "${NUM_GPUS:-1}" --nnodes "${NNODES:-1}" \
      --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$port" \
      --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 -m rlhf.cli)
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
  local log=$log_dir/$cmd${NNODES:+.node${NODE_RANK:-0}}.log tee_opts=(-a) rc
  # GNU tee -p: a terminal or pipe that goes away does not end the copy into the log file
  if tee -p </dev/null >/dev/null 2>&1; then tee_opts+=(-p); fi
  # The log writer ignores the stop signals: when a whole process group or job is signalled it stays, and
  # copies the ranks' last lines, until the last rank has closed its output. Its status is left out (with
  # pipefail the job's status is then the launcher's).
  "$PY" -c "$RLHF_OWN_GROUP" "${LAUNCH[@]}" "$cmd" "$@" 2>&1 \
    | (trap '' TERM USR1 INT HUP PIPE; tee "${tee_opts[@]}" "$log" || true) &
  local job=$!
  RLHF_JOB=$(jobs -p %+)
  # `wait` also returns when a trapped signal arrives (the trap relays it): wait again while the job runs
  while :; do
    rc=0; wait "$job" || rc=$?
    if [ "$rc" -le 128 ] || ! kill -0 "$job" 2>/dev/null; then break; fi
  done
  RLHF_JOB=""
  if [ -n "$RLHF_STOP" ]; then return $((128 + $(kill -l "$RLHF_STOP"))); fi
  return "$rc"
}
