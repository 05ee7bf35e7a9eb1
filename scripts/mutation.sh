#!/usr/bin/env bash
# Mutation testing of the pure maths modules (docs/TESTING.md), outside the test suite.
# mutmut changes one thing at a time in a module (an operator, a constant, an argument) and runs that
# module's unit tests against each change; a change that no test notices "survives". This prints the
# survivors (module, line, change) and a count per module, and exits 1 when one survives that is not in
# ALLOWED below. About a minute per module on 2 cores. Nothing is written to the repository: mutmut,
# its config and its mutants/ folder live in a temporary copy (KEEP=1 keeps it, for `mutmut browse`).
#   bash scripts/mutation.sh              # every module in MODULES
#   bash scripts/mutation.sh losses       # only the modules named
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# module under src/rlhf/ : the unit test files that must notice every change to it (comma-separated)
MODULES=(
  "ppo_math:tests/unit/test_ppo_math.py,tests/unit/test_advantage_estimators.py"
  "losses:tests/unit/test_losses.py"
)

# Tests that a @torch.no_grad() function returns no graph: the copy mutmut runs drops those decorators.
NO_GRAD_TESTS=(
  "tests/unit/test_advantage_estimators.py::test_estimators_send_no_gradient"
)

# Equivalent mutants: changes that no caller can observe. "module.function || text in the mutated line
# || why it changes nothing". An entry covers only mutants of that function whose new line holds that text.
ALLOWED=(
  "ppo_math.response_mask || isinstance(eos_token_id, int)) or True || torch.isin flattens its test elements: [[2, 3]] holds the ids of [2, 3]"
  "ppo_math.response_mask || full_like(first_eos, length + 1) || positions stop at length - 1, so any end >= length - 1 counts the whole row"
  "ppo_math.masked_whiten || masked_var(x, mask, ) || unbiased=True is masked_var's default"
  "ppo_math.masked_whiten || mask.to(None), x.to(torch.float64) || x * m is float64 through x; a binary mask's count is exact in its own dtype"
  "ppo_math.masked_whiten || mask.to(torch.float64), x.to(None) || x * m is float64 through m; only (x - mean)^2 rounds to x's dtype first (an ulp)"
  "ppo_math.masked_whiten || mean64.to(None) || a 0-dim float64 mean does not promote x: x - mean runs in x's dtype either way"
  "ppo_math.masked_whiten || .clamp_min(1.0)).to(None) || var stays float64 one op longer: rsqrt(var + eps) rounds once, not twice (an ulp)"
  "ppo_math.masked_whiten || torch.zeros((), dtype=None, || a 0-dim zero does not promote whitened in torch.where: its dtype wins"
  "ppo_math.masked_whiten || torch.zeros((), device=x.device) || a 0-dim zero does not promote whitened in torch.where: its dtype wins"
  "losses.masked_sum || (dim is None) and False || sum(dim=None) is the sum over every entry"
  "losses.masked_mean || (dim is None) and False || sum(dim=None) is the sum over every entry"
  "losses.logprobs_from_logits || gather(+1, || a row of logits is [T, V]: dim 1 is dim -1"
  "losses.logprobs_from_logits || unsqueeze(+1) || a row of labels is [T]: dim 1 of the result is dim -1"
  "losses.logprobs_from_logits || squeeze(+1) || the gathered row is [T, 1]: dim 1 is dim -1"
  "losses.logprobs_from_logits || logsumexp(row_logits, dim=+1) || a row of logits is [T, V]: dim 1 is dim -1"
  "losses.entropy_from_logits || softmax(row_logits, dim=+1) || a row of logits is [T, V]: dim 1 is dim -1"
  "losses.entropy_from_logits || logsumexp(row_logits, dim=+1) || a row of logits is [T, V]: dim 1 is dim -1"
  "losses.entropy_from_logits || .sum(dim=+1) || a row of logits is [T, V]: dim 1 is dim -1"
  "losses._log_odds || logp >= -0.69 || at logp = -log 2 both branches give log(1/2)"
  "losses._log_odds || clamp_min(-1.69 || the clamp keeps the unused branch finite, which -1.69 does too"
)

# Pinned so that a rerun makes the same mutants: the set of mutation operators changes between releases.
MUTMUT_VERSION=3.8.1
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || { echo "no $PY: run bash scripts/setup.sh first" >&2; exit 2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/rlhf-mutation.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "[mutation] work dir kept: $WORK" >&2; else trap 'rm -rf "$WORK"' EXIT; fi

# mutmut goes into a throwaway folder, never into .venv; its dependencies are held to the versions
# .venv already has (pytest included), so the copies it brings are the same code.
"$PY" -m pip list --format=freeze --exclude-editable 2>/dev/null > "$WORK/constraints.txt"
"$PY" -m pip install --quiet --disable-pip-version-check --target "$WORK/site" \
  -c "$WORK/constraints.txt" "mutmut==$MUTMUT_VERSION" 2>&1 | grep -v "^WARNING: Location" >&2 || true
[ -f "$WORK/site/mutmut/__init__.py" ] || { echo "could not install mutmut==$MUTMUT_VERSION" >&2; exit 2; }
printf '%s\n' "${ALLOWED[@]}" > "$WORK/allowed.txt"

# A fork per mutant on every core: one torch thread per process, no oversubscription.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH="$WORK/site" PYTHONDONTWRITEBYTECODE=1

status=0
for entry in "${MODULES[@]}"; do
  module=${entry%%:*}
  IFS=, read -r -a tests <<< "${entry#*:}"
  if [ $# -gt 0 ] && [[ " $* " != *" $module "* ]]; then continue; fi

  # A copy of what the tests need. mutmut's config goes in the copy's setup.cfg: the copied
  # pyproject.toml (pytest's settings) has no [tool.mutmut], so mutmut reads setup.cfg.
  copy=$WORK/$module
  mkdir -p "$copy/src" "$copy/tests"
  cp -r src/rlhf "$copy/src/"
  find "$copy/src" -name __pycache__ -prune -exec rm -rf {} +
  # mutmut leaves decorated functions alone. @torch.no_grad() changes no value, so the copy drops it and
  # those functions (GAE, the group estimators, ...) are mutated like the rest; the tests of the decorator
  # itself (NO_GRAD_TESTS) are left out of the run.
  sed -i '/^@torch\.no_grad()$/d' "$copy/src/rlhf/$module.py"
  cp pyproject.toml "$copy/"
  cp tests/conftest.py "$copy/tests/"
  mkdir -p "$copy/tests/unit" && cp tests/unit/deviceless.py "$copy/tests/unit/"
  for test in "${tests[@]}"; do mkdir -p "$copy/$(dirname "$test")"; cp "$test" "$copy/$test"; done
  {
    echo "[mutmut]"
    echo "source_paths = src"
    echo "only_mutate = src/rlhf/$module.py"
    echo "pytest_add_cli_args_test_selection ="
    printf '    %s\n' "${tests[@]}"
    deselect=()
    for test in "${NO_GRAD_TESTS[@]}"; do
      if [ -f "$copy/${test%%::*}" ]; then deselect+=(--deselect "$test"); fi
    done
    if [ ${#deselect[@]} -gt 0 ]; then echo "pytest_add_cli_args ="; printf '    %s\n' "${deselect[@]}"; fi
  } > "$copy/setup.cfg"

  echo "[mutation] $module against ${tests[*]}" >&2
  start=$SECONDS
  if ! (cd "$copy" && "$PY" -c "from mutmut.__main__ import cli; cli()" run --max-children "$(nproc)" \
        > run.log 2>&1); then
    tr '\r' '\n' < "$copy/run.log" | grep -v "^⠋\|^⠙\|^⠹\|^⠸\|^⠼\|^⠴\|^⠦\|^⠧\|^⠇\|^⠏" | tail -40 >&2
    echo "[mutation] $module: mutmut failed" >&2
    status=1
    continue
  fi
  (cd "$copy" && "$PY" - "$module" "$ROOT/src/rlhf/$module.py" "$WORK/allowed.txt" "$((SECONDS - start))") \
    <<'EOF' || status=1
"""Report one module's mutants: each one not killed, with its line and change; exit 1 if one is not allowed."""
import ast
import re
import subprocess
import sys

module, source_path, allowed_path, seconds = sys.argv[1:]
mutmut = [sys.executable, "-c", "from mutmut.__main__ import cli; cli()"]
NOTICED = {"killed", "timeout", "caught by type check"}  # a mutant that hangs is noticed too

allowed = []  # (module.function, text in the mutated line, reason)
for line in open(allowed_path, encoding="utf-8"):
    if line.startswith(module + "."):
        allowed.append(tuple(part.strip() for part in line.split("||")))
used = set()

# function or method -> (first line, last line) in the repository's own file
source = open(source_path, encoding="utf-8").read().splitlines()
spans = {}
for node in ast.parse("\n".join(source)).body:
    members = [(node.name + ".", child) for child in node.body] if isinstance(node, ast.ClassDef) else [("", node)]
    for prefix, fn in members:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            spans[prefix + fn.name] = (min([fn.lineno] + [d.lineno for d in fn.decorator_list]), fn.end_lineno)


def line_of(function, text, offset):
    """The line of `text` in `function`. mutmut's diff counts lines from the comment block above the
    def, if any, so its offset only picks the nearest of several equal lines."""
    first, last = spans.get(function, (1, len(source)))
    guess = first + offset - 1
    found = [n for n in range(first, last + 1) if source[n - 1].strip() == text] or [guess]
    return min(found, key=lambda n: abs(n - guess))


def number(name):
    return int(name.rsplit("_", 1)[1])


results = subprocess.run(mutmut + ["results", "--all", "true"], capture_output=True, text=True, check=True).stdout
statuses = dict(re.findall(r"^\s+(\S+__mutmut_\d+): (.+)$", results, flags=re.MULTILINE))
alive, equivalent = [], []
for name, status in statuses.items():
    if status in NOTICED:
        continue
    # rlhf.losses.x_masked_var__mutmut_3, rlhf.ppo_math.xǁAdaptiveKLControllerǁupdate__mutmut_2
    mangled = name.split(".")[-1].rsplit("__mutmut_", 1)[0]
    function = mangled[2:] if mangled.startswith("x_") else ".".join(mangled.split("ǁ")[1:])
    diff = subprocess.run(mutmut + ["show", name], capture_output=True, text=True, check=True).stdout
    removed, added, lineno, orig = [], [], None, 0
    for row in diff.splitlines():
        if row.startswith("@@"):
            orig = int(re.match(r"@@ -(\d+)", row).group(1)) - 1
        elif row.startswith("-") and not row.startswith("---"):
            orig += 1
            removed.append(row[1:].strip())
            lineno = lineno or line_of(function, row[1:].strip(), orig)
        elif row.startswith("+") and not row.startswith("+++"):
            added.append(row[1:].strip())
        elif row.startswith(" "):
            orig += 1
    reasons = [entry for entry in allowed if entry[0] == f"{module}.{function}" and entry[1] in " / ".join(added)]
    used.update(reasons)
    mutant = (lineno or 0, number(name), function, name, status, removed, added)
    (equivalent if reasons else alive).append((mutant, reasons[0][2] if reasons else ""))

for lineno, _, function, name, status, removed, added in (m for m, _ in sorted(alive)):
    print(f"{module}.py:{lineno} {function} [{status}] {name}")
    print("\n".join([f"    - {text}" for text in removed] + [f"    + {text}" for text in added]))
for (lineno, _, function, name, _, _, added), reason in sorted(equivalent):
    print(f"{module}.py:{lineno} {function} [equivalent] {' / '.join(added)}\n    ({reason})")
for entry in sorted(set(allowed) - used):
    print(f"note: allow-list entry matched no surviving mutant (remove it?): {' || '.join(entry)}")
print(
    f"== {module}: {len(statuses)} mutants, {len(alive)} not killed, "
    f"{len(equivalent)} allowed as equivalent ({seconds} s)"
)
sys.exit(1 if alive else 0)
EOF
done
exit $status
