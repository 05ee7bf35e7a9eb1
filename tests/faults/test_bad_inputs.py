"""Bad input never starts training: every file of tests/data/bad/, bad configs and bad model dirs give exit 2
and one `error:` line naming the file and row (or the key, or the dir), and no checkpoint dir is created.
BOM and CRLF files are fine. Loading is safe: no pickle unless opted in, no model-repo code unless opted in,
no YAML tags that construct Python objects.

The CLI runs in this process (`rlhf.cli.main`), which is the same code path as the `rlhf` command minus the
interpreter start-up; tests that need a separate process live in test_kill_resume.py and test_disk_full.py.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
from faultkit import BAD, ROOT, cfg_of, error_lines, tiny_raw, write_cfg

from rlhf import cli

pytestmark = pytest.mark.slow

# file -> (line named for `rlhf sft`, line named for `rlhf reward`); None: the message names the file alone.
CORPUS = {
    "truncated.jsonl": (3, 3),  # cut off mid-string on its last line
    "array.jsonl": (1, 1),  # a JSON array saved as .jsonl
    "non_utf8.jsonl": (2, 2),  # a Latin-1 byte
    "null_field.jsonl": (2, 2),
    "empty_field.jsonl": (3, 3),  # whitespace only
    "same_pair.jsonl": (2, 2),  # chosen == rejected (refused for SFT too: the file is a preference set)
    "wrong_type.jsonl": (2, 2),  # chosen is a number
    "missing_field.jsonl": (2, 2),
    "not_object.jsonl": (2, 2),  # a bare number as a row
    "unknown_role.jsonl": (2, None),  # chat rows: SFT names the bad role; reward needs pairs at all
    "empty.jsonl": (None, None),
}


def _raw(tmp_path: Path, stage: str, data_file: Path, tiny_model_dir: Path) -> dict:
    raw = tiny_raw(tmp_path, final_stage=None)
    raw["data"]["sft" if stage == "sft" else "preference"] = str(data_file)
    raw["reward"]["base_model"] = str(tiny_model_dir)
    for section in ("sft", "reward"):
        raw[section].update({"max_steps": 2, "save_steps": 2})
    return raw


def _run(args: list[str], capsys) -> tuple[int, list[str], str]:
    code = cli.main(args)
    err = capsys.readouterr().err
    return code, error_lines(err), err


def _assert_refused(code: int, lines: list[str], *needles: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines  # one line, no traceback
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("stage", ["sft", "reward"])
@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_data_file_is_refused_before_training(name, stage, tmp_path, rlhf_cache, tiny_model_dir, capsys):
    raw = _raw(tmp_path, stage, BAD / name, tiny_model_dir)
    config = write_cfg(tmp_path / "cfg.yaml", raw)
    code, lines, _ = _run([stage, "--config", str(config)], capsys)
    line = CORPUS[name][0 if stage == "sft" else 1]
    _assert_refused(code, lines, f"{BAD / name}:{line}: " if line else f"{BAD / name}: ")
    assert not cfg_of(raw).stage_dir(stage).exists()  # nothing was started: no stage dir, no checkpoints


@pytest.mark.parametrize(("stage", "name"), [("sft", "bom.jsonl"), ("reward", "crlf.jsonl")])
def test_bom_and_crlf_files_train(stage, name, tmp_path, rlhf_cache, tiny_model_dir, capsys):
    raw = _raw(tmp_path, stage, BAD / name, tiny_model_dir)
    code, lines, err = _run([stage, "--config", str(write_cfg(tmp_path / "cfg.yaml", raw))], capsys)
    assert code == 0 and not lines, err[-2000:]
    assert json.loads((cfg_of(raw).stage_dir(stage) / "stage.json").read_text())["global_step"] == 2


def _long_rows_file(path: Path) -> Path:
    rows = [{"prompt": f"Question {i}?", "completion": f"A short answer {i}."} for i in range(6)]
    rows.insert(3, {"prompt": "Tell me everything. " * 100, "completion": "Everything."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_rows_longer_than_max_length_are_left_out_and_counted(tmp_path, rlhf_cache, tiny_model_dir, capsys,
                                                              caplog):
    data = _long_rows_file(tmp_path / "long.jsonl")
    raw = _raw(tmp_path, "sft", data, tiny_model_dir)
    raw["data"]["eval_fraction"] = 0.0
    caplog.set_level(logging.WARNING, logger="rlhf")
    code, lines, err = _run(["sft", "--config", str(write_cfg(tmp_path / "cfg.yaml", raw))], capsys)
    assert code == 0 and not lines, err[-2000:]
    assert f"{data}: 1 of 7 rows are longer than data.max_length=128 tokens and were left out" in caplog.text
    manifest = json.loads((cfg_of(raw).stage_dir("sft") / "stage.json").read_text())
    assert manifest["metrics"]["train_rows"] == 6


def test_all_rows_longer_than_max_length_is_an_error(tmp_path, rlhf_cache, tiny_model_dir, capsys):
    raw = _raw(tmp_path, "reward", ROOT / "data" / "tiny" / "preference.jsonl", tiny_model_dir)
    raw["data"].update({"max_length": 8, "max_prompt_length": 4})
    code, lines, _ = _run(["reward", "--config", str(write_cfg(tmp_path / "cfg.yaml", raw))], capsys)
    _assert_refused(code, lines, f"{raw['data']['preference']}: all ", "pairs are longer than data.max_length=8")
    assert not (cfg_of(raw).stage_dir("reward") / "checkpoints").exists()


@pytest.mark.parametrize(("name", "needle"), [
    ("config_unknown_key.yaml", "unknown key 'sft.lerning_rate' (did you mean 'sft.learning_rate'?)"),
    ("config_wrong_type.yaml", "sft.max_steps: expected int, got str 'ten'"),
    ("config_python_tag.yaml", ":4: not valid YAML (could not determine a constructor for the tag "
                               "'tag:yaml.org,2002:python/object/apply:os.system')"),
])
def test_bad_config_is_refused_at_load(name, needle, capsys):
    marker = Path("/tmp/rlhf-yaml-tag-was-executed")
    marker.unlink(missing_ok=True)
    code, lines, _ = _run(["sft", "--config", str(BAD / name)], capsys)
    _assert_refused(code, lines, f"error: {BAD / name}", needle)
    assert not marker.exists()  # the tag was never constructed, so os.system never ran


def test_unwritable_output_dir_is_refused(tmp_path, rlhf_cache, tiny_model_dir, capsys):
    raw = _raw(tmp_path, "sft", ROOT / "data" / "tiny" / "sft.jsonl", tiny_model_dir)
    (tmp_path / "a_file").write_text("not a dir")
    raw["run"]["output_dir"] = str(tmp_path / "a_file" / "runs")  # even root cannot create a dir under a file
    code, lines, _ = _run(["sft", "--config", str(write_cfg(tmp_path / "cfg.yaml", raw))], capsys)
    _assert_refused(code, lines, "blocked: [output.unwritable]", "set run.output_dir to a writable place")


# ------------------------------------------------------------------------------------------ model dirs


def _sft_with_model(tmp_path: Path, model_dir: Path, capsys) -> tuple[int, list[str], dict]:
    raw = _raw(tmp_path, "sft", ROOT / "data" / "tiny" / "sft.jsonl", model_dir)
    raw["model"]["name_or_path"] = str(model_dir)
    code, lines, _ = _run(["sft", "--config", str(write_cfg(tmp_path / "cfg.yaml", raw))], capsys)
    return code, lines, raw


def test_model_dir_without_weights(tmp_path, rlhf_cache, tiny_model_dir, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "no_weights", ignore=shutil.ignore_patterns("*.safetensors"))
    code, lines, raw = _sft_with_model(tmp_path, model, capsys)
    _assert_refused(code, lines, f"model.name_or_path: {model}: no model weights (*.safetensors) found")
    assert not cfg_of(raw).stage_dir("sft").exists()


def test_reward_dir_given_as_policy(tmp_path, rlhf_cache, tiny_reward_dir, capsys):
    code, lines, raw = _sft_with_model(tmp_path, tiny_reward_dir, capsys)
    _assert_refused(code, lines, f"{tiny_reward_dir}: is a sequence-classification (reward) model, not a causal LM")
    assert not (cfg_of(raw).stage_dir("sft") / "checkpoints").exists()


class _Payload:
    """Unpickling this calls `Path(marker).touch()`: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_weights_are_refused_without_opt_in(tmp_path, rlhf_cache, tiny_model_dir, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "unpickled"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    code, lines, _ = _sft_with_model(tmp_path, model, capsys)
    _assert_refused(code, lines, f"{model}: weights are pickle files (pytorch_model.bin)",
                    "set model.allow_pickle: true")
    assert not marker.exists()


def test_repo_code_is_not_run_without_trust_remote_code(tmp_path, rlhf_cache, tiny_model_dir, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "custom")
    marker = tmp_path / "imported"
    config = json.loads((model / "config.json").read_text())
    config.update({"model_type": "custom_llama", "architectures": ["CustomModel"],
                   "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    code, lines, raw = _sft_with_model(tmp_path, model, capsys)
    _assert_refused(code, lines, f"{model}: the model needs the Python code shipped with it (auto_map)",
                    "set model.trust_remote_code: true")
    assert not marker.exists()
    assert not (cfg_of(raw).stage_dir("sft") / "checkpoints").exists()
