"""`rlhf export` refusals that say what the dir is: a stage's final/ (already a plain model dir), a stage
dir, a checkpoint that the running stage's rotation removed, before or during the export, and the critic
of a critic-free PPO run, which trained none. No model is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlhf import artifacts
from rlhf.cli import main
from rlhf.commands import export
from rlhf.config import load_config, save_resolved
from rlhf.errors import ArtifactError

ROOT = Path(__file__).resolve().parents[2]


def _checkpoint(stage_dir, step: int, complete: bool = True):
    ckpt = stage_dir / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    if complete:
        artifacts.mark_checkpoint_complete(ckpt, step)
    return ckpt


def test_a_final_dir_or_stage_dir_is_named_as_such(tmp_path, capsys):
    stage_dir = tmp_path / "run" / "ppo"
    (stage_dir / "final").mkdir(parents=True)
    (stage_dir / "final" / "config.json").write_text("{}")
    artifacts.write_manifest(stage_dir, "ppo", inputs={}, config_hash="t", metrics={})
    code = main(["export", "--checkpoint", str(stage_dir / "final"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"error: {stage_dir / 'final'}: already a plain HF model dir, which needs no "
                                 "export: use it as it is, or copy it; to export a checkpoint, point to "
                                 "<run>/<stage>/checkpoints/checkpoint-<step>")
    with pytest.raises(ArtifactError, match=r"ppo: a stage dir, not a checkpoint; its final/ is already a plain"):
        export.find_checkpoint(stage_dir)


def test_an_older_incomplete_checkpoint_is_reported_as_rotated_away(tmp_path):
    stage_dir = tmp_path / "run" / "sft"
    old = _checkpoint(stage_dir, 2, complete=False)  # its marker is gone: removal under way
    newest = _checkpoint(stage_dir, 4)
    with pytest.raises(ArtifactError) as err:
        export.find_checkpoint(old)
    assert str(err.value) == (f"{old}: incomplete because it is being removed: the stage keeps only its last "
                              f"checkpoints and rotated this one away; export the newest, {newest}")
    shutil.rmtree(newest)  # a newest one that never completed: the run stopped while saving it
    newest = _checkpoint(stage_dir, 6, complete=False)
    with pytest.raises(ArtifactError, match="the run stopped while saving it"):
        export.find_checkpoint(newest)


def test_a_checkpoint_removed_while_it_is_read_is_reported_as_rotated_away(tmp_path, monkeypatch):
    stage_dir = tmp_path / "run" / "sft"
    ckpt = _checkpoint(stage_dir, 2)
    newest = _checkpoint(stage_dir, 4)

    def rotated_while_loading(found, cfg):
        shutil.rmtree(found.path)  # what the running stage's rotation does meanwhile
        raise ArtifactError(f"{found.path}: no weights; the checkpoint is incomplete")

    monkeypatch.setattr(export, "load_trainer", rotated_while_loading)
    with pytest.raises(ArtifactError) as err:
        export.export(ckpt, tmp_path / "out")
    assert str(err.value) == (f"{ckpt}: removed while it was being exported: the running stage keeps only its last "
                              f"checkpoints and rotated this one away; export the newest, {newest}, or copy a "
                              "checkpoint aside and export the copy")

    def damaged(found, cfg):  # files still there: the error is the loader's own
        raise ArtifactError("damaged")

    monkeypatch.setattr(export, "load_trainer", damaged)
    with pytest.raises(ArtifactError, match="^damaged$"):
        export.export(newest, tmp_path / "out")


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_the_critic_of_a_critic_free_run_is_refused_naming_its_estimator(tmp_path, capsys, advantage):
    # what a critic-free PPO run leaves: config.resolved.yaml, and checkpoints with actor/ but no critic/
    stage_dir = tmp_path / "run" / "ppo"
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"ppo.advantage={advantage}", "ppo.samples_per_prompt=4"])
    save_resolved(cfg, stage_dir / "config.resolved.yaml")
    ckpt = stage_dir / "checkpoints" / "checkpoint-2"
    (ckpt / "actor").mkdir(parents=True)
    artifacts.mark_checkpoint_complete(ckpt, 2)
    expected = (f"error: {ckpt}: no critic to export: the run trained none (ppo.advantage: {advantage}); "
                "--role actor exports the policy")
    for args in (["--checkpoint", str(ckpt), "--role", "critic"], ["--checkpoint", str(ckpt / "critic")]):
        code = main(["export", *args, "--out", str(tmp_path / "out")])
        assert (code, capsys.readouterr().err.strip()) == (2, expected)
    assert not (tmp_path / "out").exists()


def test_the_critic_of_a_gae_run_is_not_refused_as_critic_free(tmp_path, capsys):
    # the same layout under GAE gets past that check, to the stage inputs the critic is rebuilt from
    stage_dir = tmp_path / "run" / "ppo"
    save_resolved(load_config(ROOT / "configs/tiny.yaml"), stage_dir / "config.resolved.yaml")
    ckpt = stage_dir / "checkpoints" / "checkpoint-2"
    (ckpt / "critic").mkdir(parents=True)
    artifacts.mark_checkpoint_complete(ckpt, 2)
    assert main(["export", "--checkpoint", str(ckpt / "critic"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no critic to export" not in err and "sft" in err, err
