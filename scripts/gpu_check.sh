#!/usr/bin/env bash
# Checks the package on a machine with one CUDA GPU and no network, on the tiny model: meant to take
# under 8 minutes on an H100 (not yet run on a GPU; 4 min on a 2-core CPU with GPU_CHECK_DEVICE=cpu).
# Each check has a time limit (590 s together, so a hang cannot hold the machine past 10 minutes).
# One PASS/FAIL line per check; exit status 1 when any fails. Run from anywhere: bash scripts/gpu_check.sh
#
#   a  the tiny pipeline as one plain process on CUDA in bf16: sft -> reward -> ppo, then dpo and orpo,
#      then `rlhf eval`; every stage.json's `devices` (role -> device) all on CUDA
#   b  NUM_GPUS=1 bash stages/pipeline.sh (deepspeed launcher), ZeRO-3 for every model, bf16
#   c  PPO under the deepspeed launcher on 1 GPU: ZeRO-2 with the actor's and critic's optimizer offloaded,
#      then ZeRO-3 with every model's parameters offloaded
#   d  PPO (launcher, ZeRO-3) killed with SIGKILL once checkpoint-1 is complete, then the same command
#      again: it logs that it resumes and ends at global_step == ppo.steps
#   e  the PPO run's peak GPU memory (memory.json, torch.cuda.max_memory_allocated) next to
#      `rlhf plan --json`'s estimate for the same config: PASS when measured <= predicted + 512 MiB
#
# Environment:
#   CHECKS="a c"      run a subset (default: a b c d e f)
#   WHEELS=DIR        first install DIR/*.whl (made by scripts/wheelhouse.sh; the package's own wheel is
#                     skipped: this checkout's src/ is what is checked) with
#                     `pip install --no-index --no-deps --target SITE`, then PYTHONPATH=SITE:src. For an
#                     image whose Python has torch but not the rest. SITE: $WHEELS_TARGET, else
#                     <sys.prefix>/lib/rlhf-gpu-check-site (see below why under the prefix)
#   PY=python3        the Python (default: .venv/bin/python if present, else python3; with WHEELS python3)
#   GPU_CHECK_LOGS    where the logs go (default: $OUT if set, else ./gpu_check_out): one <check>.log each,
#                     base.log (the SFT + reward models c, d and e share) and summary.txt
#   GPU_CHECK_RUNS    parent dir of the run dirs, one fresh dir per check (default: a new dir in $TMPDIR)
#   GPU_CHECK_TIME_PCT  scales every check's time limit, in percent (default 100, with GPU_CHECK_DEVICE=cpu 300)
#   GPU_CHECK_DEVICE  cpu: run every check on the CPU in float32 (DeepSpeed on its CPU accelerator), only to
#                     test this script itself on a machine without a GPU; the checks then expect "cpu"
#                     devices, and e has no CUDA peak to compare (SKIP)
# shellcheck disable=SC2317  # the check functions are called by name (run_check)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
CONFIG=configs/tiny.yaml
CHECKS=${CHECKS:-a b c d e f}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
LOGS=${GPU_CHECK_LOGS:-${OUT:-gpu_check_out}}
SLACK_MIB=512
# Seconds per check. The tiny model's steps take fractions of a second: most of a check is Python, CUDA and
# launcher start-up (a: 4 processes; b: 3 launches and 3 short processes; c, d: 2 launches; e: 1 launch and
# plan; base, the SFT and reward models c, d and e copy: 1 process). a's commands took 122 s on an H200 at
# commit ef2fa20 (PPO then still on the CPU), so a has 170 s.
declare -A BUDGET=([base]=50 [a]=170 [b]=120 [c]=100 [d]=80 [e]=70 [f]=90)
PCT=${GPU_CHECK_TIME_PCT:-$( [ "$DEVICE" = cpu ] && echo 300 || echo 100 )}  # CPU runs take longer
[[ $PCT =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check: GPU_CHECK_TIME_PCT must be a whole percent, got '$PCT'" >&2; exit 2; }
for k in "${!BUDGET[@]}"; do BUDGET[$k]=$((BUDGET[$k] * PCT / 100)); done
declare -A TITLE=(
  [a]="tiny pipeline, plain process, sft->reward->ppo, dpo, orpo, eval; all stages' models on $DEVICE"
  [b]="NUM_GPUS=1 stages/pipeline.sh, ZeRO-3 for every model"
  [c]="PPO on 1 GPU (launcher): ZeRO-2 + optimizer offload, ZeRO-3 + parameter offload"
  [d]="PPO SIGKILLed after checkpoint-1, resumed to the same step count"
  [e]="PPO peak GPU memory vs rlhf plan"
  [f]="PPO rollouts on the static KV cache with the decode step as a CUDA graph; decode speed")

case $DEVICE in
  cuda) DTYPE=bfloat16 ;;
  cpu) DTYPE=float32; export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu ;;
  *) echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
for c in $CHECKS; do
  [ -n "${TITLE[$c]:-}" ] || { echo "gpu_check: unknown check '$c' in CHECKS (a b c d e f)" >&2; exit 2; }
done
mkdir -p "$LOGS" || exit 2
LOGS=$(cd "$LOGS" && pwd)
RUNS=${GPU_CHECK_RUNS:-$(mktemp -d "${TMPDIR:-/tmp}/rlhf-gpu-check.XXXXXX")}
mkdir -p "$RUNS" || exit 2
RUNS=$(cd "$RUNS" && pwd)
SUMMARY=$LOGS/summary.txt
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  PY=${PY:-python3}
  # The target dir lies under the interpreter's prefix where that is writable: dill, which datasets uses to
  # fingerprint data, pickles modules from outside sys.prefix by value, and with pyarrow from such a dir
  # the first dataset fails ("Can't pickle <class 'MonthDayNano'>").
  SITE=${WHEELS_TARGET:-$("$PY" -c 'import sys; print(sys.prefix)')/lib/rlhf-gpu-check-site}
  if [ -z "${WHEELS_TARGET:-}" ] && ! mkdir -p "$SITE" 2>/dev/null; then
    SITE=${TMPDIR:-/tmp}/rlhf-gpu-check-site
    echo "gpu_check: the Python's prefix is read-only: wheels go to $SITE (datasets fails there if pyarrow is among them)" >&2
  fi
  wheels=()
  for f in "$WHEELS"/*.whl; do case ${f##*/} in rlhf-*) ;; *) wheels+=("$f") ;; esac; done
  [ -e "${wheels[0]:-}" ] || { say "FAIL setup: no wheels in $WHEELS"; rmdir "$RUNS" 2>/dev/null; exit 1; }
  if ! "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
      --target "$SITE" "${wheels[@]}" > "$LOGS/base.log" 2>&1; then
    say "FAIL setup: pip install --target $SITE from $WHEELS failed (log: $LOGS/base.log)"; rmdir "$RUNS" 2>/dev/null
    exit 1
  fi
  export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
else
  PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PY  # stages/lib.sh uses it too
CHECK=("$PY" "$ROOT/scripts/gpu_check.py")

say "gpu_check: device $DEVICE ($DTYPE), checks: $CHECKS; logs in $LOGS, runs in $RUNS"
if ! "${CHECK[@]}" env --device "$DEVICE" 2>&1 | tee -a "$SUMMARY"; then
  say "FAIL setup: the environment cannot run the checks (above)"; rmdir "$RUNS" 2>/dev/null; exit 1
fi

# Settings every run shares: the device, the dtype, and torch's AdamW so that DeepSpeed compiles no op.
COMMON=(--set "run.device=$DEVICE" --set "model.dtype=$DTYPE" --set deepspeed.torch_adam=true
        --set logging.progress=false)
STEPS=$("$PY" -c 'import sys; from rlhf.config import load_config; print(load_config(sys.argv[1]).ppo.steps)' "$CONFIG")
PORT0=$((29500 + RANDOM % 500))  # each check takes ports from its own block of 10 (next_port)
PORT=$PORT0
next_port() { PORT=$((PORT + 1)); }

# --- helpers: run inside a check, whose output goes to its log ----------------------------------------
DEADLINE=0
left() { local s=$((DEADLINE - SECONDS)); [ "$s" -gt 0 ] && echo "$s" || echo 1; }
fail() { echo "FAIL: $*"; return 1; }
run() {  # CMD...: run with the check's remaining time; a non-zero exit fails the check
  echo "+ $*"
  timeout -k 10 "$(left)" "$@" < /dev/null
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then fail "timed out or killed (the check has ${BUDGET[$CUR]} s): $*"; return 1; fi
  [ "$rc" -eq 0 ] || { fail "exit $rc: $*"; return 1; }
}
rlhf() { run "$PY" -m rlhf.cli "$@"; }
launch() {  # STAGE_SCRIPT ARGS...: a stage script under the deepspeed launcher with one rank
  next_port
  NUM_GPUS=1 MASTER_PORT=$PORT run bash "stages/$1" "${@:2}"
}
with_base() {  # DIR: a fresh run dir holding copies of the shared SFT and reward stages
  [ -f "$RUNS/base/tiny/reward/stage.json" ] || { fail "the shared SFT + reward models failed (base.log)"; return 1; }
  mkdir -p "$1/tiny" && cp -a "$RUNS/base/tiny/sft" "$RUNS/base/tiny/reward" "$1/tiny/"
}

build_base() {  # SFT and reward once, as a plain process, for c, d, e and f
  local R=$RUNS/base
  rlhf pipeline --config "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" --set final_stage= || return 1
  "${CHECK[@]}" stage "$R/tiny" sft --prefix "$DEVICE" --roles policy &&
    "${CHECK[@]}" stage "$R/tiny" reward --prefix "$DEVICE" --roles reward
}

check_a() {
  local R=$RUNS/a
  local O=(--config "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R")
  rlhf pipeline "${O[@]}" || return 1                        # sft -> reward -> ppo
  rlhf pipeline "${O[@]}" --set final_stage=dpo || return 1  # sft is complete: dpo only
  rlhf pipeline "${O[@]}" --set final_stage=orpo || return 1
  rlhf eval "${O[@]}" || return 1
  local ok=0
  "${CHECK[@]}" stage "$R/tiny" sft --prefix "$DEVICE" --roles policy || ok=1
  "${CHECK[@]}" stage "$R/tiny" reward --prefix "$DEVICE" --roles reward || ok=1
  "${CHECK[@]}" stage "$R/tiny" ppo --prefix "$DEVICE" --roles actor,critic,ref,reward --steps "$STEPS" || ok=1
  "${CHECK[@]}" stage "$R/tiny" dpo --prefix "$DEVICE" --roles policy || ok=1
  "${CHECK[@]}" stage "$R/tiny" orpo --prefix "$DEVICE" --roles policy || ok=1
  "${CHECK[@]}" eval "$R/tiny" --models base,sft,ppo,dpo,orpo --prefix "$DEVICE" || ok=1
  return "$ok"
}

check_b() {
  local R=$RUNS/b z=() role ok=0
  for role in actor critic ref reward; do z+=(--set "deepspeed.$role.zero_stage=3"); done
  next_port
  echo "+ NUM_GPUS=1 MASTER_PORT=$PORT bash stages/pipeline.sh ..."
  NUM_GPUS=1 MASTER_PORT=$PORT run bash stages/pipeline.sh "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" \
    --set deepspeed.zero_stage=3 "${z[@]}" || return 1
  "${CHECK[@]}" stage "$R/tiny" sft --prefix "$DEVICE" --roles policy || ok=1
  "${CHECK[@]}" stage "$R/tiny" reward --prefix "$DEVICE" --roles reward || ok=1
  "${CHECK[@]}" stage "$R/tiny" ppo --prefix "$DEVICE" --roles actor,critic,ref,reward --steps "$STEPS" || ok=1
  "${CHECK[@]}" memory "$R/tiny" --prefix "$DEVICE" --zero actor=3 --zero critic=3 --zero ref=3 --zero reward=3 || ok=1
  return "$ok"
}

check_c() {
  local R ok=0
  # ZeRO-2, optimizer state of the trained models in CPU memory (the frozen ones run at stage 0: ZeRO-1/2
  # shard nothing without an optimizer).
  R=$RUNS/c-zero2-offload-optimizer
  with_base "$R" || return 1
  launch 03_ppo.sh "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" --set deepspeed.zero_stage=2 \
    --set deepspeed.actor.offload_optimizer=true --set deepspeed.critic.offload_optimizer=true || return 1
  "${CHECK[@]}" stage "$R/tiny" ppo --steps "$STEPS" || ok=1
  "${CHECK[@]}" memory "$R/tiny" --prefix "$DEVICE" --zero actor=2 --zero critic=2 || ok=1
  # ZeRO-3, every model's parameters in CPU memory; stage.json's `devices` is where each model computes.
  R=$RUNS/c-zero3-offload-param
  with_base "$R" || return 1
  launch 03_ppo.sh "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" --set deepspeed.zero_stage=3 \
    --set deepspeed.offload_param=true || return 1
  "${CHECK[@]}" stage "$R/tiny" ppo --prefix "$DEVICE" --roles actor,critic,ref,reward --steps "$STEPS" || ok=1
  "${CHECK[@]}" memory "$R/tiny" --prefix "$DEVICE" --zero actor=3 --zero critic=3 --zero ref=3 --zero reward=3 || ok=1
  return "$ok"
}

check_d() {
  local R=$RUNS/d steps=12 pid marker rc
  command -v setsid >/dev/null || { fail "needs setsid (util-linux) to kill the launcher with its ranks"; return 1; }
  with_base "$R" || return 1
  local A=("$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" --set ppo.save_steps=1 --set "ppo.steps=$steps")
  marker=$R/tiny/ppo/checkpoints/checkpoint-1/checkpoint.complete  # rlhf.artifacts.COMPLETE_MARKER
  next_port
  echo "+ NUM_GPUS=1 MASTER_PORT=$PORT setsid bash stages/03_ppo.sh ${A[*]} &   (SIGKILL once $marker exists)"
  # Its own process group (setsid), so that one kill reaches the launcher, the rank and tee.
  NUM_GPUS=1 MASTER_PORT=$PORT setsid bash stages/03_ppo.sh "${A[@]}" &
  pid=$!
  while [ ! -f "$marker" ] && kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$DEADLINE" ]; do sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  rc=$?
  local done_ckpts=("$R"/tiny/ppo/checkpoints/checkpoint-*/checkpoint.complete)
  echo "killed (exit $rc) with ${#done_ckpts[@]} complete checkpoint(s): ${done_ckpts[*]#"$R/tiny/ppo/checkpoints/"}"
  [ -f "$marker" ] || { fail "no complete checkpoint-1 before the run ended or the time ran out"; return 1; }
  [ ! -f "$R/tiny/ppo/stage.json" ] || { fail "PPO finished all $steps steps before the kill: nothing to resume"; return 1; }
  # The same command again, its output in a file of its own to look for the resume line.
  next_port
  local log=$R/resume.log
  NUM_GPUS=1 MASTER_PORT=$PORT run bash stages/03_ppo.sh "${A[@]}" > "$log" 2>&1
  rc=$?
  cat "$log"
  [ "$rc" -eq 0 ] || return 1
  grep -qE "ppo: resuming from .*checkpoint-[0-9]+ \(step [0-9]+\)" "$log" \
    || { fail "the second run did not log 'ppo: resuming from ... (step N)'"; return 1; }
  "${CHECK[@]}" stage "$R/tiny" ppo --prefix "$DEVICE" --roles actor,critic,ref,reward --steps "$steps"
}

check_e() {
  local R=$RUNS/e
  with_base "$R" || return 1
  local S=("${COMMON[@]}" --set "run.output_dir=$R")
  launch 03_ppo.sh "$CONFIG" "${S[@]}" || return 1
  # The estimate for the same config and the same world (1 GPU, 1 node).
  echo "+ $PY -m rlhf.cli plan --config $CONFIG ${S[*]} --gpus 1 --nodes 1 --json > $R/plan.json"
  timeout -k 10 "$(left)" "$PY" -m rlhf.cli plan --config "$CONFIG" "${S[@]}" --gpus 1 --nodes 1 --json \
      > "$R/plan.json" < /dev/null \
    || { fail "rlhf plan --json failed"; return 1; }
  # PASS when measured <= predicted * 1.0 + 512 MiB. The plan's peak_bytes leaves out a fixed 1 GiB
  # (CUDA context, communication buffers, fragmentation: CONTEXT_RESERVE_GIB in rlhf/plan.py). The CUDA
  # context is not in torch.cuda.max_memory_allocated, but fixed-size buffers are (DeepSpeed's bucket and
  # prefetch buffers, cuBLAS workspaces), which dwarf a tiny model's few MiB: the slack is the non-context
  # half of that reserve. The ratio is printed as well, for larger models, where it is the figure to read.
  "${CHECK[@]}" peak "$R/tiny" "$R/plan.json" --slack-mib "$SLACK_MIB"  # exit 3: nothing to compare (CPU)
}

check_f() {
  local R=$RUNS/f log
  with_base "$R" || return 1
  log=$R/ppo.log
  echo "+ $PY -m rlhf.cli ppo --config $CONFIG ... --set ppo.generation=graph > $log"
  run "$PY" -m rlhf.cli ppo --config "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" \
    --set ppo.generation=graph > "$log" 2>&1
  local rc=$?
  cat "$log"
  [ "$rc" -eq 0 ] || return 1
  "${CHECK[@]}" stage "$R/tiny" ppo --prefix "$DEVICE" --roles actor,critic,ref,reward --steps "$STEPS" || return 1
  if [ "$DEVICE" = cuda ]; then
    grep -q "could not capture the decode step" "$log" && { fail "the decode step was not captured (above)"; return 1; }
    grep -q "decode step captured as a CUDA graph" "$log" || { fail "no 'decode step captured' line in the log"; return 1; }
    run "$PY" bench/decode_speed.py --device cuda --shape 0.8b --reps 2
  else
    run "$PY" bench/decode_speed.py --device cpu --shape tiny --batch 8 --new 16 --reps 1
  fi
}

# --- run ---------------------------------------------------------------------------------------------------
# Each check runs in a subshell (an error in one cannot end the script), its output in its log.
failed=0
n=0
run_check() {  # NAME FUNCTION LOG -> RC
  CUR=$1
  DEADLINE=$((SECONDS + BUDGET[$1]))
  PORT=$((PORT0 + 10 * n)); n=$((n + 1))
  ( "$2" ) > "$3" 2>&1
  RC=$?
}
for c in $CHECKS; do
  if [[ $c == [cdef] ]] && [ ! -f "$RUNS/base/tiny/reward/stage.json" ] && [ -z "${BASE_TRIED:-}" ]; then
    BASE_TRIED=1
    t0=$SECONDS
    run_check base build_base "$LOGS/base.log"
    [ "$RC" -eq 0 ] || say "FAIL base  the SFT + reward models c, d, e, f share ($((SECONDS - t0)) s; log $LOGS/base.log)"
  fi
  t0=$SECONDS
  run_check "$c" "check_$c" "$LOGS/$c.log"
  secs=$((SECONDS - t0))
  why=$(grep -E "^(FAIL: |measured: )" "$LOGS/$c.log" | tail -n 1)
  case $RC in
    0) say "PASS $c  ${TITLE[$c]} ($secs s)${why:+; $why}" ;;
    3) say "SKIP $c  ${TITLE[$c]} ($secs s)${why:+; $why}" ;;
    *) failed=1; say "FAIL $c  ${TITLE[$c]} ($secs s; log $LOGS/$c.log)${why:+: ${why#FAIL: }}" ;;
  esac
done
if [ $failed -eq 0 ]; then say "gpu_check: all passed ($SECONDS s)"; else say "gpu_check: FAILED ($SECONDS s)"; fi
exit $failed
