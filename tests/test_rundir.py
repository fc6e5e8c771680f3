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


def _tree(path) -> dict:
    return {p.name: p.read_text() for p in path.iterdir()}


def test_replace_dir_puts_the_new_directory_in_place_and_removes_the_old(tmp_path):
    from llmctl.paths import replace_dir

    new, target = tmp_path / ".new", tmp_path / "out"
    new.mkdir()
    (new / "a").write_text("first")
    replace_dir(new, target)  # nothing there yet
    assert _tree(target) == {"a": "first"} and not new.exists()
    new.mkdir()
    (new / "b").write_text("second")
    replace_dir(new, target)
    assert _tree(target) == {"b": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one is gone


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="renameat2")
def test_replace_dir_never_leaves_the_target_missing_on_linux(tmp_path, monkeypatch):
    """Linux exchanges the two in one call: with every plain rename failing, the swap still
    happens, so there was no moment at which the old directory had left and the new not come."""
    import os

    from llmctl.paths import replace_dir

    new, target = tmp_path / ".new", tmp_path / "out"
    new.mkdir(), target.mkdir()
    (new / "x").write_text("new")
    (target / "x").write_text("old")

    def no_rename(*args, **kwargs):
        raise AssertionError("a plain rename: a window in which the target is missing")

    monkeypatch.setattr(os, "replace", no_rename)
    replace_dir(new, target)
    assert _tree(target) == {"x": "new"} and not new.exists()


def test_replace_dir_without_exchange_puts_the_old_back_when_the_new_cannot_go_in(
        tmp_path, monkeypatch):
    import os

    from llmctl import paths

    new, target = tmp_path / ".new", tmp_path / "out"
    new.mkdir(), target.mkdir()
    (new / "x").write_text("new")
    (target / "x").write_text("old")
    monkeypatch.setattr(paths, "_exchange", lambda a, b: False)  # another OS or file system
    real_replace = os.replace

    def failing_second(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError("disk went away")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(OSError, match="disk went away"):
        paths.replace_dir(new, target)
    assert _tree(target) == {"x": "old"}  # back where it was
    monkeypatch.setattr(os, "replace", real_replace)
    paths.replace_dir(new, target)
    assert _tree(target) == {"x": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
