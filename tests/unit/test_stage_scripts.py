"""Shell stages: valid bash, thin (<= 30 lines), strict mode, every config file they name exists, and the
launcher command lib.sh builds for every launch mode (checked by sourcing lib.sh, nothing is launched)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*ROOT.glob("stages/**/*.sh"), *ROOT.glob("stages/slurm/*.sbatch")])
STAGE_SCRIPTS = sorted([*ROOT.glob("stages/0*.sh"), ROOT / "stages" / "pipeline.sh"])
# A path under configs/ wherever it stands: a default (`CONFIG=${CONFIG:-configs/x.yaml}`), an argument, a comment.
CONFIG_REF = re.compile(r"configs/[\w./-]*?\.(?:ya?ml|json)\b")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", STAGE_SCRIPTS, ids=lambda p: p.name)
def test_stage_scripts_are_thin_and_strict(script):
    text = script.read_text()
    assert len(text.splitlines()) <= 30, f"{script.name}: more than 30 lines"
    assert "set -euo pipefail" in text and "source stages/lib.sh" in text


def missing_configs(files: list[Path], root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The config paths each file names (files naming none left out), and those that are not files under `root`."""
    named = {str(f.relative_to(root)): refs for f in files if (refs := CONFIG_REF.findall(f.read_text()))}
    return named, [f"{name}: {ref}" for name, refs in named.items() for ref in refs if not (root / ref).is_file()]


def test_stage_scripts_point_at_existing_configs():
    files = sorted(p for p in (ROOT / "stages").rglob("*") if p.suffix in (".sh", ".sbatch", ".md"))
    named, missing = missing_configs(files, ROOT)
    # the forms in use: quickstart.sh's default, the Slurm script's examples, the README's commands
    assert {"stages/quickstart.sh", "stages/slurm/stage.sbatch", "stages/README.md"} <= set(named), named
    assert not missing, "stages/ names config files that do not exist:\n" + "\n".join(missing)


def test_config_check_reports_a_missing_file(tmp_path):
    (tmp_path / "configs" / "deepspeed").mkdir(parents=True)
    for name in ("a.yaml", "deepspeed/z.json"):
        (tmp_path / "configs" / name).write_text("")
    script = tmp_path / "s.sh"
    script.write_text('CONFIG=${CONFIG:-configs/a.yaml}\n# default configs/gone.yml)\n'
                      'bash stages/pipeline.sh "configs/b.yaml" --set deepspeed.config_file=configs/deepspeed/z.json\n')
    named, missing = missing_configs([script], tmp_path)
    assert named == {"s.sh": ["configs/a.yaml", "configs/gone.yml", "configs/b.yaml", "configs/deepspeed/z.json"]}
    assert missing == ["s.sh: configs/gone.yml", "s.sh: configs/b.yaml"]


def test_slurm_script_starts_every_node_in_no_ssh_mode():
    text = (ROOT / "stages/slurm/stage.sbatch").read_text()
    assert "srun" in text and "NODE_RANK=$SLURM_NODEID" in text
    for var in ("NNODES", "MASTER_ADDR", "MASTER_PORT", "NUM_GPUS"):
        assert f"export {var}" in text or var in text.split("export", 1)[1]


def _launch(env: dict[str, str]) -> list[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("NUM_GPUS", "NNODES", "NODE_RANK", "HOSTFILE", "LAUNCHER", "MASTER_ADDR", "MASTER_PORT",
                          "DRY_RUN")}
    cmd = 'source stages/lib.sh && rlhf_launcher && printf "%s\\n" "${LAUNCH[@]}"'
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env={**clean, "PY": "py", **env},
                          capture_output=True, text=True, check=True)
    return proc.stdout.split()


def test_launch_modes(tmp_path):
    assert _launch({}) == ["py", "-m", "rlhf.cli"]
    cmd = _launch({"NUM_GPUS": "2"})
    assert cmd[:3] == ["py", "-m", "deepspeed.launcher.runner"] and cmd[cmd.index("--num_gpus") + 1] == "2"
    cmd = _launch({"HOSTFILE": "hosts", "NUM_GPUS": "8", "MASTER_ADDR": "10.0.0.1", "TMPDIR": str(tmp_path)})
    assert cmd[cmd.index("--hostfile") + 1] == "hosts" and "--no_ssh" not in cmd and "--num_gpus" in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1"  # never DeepSpeed's guess (stages/README.md)
    # this launch's DeepSpeed environment file (tests/unit/test_stage_launch.py checks what it forwards)
    assert cmd[:2] == ["env", f"DS_ENV_FILE={next(tmp_path.glob('rlhf-deepspeed-env.*'))}"]
    cmd = _launch({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert "--no_ssh" in cmd and cmd[cmd.index("--node_rank") + 1] == "1"
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.1" and cmd[cmd.index("--master_port") + 1] == "1234"
    hostfile = Path(cmd[cmd.index("--hostfile") + 1])  # the world layout --no_ssh reads
    assert hostfile.read_text().splitlines() == ["node0 slots=1", "node1 slots=1"]
    hostfile.unlink()
    cmd = _launch({"LAUNCHER": "torchrun", "NUM_GPUS": "4", "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h"})
    assert cmd[:3] == ["py", "-m", "torch.distributed.run"] and cmd[cmd.index("--nnodes") + 1] == "2"
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and cmd[-2:] == ["-m", "rlhf.cli"]


def test_logs_go_to_the_run_dir(tmp_path):
    import sys

    cmd = 'source stages/lib.sh && rlhf_log_dir --config configs/tiny.yaml --set "run.output_dir=$OUT" --set run.name=x'
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path)}
    env.pop("LOG_DIR", None)
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / "x" / "logs")


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_omp_threads_sleep_by_default_without_a_gpu(given, expected, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PATH"] = f"{tmp_path}:/usr/bin:/bin"  # no nvidia-smi on it
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run(["bash", "-c", 'source stages/lib.sh && echo "$OMP_WAIT_POLICY"'], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == expected


@pytest.mark.parametrize(("given", "expected"), [
    ({}, "|"),
    ({"NET_IFNAME": "eth1"}, "eth1|eth1"),
    ({"NET_IFNAME": "eth1", "NCCL_SOCKET_IFNAME": "ib0"}, "eth1|ib0"),  # a variable set by the caller wins
    ({"GLOO_SOCKET_IFNAME": "lo"}, "lo|"),
])
def test_one_network_interface_knob_for_gloo_and_nccl(given, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("NET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    # a child process (the launcher and its ranks) must see them: exported, not just set
    cmd = """source stages/lib.sh && bash -c 'echo "${GLOO_SOCKET_IFNAME:-}|${NCCL_SOCKET_IFNAME:-}"'"""
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env={**env, **given}, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == expected


def test_network_interface_knob_is_documented_where_multi_node_runs_start():
    for doc in ("stages/README.md", "stages/slurm/stage.sbatch", "docker/README.md"):
        text = (ROOT / doc).read_text()
        assert "NET_IFNAME" in text, doc
    readme = (ROOT / "stages/README.md").read_text()
    assert "GLOO_SOCKET_IFNAME" in readme and "NCCL_SOCKET_IFNAME" in readme
    assert "RLHF_COLLECTIVES_ALWAYS" in readme
