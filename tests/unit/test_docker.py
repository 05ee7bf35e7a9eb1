"""docker/Dockerfile cannot be built here; check what it promises: the package installed with its own
dependency set (pyproject.toml + the gpu extra) under requirements/constraints.txt, torch pinned to the
CUDA base image, DeepSpeed's ops prebuilt, a non-root user and a stage-script entry point."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pip_installs() -> list[str]:
    """The argument lists of every `pip install` in a RUN instruction (line continuations joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [m.group(1) for m in re.finditer(r"pip install ([^&\n]+)", text)]


def test_installs_the_pyproject_dependency_set_with_the_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]}
    installs = _pip_installs()
    assert installs and all("-c requirements/constraints.txt" in args for args in installs)
    assert any('".[gpu,trackers,serve]"' in args for args in installs), \
        "the project itself, with the gpu, trackers and serve extras"
    named = {_name(tok) for args in installs for tok in re.findall(r"(?<![-\w/.])([A-Za-z][\w.-]*)(?=\s|$)", args)}
    assert named <= wanted, f"installs packages outside pyproject: {named - wanted}"
    pins = {_name(line): line.split("==")[1].strip() for line in (ROOT / "requirements/constraints.txt").read_text()
            .splitlines() if "==" in line and not line.startswith("#")}
    for pkg in ("deepspeed", "transformers", "trl", "accelerate", "peft", "datasets"):
        assert pkg in wanted and pkg in pins, pkg


def test_torch_is_the_base_image_build_and_deepspeed_ops_are_built():
    version = re.search(r"ARG TORCH_VERSION=(\S+)", DOCKERFILE).group(1)
    assert re.search(r"FROM pytorch/pytorch:\$\{TORCH_VERSION\}-cuda[\d.]+-cudnn\d+-devel", DOCKERFILE)
    assert 'echo "torch==${TORCH_VERSION}"' in DOCKERFILE
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert f"TORCH_VERSION:-{version}" in setup, "same torch as the CPU setup"
    assert "DS_BUILD_FUSED_ADAM=1" in DOCKERFILE and "DS_BUILD_CPU_ADAM=1" in DOCKERFILE
    assert "--no-build-isolation" in DOCKERFILE


def test_non_root_user_and_stage_entry_point():
    users = re.findall(r"^USER (\S+)", DOCKERFILE, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    entry = re.search(r"^ENTRYPOINT (.+)$", DOCKERFILE, flags=re.M).group(1)
    assert "stages/$0.sh" in entry
    cmd = re.search(r'^CMD \["(\w+)", "([^"]+)"\]', DOCKERFILE, flags=re.M)
    assert (ROOT / "stages" / f"{cmd.group(1)}.sh").is_file() and (ROOT / cmd.group(2)).is_file()
    for path in re.findall(r"^COPY (\S+)", DOCKERFILE, flags=re.M):
        assert (ROOT / path.rstrip("/")).exists(), path
