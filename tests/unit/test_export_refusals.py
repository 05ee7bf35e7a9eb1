"""`rlhf export` refusals that say what the dir is: a stage's final/ (already a plain model dir), a stage
dir, and a checkpoint that the running stage's rotation removed, before or during the export. No model
is loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from rlhf import artifacts, export
from rlhf.cli import main
from rlhf.errors import ArtifactError


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
