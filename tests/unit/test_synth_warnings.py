"""`rlhf data synth` says why it made less than asked: fewer training prompts than --n-prompts (a prompt
file's held-out share), no pair at all (samples from a model that never ends a reply), and a bad
--gold-judge is named as --gold-judge."""

from __future__ import annotations

import json
import logging

import pytest

from rlhf.cli import main
from rlhf.commands import synth
from rlhf.commands.synth import SynthSettings
from rlhf.config import config_from_dict


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(32)))
    return path


def test_more_prompts_than_the_file_trains_on_warns_why(prompts_file, caplog):
    cfg = config_from_dict({"data": {"eval_fraction": 0.2}})
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        train, held = synth.split_prompts(cfg, 0, str(prompts_file), 28, 3)
    assert (len(train), len(held)) == (26, 3)
    assert [r.getMessage() for r in caplog.records] == [
        f"--n-prompts 28: there are 26 training prompts ({prompts_file} holds 32, of which 6 are held out by "
        "data.eval_fraction 0.2); using those 26"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        synth.split_prompts(cfg, 0, None, 3, 101)  # the built-in prompts: 100 held out
    assert [r.getMessage() for r in caplog.records] == [
        "--n-eval-prompts 101: there are 100 held-out prompts (the built-in quickstart prompts); using those 100"]


def test_no_pairs_warns_that_the_model_never_finished(tiny_model_dir, prompts_file, tmp_path, caplog):
    cfg = config_from_dict({"run": {"output_dir": str(tmp_path / "runs")}, "model": {"name_or_path": str(tiny_model_dir)},
                            "data": {"max_prompt_length": 32}, "logging": {"progress": False}},
                           source="tiny.yaml")
    settings = SynthSettings(k=2, max_new_tokens=2, temperature=1.0, batch_size=16, seed=0)
    with caplog.at_level(logging.WARNING, logger="rlhf"):
        manifest = synth.run_synth(cfg, tmp_path / "out", settings=settings, prompts_file=str(prompts_file),
                                   n_prompts=4, n_eval_prompts=1)
    assert manifest["counts"]["preference"] == 0 and manifest["counts"]["finished_samples"] == 0
    assert [r.getMessage() for r in caplog.records] == [
        "synth: no preference pairs: none of the 8 samples ended with EOS within --max-new-tokens 2, and unfinished "
        f"ones are not used; the samples come from model.name_or_path ({tiny_model_dir}, tiny.yaml): set it to a "
        "model that answers (a random model such as tiny-random almost never ends a reply), or raise --max-new-tokens"]


def test_a_bad_gold_judge_is_named_as_gold_judge(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("run:\n  device: cpu\nlogging:\n  progress: false\n")
    for method in (["--method", "judge", "--judge-model", "m"], ["--method", "constitutional", "--principles", "p"]):
        code = main(["data", "synth", "--config", str(cfg), "--out", str(tmp_path / "o"), *method,
                     "--gold-judge", "no_such_judge_module:score"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err == ("error: --gold-judge no_such_judge_module:score: cannot import it (No module "
                                     "named 'no_such_judge_module')")
    code = main(["data", "synth", "--config", str(cfg), "--out", str(tmp_path / "o"), *method, "--gold-judge", "x"])
    assert code == 2 and capsys.readouterr().err.strip() == "error: --gold-judge x: expected module:function"
