# Shared by the stage scripts: pick the Python and the launcher from the environment.
#   (default)                one plain process (CPU or one GPU)
#   NUM_GPUS=N               deepspeed on this node with N ranks (no CUDA: N CPU ranks with gloo)
#   HOSTFILE=path MASTER_ADDR=host
#                            deepspeed over the hosts in a hostfile (pdsh/ssh), NUM_GPUS per host
#   NNODES=M NODE_RANK=r MASTER_ADDR=host [MASTER_PORT=29500]
#                            deepspeed --no_ssh: run the same command on every node with its NODE_RANK
#   LAUNCHER=torchrun        torchrun --nproc_per_node NUM_GPUS (NNODES>1 needs NODE_RANK and MASTER_ADDR)
# With NNODES or torchrun and NUM_GPUS unset, NUM_GPUS is this node's GPU count (1 without a GPU).
# DRY_RUN=1 prints the command each node would run, with the variables it depends on, and starts nothing.
# Before a launch each node checks the stage (`rlhf preflight`) and fetches its models (`rlhf fetch`, below);
#   PREFLIGHT=0 skips both (in pipeline.sh the fetch only: its own preflight always runs).
# LAUNCH_ARGS="..." adds options to the launcher's own (before the module), e.g. DeepSpeed's
#   --include/--exclude, --enable_each_rank_log DIR, --bind_cores_to_rank; torchrun's --log-dir, --tee.
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
# DeepSpeed's launcher and ranks then take the CPU accelerator instead of probing for GPUs.
if ! command -v nvidia-smi >/dev/null 2>&1; then
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
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

# Every node of a multi-node launch must name the same rendezvous. A guess hangs there instead of failing:
# torchrun's defaults (NODE_RANK=0, MASTER_ADDR=127.0.0.1) on every node, or what DeepSpeed's hostfile mode
# takes without --master_addr, the first word of `hostname -I` on the first host (often docker0 or a
# management NIC). So these are required, checked before anything starts, with one line naming what is missing.
rlhf_require() {  # MODE VAR...: exit 2 unless every VAR is set
  local mode=$1 var missing=(); shift
  for var in "$@"; do
    case $var in
      NODE_RANK) [ -n "${NODE_RANK:-}" ] || missing+=("NODE_RANK (this node's rank, 0 to NNODES-1)") ;;
      MASTER_ADDR) [ -n "${MASTER_ADDR:-}" ] || missing+=("MASTER_ADDR (node 0's address on the network the" \
        "nodes share; node 0 is the first host of a hostfile)") ;;
    esac
  done
  [ ${#missing[@]} -eq 0 ] && return
  echo "error: $mode needs $(printf '%s and ' "${missing[@]}" | sed 's/ and $//')" >&2
  exit 2
}
_rank=NODE_RANK
if [ "${DRY_RUN:-0}" != 0 ]; then _rank=""; fi  # a dry run prints the command of every node
if [ "${LAUNCHER:-}" = torchrun ]; then
  if [ "${NNODES:-1}" -gt 1 ]; then rlhf_require "LAUNCHER=torchrun NNODES=$NNODES" $_rank MASTER_ADDR; fi
elif [ -n "${NNODES:-}" ]; then
  rlhf_require "NNODES=$NNODES" $_rank MASTER_ADDR
elif [ -n "${HOSTFILE:-}" ]; then
  rlhf_require "HOSTFILE=$HOSTFILE" MASTER_ADDR
fi
unset _rank
# NNODES and torchrun start NUM_GPUS ranks on each node; unset, it is this node's GPU count (1 without a GPU),
# since a fixed 1 would leave GPUs idle (a hostfile's slots=8 included: --num_gpus caps them).
if [ -z "${NUM_GPUS:-}" ] && { [ -n "${NNODES:-}" ] || [ "${LAUNCHER:-}" = torchrun ]; }; then
  NUM_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  export NUM_GPUS=$((NUM_GPUS > 0 ? NUM_GPUS : 1))
  echo "[launch] NUM_GPUS unset: $NUM_GPUS rank(s) per node (the GPUs nvidia-smi -L lists here, or 1)" >&2
fi

# The hostfile mode starts the other hosts' ranks through pdsh with only the variables DeepSpeed forwards
# (PYTHON*, UCX*, MV2*, MLFLOW*, and NCCL* on GPUs) plus the KEY=value lines of its environment file:
# DS_ENV_FILE (default .deepspeed_env) read in $HOME, then in the current dir, a later line winning. These
# would be lost there; tokens stay out (pdsh puts each value on the hosts' command lines).
RLHF_FORWARD='^(HF_|HUGGINGFACE_|TRANSFORMERS_|TRL_|TORCH_|PYTORCH_|NCCL_|GLOO_|RLHF_|OMP_)'
RLHF_FORWARD+='|^(TOKENIZERS_PARALLELISM|CUDA_HOME|DS_ACCELERATOR)$'
rlhf_env_file_text() {  # this shell's variables to forward, then the lines of the user's own file(s), which win
  local var name=${DS_ENV_FILE:-.deepspeed_env} dirs=("${HOME:-}" .) dir
  for var in $(compgen -e | sort); do
    if [[ $var =~ $RLHF_FORWARD && $var != *TOKEN && ${!var} != *$'\n'* ]]; then echo "$var=${!var}"; fi
  done
  if [[ $name = /* ]]; then dirs=(/); fi
  for dir in "${dirs[@]}"; do
    if [ -n "$dir" ] && [ -f "$dir/$name" ]; then grep '=' "$dir/$name" || true; fi
  done
}

RLHF_TMP=() RLHF_TMP_TEXT=()  # files of the current launch, removed once it ends, and what they hold
rlhf_tmp() {  # VAR NAME TEXT: a new file holding TEXT, its path put in VAR (DRY_RUN: the path only)
  local path="${TMPDIR:-/tmp}/$2.XXXXXX"
  if [ "${DRY_RUN:-0}" = 0 ]; then
    path=$(mktemp "$path")
    if [ -n "$3" ]; then printf '%s\n' "$3" > "$path"; fi
  fi
  RLHF_TMP+=("$path") RLHF_TMP_TEXT+=("$3")
  printf -v "$1" '%s' "$path"
}

rlhf_hostfile_mode() {  # true in the hostfile (pdsh) mode: one script, on the launch host, starts every host
  [ -n "${HOSTFILE:-}" ] && [ -z "${NNODES:-}" ] && [ "${LAUNCHER:-}" != torchrun ]
}

rlhf_launcher() {
  local port=${MASTER_PORT:-29500} hosts env_file i extra=()
  RLHF_TMP=() RLHF_TMP_TEXT=()
  read -r -a extra <<< "${LAUNCH_ARGS:-}"
  if [ "${LAUNCHER:-}" = torchrun ]; then
    # torchrun starts each worker in a session of its own: only the agent can relay a signal, and by default
    # it relays SIGTERM, SIGINT, SIGHUP and SIGQUIT but dies on SIGUSR1
    # shellcheck disable=SC2054  # the commas separate torchrun's list of signals
    LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "${NUM_GPUS:-1}" --nnodes "${NNODES:-1}" \
      --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$port" \
      --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 "${extra[@]}" -m rlhf.cli)
  elif [ -n "${NNODES:-}" ]; then
    hosts=${HOSTFILE:-}
    if [ -z "$hosts" ]; then  # --no_ssh still takes the world layout from a hostfile; the names need not resolve
      rlhf_tmp hosts rlhf-hostfile "$(for ((i = 0; i < NNODES; i++)); do echo "node$i slots=${NUM_GPUS:-1}"; done)"
    fi
    LAUNCH=("$PY" -m deepspeed.launcher.runner --no_ssh --hostfile "$hosts" --num_nodes "$NNODES" \
      --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
      --master_port "$port" --num_gpus "${NUM_GPUS:-1}" "${extra[@]}" --module rlhf.cli)
  elif [ -n "${HOSTFILE:-}" ]; then
    # an absolute DS_ENV_FILE replaces both places DeepSpeed looks: this launch's file, the user's merged in
    rlhf_tmp env_file rlhf-deepspeed-env "$(rlhf_env_file_text)"
    LAUNCH=(env "DS_ENV_FILE=$env_file" "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" \
      --master_addr "$MASTER_ADDR" --master_port "$port" ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} "${extra[@]}" \
      --module rlhf.cli)
  elif [ -n "${NUM_GPUS:-}" ]; then
    LAUNCH=("$PY" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "$port" "${extra[@]}" \
      --module rlhf.cli)
  else
    if [ ${#extra[@]} -gt 0 ]; then
      echo "error: LAUNCH_ARGS=${LAUNCH_ARGS} needs a launcher (NUM_GPUS, NNODES, HOSTFILE or LAUNCHER=torchrun)" >&2
      exit 2
    fi
    LAUNCH=("$PY" -m rlhf.cli)
  fi
}

rlhf_dry_run() {  # CMD ARGS...: print what each node would run, with the variables it depends on
  local nodes=1 node where var vars i host
  if [ -n "${NNODES:-}" ]; then nodes=$NNODES; fi
  for ((node = 0; node < nodes; node++)); do
    where="this node"
    if [ -n "${NNODES:-}" ]; then local NODE_RANK=$node; where="node $node of $NNODES"; fi
    rlhf_launcher
    vars=""
    for var in MASTER_ADDR MASTER_PORT NNODES NODE_RANK NUM_GPUS GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME \
      DS_ACCELERATOR; do
      if [ -n "${!var:-}" ]; then vars+=$(printf '%s=%q ' "$var" "${!var}"); fi
    done
    echo "[dry-run] $where: $vars$(printf '%q ' "${LAUNCH[@]}" "$@" | sed 's/ $//')"
  done
  for i in "${!RLHF_TMP[@]}"; do  # the same on every node
    echo "[dry-run] ${RLHF_TMP[$i]} (written at launch): $(printf '%s' "${RLHF_TMP_TEXT[$i]}" | tr '\n' ' ')"
  done
  if rlhf_hostfile_mode; then  # pdsh starts DeepSpeed's launch on every host
    node=0
    while read -r host; do
      echo "[dry-run] node $node (host $host, through pdsh): $(printf '%s' "${RLHF_TMP_TEXT[0]}" | tr '\n' ' ')" \
        "$PY -u -m deepspeed.launcher.launch --world_info=<HOSTFILE's hosts and slots> --node_rank=$node" \
        "--master_addr=$MASTER_ADDR --master_port=${MASTER_PORT:-29500} --module rlhf.cli $*"
      node=$((node + 1))
    done < <(sed 's/#.*//' "$HOSTFILE" | awk 'NF { print $1 }')
  fi
}

# pipeline.sh with NNODES>1: every node runs the script, and all must start the same stages, or their
# collectives mismatch. A node sees only its own disk (node-local run dirs, a node new to the run, a kill
# between rank 0's stage.json and its copy), so node 0 collects each node's pending stages over a TCP store
# on MASTER_ADDR:MASTER_PORT (free until the first stage's launch binds it) and hands every node one answer:
# the stages pending on any node, in the config's order. Node 0's store stays up until every node has it.
# The nodes must get here within RLHF_AGREE_TIMEOUT_S (default 1800 s, as run.collective_timeout_s).
RLHF_AGREE='import os, sys
from datetime import timedelta
from torch.distributed import TCPStore
stages, mine = sys.argv[1].split(), sys.argv[2]
rank, nodes = int(os.environ["NODE_RANK"]), int(os.environ["NNODES"])
timeout = timedelta(seconds=float(os.environ.get("RLHF_AGREE_TIMEOUT_S") or 1800))
store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT") or 29500), nodes, rank == 0, timeout)
store.set(f"pending{rank}", mine)
if rank == 0:
    pending = {s for r in range(nodes) for s in store.get(f"pending{r}").decode().split()}
    store.set("run", " ".join(s for s in stages if s in pending))
print(store.get("run").decode())
store.set(f"done{rank}", "")
if rank == 0:
    store.wait([f"done{r}" for r in range(nodes)])'
rlhf_agree() {  # STAGES PENDING: the stages to run, the same on every node (PENDING: this node's view)
  if [ "${NNODES:-1}" -le 1 ]; then echo "$2"; return; fi
  if [ "${DRY_RUN:-0}" != 0 ]; then
    echo "[dry-run] pending on this node: ${2:-none}; at launch every node runs the stages pending on any of" \
      "the $NNODES nodes (node 0 collects them over $MASTER_ADDR:${MASTER_PORT:-29500})" >&2
    echo "$2"; return
  fi
  "$PY" -c "$RLHF_AGREE" "$1" "$2"
}

# The hostfile mode runs pipeline.sh on one host, which decides the stages for every host from its own run
# dir. With node-local run dirs that must be the disk global rank 0 writes, the first host of the file:
# every other host's copy of a stage comes from there (rlhf/replicate.py). Elsewhere this prints a note.
rlhf_first_host_note() {
  rlhf_hostfile_mode || return 0
  local first names
  first=$(sed 's/#.*//' "$HOSTFILE" | awk 'NF { print $1; exit }')
  names=" localhost 127.0.0.1 $(hostname 2>/dev/null) $(hostname -s 2>/dev/null) $(hostname -I 2>/dev/null) "
  case $names in
    *" $first "*) ;;
    *) echo "[pipeline] note: the stages to run are read from this host's run dir ($(hostname)), while global" \
         "rank 0 writes on $first (HOSTFILE's first host); with run dirs on node-local disks, start" \
         "pipeline.sh on $first" >&2 ;;
  esac
}

rlhf_preflight() {  # STAGE --config CONFIG ARGS...: that stage's preflight on this node before it launches
  # (config, data, models, and with a launcher the master port, the hostfile's hosts and MASTER_ADDR), so a
  # busy port or an unresolvable host is one line, not a launcher hanging or dying. --restart is the stage's.
  # Then the models the stage reads are fetched (rlhf_fetch). PREFLIGHT=0 skips both: the stage still checks
  # itself and fetches its models once started.
  local stage=$1 args=() arg; shift
  if [ "${PREFLIGHT:-1}" = 0 ]; then return; fi
  for arg in "$@"; do [ "$arg" = --restart ] || args+=("$arg"); done
  if [ "${DRY_RUN:-0}" != 0 ]; then echo "[dry-run] preflight: $PY -m rlhf.cli preflight --stage $stage ${args[*]}"
  else "$PY" -m rlhf.cli preflight --stage "$stage" "${args[@]}"; fi
  rlhf_fetch "$stage" "${args[@]}"
}

# Models are fetched once per node before a launch: `rlhf fetch` builds the aliases the stages read into the
# cache and downloads their hub ids (the cached copy must exist with HF_HUB_OFFLINE=1), so the ranks find
# them in place instead of each building or downloading them at once. Each node's script runs it (NNODES,
# torchrun, Slurm); in the hostfile mode DeepSpeed's runner starts it on every host of the file, one process
# per host, through pdsh as it starts the ranks. PREFLIGHT=0 skips it: each rank then fetches for itself, an
# alias built once per cache under its lock (src/rlhf/models/cachelock.py).
rlhf_fetch() {  # "STAGES" --config CONFIG ARGS...: fetch what STAGES read, on every node of the launch
  local words=() where="this node"; read -r -a words <<< "$1"; shift
  if [ "${PREFLIGHT:-1}" = 0 ] || [ ${#words[@]} -eq 0 ]; then return; fi
  LAUNCH=("$PY" -m rlhf.cli) RLHF_TMP=() RLHF_TMP_TEXT=()
  if rlhf_hostfile_mode; then
    NUM_GPUS=1 LAUNCH_ARGS="" rlhf_launcher  # one process per host; the stage's launcher options stay its own
    where="every host of $HOSTFILE"
  elif [ "${NNODES:-1}" -gt 1 ]; then
    where="each of the $NNODES nodes, by its own script"
  fi
  if [ "${DRY_RUN:-0}" != 0 ]; then
    echo "[dry-run] fetch ($where): $(printf '%q ' "${LAUNCH[@]}" fetch "$@" --stages "${words[@]}" | sed 's/ $//')"
    return
  fi
  local rc=0
  "${LAUNCH[@]}" fetch "$@" --stages "${words[@]}" || rc=$?
  rm -f "${RLHF_TMP[@]}"
  return "$rc"
}

rlhf_run() {
  local cmd=$1; shift
  if [ "${DRY_RUN:-0}" != 0 ]; then rlhf_dry_run "$cmd" "$@"; return; fi
  rlhf_launcher
  local log_dir; log_dir=$(rlhf_log_dir "$@")
  mkdir -p "$log_dir"
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
  rm -f "${RLHF_TMP[@]}"
  if [ -n "$RLHF_STOP" ]; then return $((128 + $(kill -l "$RLHF_STOP"))); fi
  return "$rc"
}
