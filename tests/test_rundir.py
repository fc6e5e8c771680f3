"""Run directory lifecycle: only finished stages look finished; reruns never damage outputs."""


import pytest

from llmctl.errors import UserError
from llmctl.rundir import StageRun, is_complete, read_manifest, require_input


def stage(tmp_path, config_hash="h1"):
    return StageRun(tmp_path, "pretrain", config_hash, seed=1, recipe={"lr": 1.0}, inputs={})


def test_work_happens_out_of_sight_until_finish(tmp_path):
    run = stage(tmp_path).begin()
    run.path("model").mkdir()
    assert not (tmp_path / "pretrain").exists()
    assert not is_complete(tmp_path / "pretrain")
    run.finish({"eval_loss": 1.5}, {"model": "model"})
    manifest = read_manifest(tmp_path / "pretrain")
    assert manifest["status"] == "complete" and manifest["metrics"] == {"eval_loss": 1.5}
    for key in ("stage", "started_at", "finished_at", "seed", "recipe", "inputs", "outputs",
                "versions", "metrics"):
        assert key in manifest
    assert "torch" in manifest["versions"]
    assert not (tmp_path / ".partial" / "pretrain").exists()


def test_rerun_replaces_only_on_success(tmp_path):
    stage(tmp_path).begin().finish({"x": 1}, {})
    failing = stage(tmp_path, "h2").begin()
    failing.path("half-written").write_text("...")
    # the process dies here: the old output is still the finished one
    assert read_manifest(tmp_path / "pretrain")["metrics"] == {"x": 1}
    stage(tmp_path, "h2").begin().finish({"x": 2}, {})
    assert read_manifest(tmp_path / "pretrain")["metrics"] == {"x": 2}


def test_checkpoints_kept_for_same_config_only(tmp_path):
    run = stage(tmp_path).begin()
    ckpt = run.checkpoint_dir / "checkpoint-10"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (run.checkpoint_dir / "checkpoint-20").mkdir()  # no trainer_state: half-written, ignored
    assert stage(tmp_path).begin().last_checkpoint() == str(ckpt)
    assert stage(tmp_path, "other").begin().last_checkpoint() is None


def test_metrics_must_be_numbers(tmp_path):
    with pytest.raises(TypeError):
        stage(tmp_path).begin().finish({"acc": "high"}, {})


def test_require_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        require_input(str(tmp_path / "sft" / "model"), "merge.model")
    (tmp_path / ".partial" / "sft").mkdir(parents=True)
    with pytest.raises(UserError, match="did not finish"):
        require_input(str(tmp_path / "sft" / "model"), "merge.model")
    require_input("facebook/opt-125m", "model")  # a hub id is left to the loader
