"""`llmctl status`: each stage's state and what `llmctl run` would do, read-only."""

import json
import shutil

from tests.conftest import run_cli


def test_status_reports_finished_interrupted_and_not_run(pretrained_model, tmp_path, capsys):
    source = pretrained_model.parents[2]  # the fixture's recipe.toml and run/
    run = shutil.copytree(source / "run", tmp_path / "run")
    recipe = source / "recipe.toml"
    before = sorted(p.relative_to(run) for p in run.rglob("*"))

    def status(*args):
        code, out, err = run_cli(["status", recipe, "--run-dir", run, "--json", *args], capsys)
        assert code == 0, err
        return {row["stage"]: row for row in json.loads(out)["stages"]}

    rows = status()
    assert list(rows) == ["pretrain", "generate"]
    pretrain = rows["pretrain"]
    assert pretrain["status"] == "finished" and pretrain["next_run"] == "skip (up to date)"
    assert pretrain["wall_seconds"] > 0 and pretrain["finished_at"]
    saved = json.loads((run / "pretrain" / "manifest.json").read_text())["metrics"]
    assert pretrain["metrics"]["eval_perplexity"] == saved["eval_perplexity"]
    assert rows["generate"] == {"stage": "generate", "dir": str(run / "generate"),
                                "status": "not run", "next_run": "run (not finished yet)"}
    # a changed recipe key: pretrain would rerun, and says why
    assert status("--set", "pretrain.lr=0.001")["pretrain"]["next_run"] == \
        "run (config changed: pretrain.lr: 0.003 -> 0.001)"
    # a run stopped after its first checkpoint
    (run / ".partial" / "generate" / "checkpoints" / "checkpoint-4").mkdir(parents=True)
    (run / ".partial" / "generate" / "checkpoints" / "checkpoint-4" / "trainer_state.json") \
        .write_text("{}")
    interrupted = status()["generate"]
    assert interrupted["status"] == "interrupted" and interrupted["checkpoint"] == "checkpoint-4"
    shutil.rmtree(run / ".partial")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # read-only

    code, out, _ = run_cli(["status", recipe, "--run-dir", run], capsys)
    assert code == 0 and "finished" in out and "not run" in out  # the table
    code, _, err = run_cli(["status", tmp_path], capsys)
    assert code == 2 and "without recipe.toml" in err
