"""Every command that loads a model outside training (eval, data synth with each method, chat, score) takes
the run's device by the one rule, and refuses `cuda` on a machine without CUDA in one line (exit 2) before
it loads anything: the model names below do not exist, so reaching a loader would fail otherwise."""

from __future__ import annotations

import pytest
import torch

from rlhf import engine
from rlhf.cli import main
from rlhf.errors import ConfigError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no CUDA GPU")
NO_CUDA = "is cuda but torch sees no CUDA GPU"


@pytest.fixture
def cuda_cfg(tmp_path):
    cfg = tmp_path / "cuda.yaml"
    cfg.write_text(f"run:\n  device: cuda\n  output_dir: {tmp_path / 'runs'}\nmodel:\n"
                   f"  name_or_path: {tmp_path / 'no-model'}\nlogging:\n  progress: false\n")
    return cfg


COMMANDS = {
    "eval": ["eval", "--config", "{cfg}"],
    "synth-program": ["data", "synth", "--config", "{cfg}", "--out", "{tmp}/o"],
    "synth-judge": ["data", "synth", "--config", "{cfg}", "--out", "{tmp}/o", "--method", "judge",
                    "--judge-model", "{tmp}/no-judge"],
    "synth-constitutional": ["data", "synth", "--config", "{cfg}", "--out", "{tmp}/o", "--method", "constitutional",
                             "--principles", "{tmp}/no-principles.yaml"],
    "chat": ["chat", "--model", "{tmp}/no-model", "--device", "cuda", "--prompt", "hi"],
    "score": ["score", "--model", "{tmp}/no-model", "--data", "{tmp}/no-data.jsonl", "--device", "cuda"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cuda_without_cuda_is_refused_in_one_line_before_loading(command, cuda_cfg, tmp_path, capsys):
    args = [a.format(cfg=cuda_cfg, tmp=tmp_path) for a in COMMANDS[command]]
    code = main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2
    assert len(errors) == 1 and NO_CUDA in errors[0], errors
    where = "--device" if "--device" in args else f"{cuda_cfg}: run.device"
    assert errors[0].startswith(f"error: {where} {NO_CUDA}")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()  # nothing written either


def test_usable_device_keeps_the_one_rule_for_auto_and_cpu():
    assert engine.usable_device("auto") == engine.device("auto") == torch.device("cpu")
    assert engine.usable_device("cpu", "--device") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^cfg.yaml: run.device is cuda .*; .*or set run.device: auto$"):
        engine.usable_device("cuda", source="cfg.yaml")
