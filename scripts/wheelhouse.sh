#!/usr/bin/env bash
# A dir of wheels for an offline machine whose Python already has torch (a GPU node or container with a
# CUDA PyTorch): every runtime dependency of the package at the versions CI tests (the pins in
# requirements/constraints.txt and, for what they pull in, the versions scripts/setup.sh installed), a
# py3-none-any DeepSpeed wheel built without ops, and the package itself. torch, triton and the CUDA
# libraries (nvidia-*) are left out. Run it on a machine with network access, after scripts/setup.sh:
# the dependency list is read from .venv's installed metadata (scripts/wheelhouse_deps.py).
#
# Usage: bash scripts/wheelhouse.sh [options] DIR
#   --python X.Y     target Python version             (default: $WHEEL_PYTHON, else 3.12)
#   --arch ARCH      target CPU architecture           (default: $WHEEL_ARCH, else x86_64)
#   --glibc 2.N      newest manylinux glibc to accept  (default: $WHEEL_GLIBC, else 2.28, CUDA torch's own floor)
#   --platform TAG   an exact platform tag, repeatable; replaces the manylinux tags from --arch/--glibc
#   --have FILE      `pip list --format=freeze` of the target: leave out what it has at a fitting version
#   --dev            add pytest and pytest-timeout (to run tests/ there)
#   --bench          add DIR/bench/trl-1.12.0 (the PPO benchmark's peer, kept apart: the package pins a newer trl)
#   --list           print the requirement lines it would fetch and exit (needs no network)
#   PY=python        the Python whose pip downloads and builds (default .venv/bin/python)
#
# On the target (no network, torch installed), into the environment that has torch:
#   python3 -m pip install --no-index --find-links DIR 'rlhf[deepspeed]'
# or, where that environment is read-only, into a dir under the interpreter's prefix (datasets' fingerprints
# fail on pyarrow from a dir outside it): WHEELS=DIR bash scripts/gpu_check.sh does that to check a checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '9,23p' "$0" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "wheelhouse: $*" >&2; exit 1; }

PYV=${WHEEL_PYTHON:-3.12}
ARCH=${WHEEL_ARCH:-x86_64}
GLIBC=${WHEEL_GLIBC:-2.28}
HAVE=""
DEV=""
BENCH=""
LIST=""
DIR=""
PLATFORMS=()
while [ $# -gt 0 ]; do
  case $1 in
    --python) PYV=${2:?--python needs a version}; shift 2 ;;
    --arch) ARCH=${2:?--arch needs a name}; shift 2 ;;
    --glibc) GLIBC=${2:?--glibc needs a version like 2.28}; shift 2 ;;
    --platform) PLATFORMS+=("${2:?--platform needs a tag}"); shift 2 ;;
    --have) HAVE=${2:?--have needs a file}; shift 2 ;;
    --dev) DEV=1; shift ;;
    --bench) BENCH=1; shift ;;
    --list) LIST=1; shift ;;
    -h|--help) usage 0 ;;
    -*) echo "wheelhouse: unknown option $1" >&2; usage ;;
    *) [ -z "$DIR" ] || die "one DIR only (got '$DIR' and '$1')"; DIR=$1; shift ;;
  esac
done
[[ $PYV =~ ^3\.[0-9]+(\.[0-9]+)?$ ]] || die "--python: expected a version like 3.12, got '$PYV'"
[[ $GLIBC =~ ^2\.([0-9]+)$ ]] || die "--glibc: expected a version like 2.28, got '$GLIBC'"
GLIBC_MINOR=${BASH_REMATCH[1]}
[ -z "$HAVE" ] || [ -f "$HAVE" ] || die "--have: $HAVE: no such file"
[ -n "$LIST" ] || [ -n "$DIR" ] || usage

PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c 'import rlhf' 2>/dev/null || die "$PY cannot import rlhf: run scripts/setup.sh first (the list comes from its .venv)"

DEPS_ARGS=(--python "$PYV" --arch "$ARCH")
[ -n "$HAVE" ] && DEPS_ARGS+=(--have "$HAVE")
[ -n "$DEV" ] && DEPS_ARGS+=(--dev)
REQS=$("$PY" scripts/wheelhouse_deps.py "${DEPS_ARGS[@]}") || die "no dependency list (the lines above say why)"
if [ -n "$LIST" ]; then
  printf '%s\n' "$REQS"
  echo "wheelhouse: $(wc -l <<<"$REQS") requirement lines; deepspeed is built as a py3-none-any wheel (DS_BUILD_OPS=0), plus the package itself" >&2
  exit 0
fi

if [ ${#PLATFORMS[@]} -eq 0 ]; then  # pip matches manylinux_2_N tags exactly: name every N up to the target's
  for ((n = GLIBC_MINOR; n >= 17; n--)); do PLATFORMS+=("manylinux_2_${n}_${ARCH}"); done
  PLATFORMS+=("manylinux2014_${ARCH}")
  [ "$ARCH" = x86_64 ] && PLATFORMS+=(manylinux2010_x86_64 manylinux1_x86_64)
fi
PLATFORM_ARGS=()
for tag in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$tag"); done

mkdir -p "$DIR"
LOG=$(mktemp "${TMPDIR:-/tmp}/wheelhouse.XXXXXX.log")
PIP=("$PY" -m pip --disable-pip-version-check)
DOWNLOAD=("${PIP[@]}" download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp
          "${PLATFORM_ARGS[@]}" -d "$DIR")

# A package with no wheel on the index (an sdist only) is built here, and kept only when the build is
# pure Python (py3-none-any): a platform wheel built here would be for this machine, not the target.
build_pure() {  # REQ
  local tmp; tmp=$(mktemp -d "${TMPDIR:-/tmp}/wheelhouse-build.XXXXXX")
  if DS_BUILD_OPS=0 "${PIP[@]}" wheel --no-deps --no-binary :all: -w "$tmp" "$1" >>"$LOG" 2>&1 \
      && compgen -G "$tmp/*-none-any.whl" >/dev/null; then
    mv "$tmp"/*-none-any.whl "$DIR"/; rm -rf "$tmp"; return 0
  fi
  rm -rf "$tmp"; return 1
}

mapfile -t DEPS < <(grep -iv '^deepspeed==' <<<"$REQS")
DS_REQ=$(grep -i '^deepspeed==' <<<"$REQS" || true)
echo "wheelhouse: fetching ${#DEPS[@]} wheels for cp${PYV/./} ${PLATFORMS[0]} into $DIR (log: $LOG)" >&2
if ! "${DOWNLOAD[@]}" "${DEPS[@]}" >>"$LOG" 2>&1; then
  # Find which ones failed, one at a time, and build the pure-Python ones that only have an sdist.
  FAILED=()
  got=0
  for req in "${DEPS[@]}"; do
    if "${DOWNLOAD[@]}" "$req" >>"$LOG" 2>&1; then got=$((got + 1)); continue; fi
    if build_pure "$req"; then echo "wheelhouse: $req: no wheel on the index; built a py3-none-any one" >&2
    else FAILED+=("$req"); fi
    if [ $got -eq 0 ] && [ ${#FAILED[@]} -ge 3 ]; then
      tail -n 5 "$LOG" >&2
      die "the first ${#FAILED[@]} packages could not be fetched either: no network, or no package index? (log: $LOG)"
    fi
  done
  if [ ${#FAILED[@]} -gt 0 ]; then
    tail -n 20 "$LOG" >&2
    die "no wheel for cp${PYV/./}/${PLATFORMS[0]} (and no pure-Python build) of: ${FAILED[*]}. No network? This step needs the package index; see $LOG"
  fi
fi

if [ -n "$DS_REQ" ]; then
  # DeepSpeed publishes only an sdist. DS_BUILD_OPS=0 makes a py3-none-any wheel whose ops compile on
  # first use on the target (or set deepspeed.torch_adam: true so that no op is needed).
  echo "wheelhouse: building $DS_REQ (DS_BUILD_OPS=0)" >&2
  rm -f "$DIR"/deepspeed-*.whl
  DS_BUILD_OPS=0 "${PIP[@]}" wheel --no-deps -w "$DIR" "$DS_REQ" >>"$LOG" 2>&1 \
    || { tail -n 20 "$LOG" >&2; die "building $DS_REQ failed; see $LOG"; }
  compgen -G "$DIR/deepspeed-*-py3-none-any.whl" >/dev/null \
    || die "the DeepSpeed wheel is not py3-none-any: $(ls "$DIR"/deepspeed-*.whl); set DS_BUILD_OPS=0"
fi

if [ -n "$BENCH" ]; then
  # bench/ppo_throughput.py --peer-site: TRL 1.12.0, the last release with PPOTrainer, in a dir of its own so
  # that installing DIR/*.whl keeps the package's own trl. On the target:
  #   pip install --no-index --no-deps --target SITE DIR/bench/*.whl; ppo_throughput.py --peer-site SITE
  mkdir -p "$DIR/bench"
  "${PIP[@]}" download --no-deps --only-binary=:all: -d "$DIR/bench" trl==1.12.0 >>"$LOG" 2>&1 \
    || { tail -n 5 "$LOG" >&2; die "fetching trl==1.12.0 for --bench failed; see $LOG"; }
fi

echo "wheelhouse: building the package (rlhf) from $(pwd)" >&2
rm -f "$DIR"/rlhf-*.whl
"${PIP[@]}" wheel --no-deps -w "$DIR" . >>"$LOG" 2>&1 || { tail -n 20 "$LOG" >&2; die "building the package failed; see $LOG"; }

# One version per project: `pip install --no-deps DIR/*.whl` stops at two.
dups=$(for f in "$DIR"/*.whl; do b=${f##*/}; echo "${b%%-*}"; done | tr 'A-Z_.' 'a-z--' | sort | uniq -d)
[ -z "$dups" ] || die "$DIR holds more than one wheel of: $(echo "$dups" | tr '\n' ' ')- empty DIR and run again"
{ printf '%s\n' "$REQS"; echo "rlhf==$("$PY" -c 'import rlhf; print(rlhf.__version__)' 2>/dev/null || echo 0.1.0)"; } \
  > "$DIR/requirements.txt"
n=$(compgen -G "$DIR/*.whl" | wc -l)
echo "wheelhouse: $n wheels, $(du -sh "$DIR" | cut -f1) in $DIR (pins in $DIR/requirements.txt)" >&2
echo "wheelhouse: on the target: python3 -m pip install --no-index --find-links $DIR 'rlhf[deepspeed]'" >&2
