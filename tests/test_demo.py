"""`llmctl demo` end to end on the embedded assets, and recipes/demo.toml staying in step."""

import json
import re
import shlex
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from string import Template

import pytest

from llmctl.recipe import load_recipe
from tests.conftest import manifest, run_cli, run_llmctl

REPO = Path(__file__).parents[1]


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    """As a user runs it: `python -m llmctl demo` in a fresh process."""
    run_dir = tmp_path / "runs" / "demo"  # where the README's commands look for it
    done = run_llmctl(["demo", "--run-dir", run_dir])
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # quiet: no library's warnings (neural-compressor announced its accelerator during ppo)
    assert "WARNING" not in done.stderr + out, done.stderr
    pretrain = manifest(run_dir / "pretrain")["metrics"]
    assert pretrain["train_loss_last"] < pretrain["train_loss_first"] - 2.0
    assert pretrain["eval_perplexity"] < 1000  # 4,096-token vocabulary: uniform would be 4,096
    sft = manifest(run_dir / "sft")["metrics"]
    # the evidence that fine-tuning teaches the task: label accuracy on held-out rows (0.913 in
    # our runs, from 0.340 before; chance 0.333)
    assert sft["eval_task_accuracy_after"] >= 0.85
    assert sft["eval_task_accuracy_after"] >= sft["eval_task_accuracy_before"] + 0.4
    reward = manifest(run_dir / "reward")["metrics"]
    assert reward["eval_accuracy"] > 0.6  # chosen above rejected on held-out pairs (chance 0.5)
    ppo = manifest(run_dir / "ppo")
    assert ppo["reward_tokenizer_shared"] is False  # the cross-tokenizer path
    # PPO on a policy SFT taught most of the task (3 epochs): the reward model scores its sampled
    # answers to held-out prompts high before PPO (2.07 in our runs, -3.0 for the old demo's LoRA
    # SFT policy), and PPO raises them by more than two standard errors of the paired gain
    # (+0.446 ± 0.096; +0.225 ± 0.081 with run.seed = 1), with the KL within the bound
    metrics = ppo["metrics"]
    assert metrics["reward_mean_before"] > 1.0, metrics
    assert metrics["reward_gain"] > 2 * metrics["reward_gain_sem"], metrics
    assert abs(metrics["kl_last"]) <= ppo["recipe"]["max_kl"]
    quantize = manifest(run_dir / "quantize")["metrics"]
    assert quantize["accepted"] == 1 and quantize["relative_loss"] <= quantize["tolerable_loss"]
    assert quantize["size_bytes_after"] < 0.7 * quantize["size_bytes_before"]
    bench = manifest(run_dir / "bench")["metrics"]
    # On lm-eval's own scoring: PPO and INT8 keep what SFT taught (the final fp model is the
    # plain keys, bench.models = [ppo, quantize, sft]). Within two of the 150 rows: PPO's
    # sampling differs with the thread count (after 4 SFT epochs, 0.993, one run kept every row
    # and a CI run on 2 threads lost two; after 3, 0.913, PPO scores 0.947 in our runs).
    slack = 2 / 150 + 1e-9
    assert bench["sft/demo_sentiment.acc"] >= 0.85
    assert bench["demo_sentiment.acc"] >= bench["sft/demo_sentiment.acc"] - slack
    assert bench["quantize/demo_sentiment.acc"] >= bench["sft/demo_sentiment.acc"] - slack
    assert bench["quantize/greedy_b1_tokens_per_second"] > 0
    assert (run_dir / "bench" / "report.md").exists()
    assert manifest(run_dir / "generate")["inputs"]["model"] == "$RUN/quantize/model"
    # the showcase headlines (not in the training data) get the right label from the INT8 model
    showcase = {"Norvik Bank plunged": "negative", "Halden Foods raised": "positive"}
    rows = [json.loads(line) for line in
            (run_dir / "generate" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == len(showcase)
    for row, (news, label) in zip(rows, showcase.items()):
        assert news in row["input"] and row["completions"][0].split()[0] == label, row
    assert "llmctl demo" in out and "eval_task_accuracy_after" in out
    assert "INT8 speed" in out  # the ratio comes with what it means at this size
    check_demo_grpo(run_dir, tmp_path / "demo-grpo", capsys)
    check_readme_commands(tmp_path, capsys, monkeypatch)
    # a second run skips every finished stage
    code, out, err = run_cli(["demo", "--run-dir", run_dir], capsys)
    assert code == 0 and err.count("up to date, skipped") == 7
    # ... and so does the same run directory moved elsewhere
    moved = tmp_path / "moved" / "demo"
    moved.parent.mkdir()
    run_dir.rename(moved)
    code, out, err = run_cli(["demo", "--run-dir", moved], capsys)
    assert code == 0 and err.count("up to date, skipped") == 7, err


def check_demo_grpo(demo_dir: Path, run_dir: Path, capsys) -> None:
    """recipes/demo-grpo.toml on this demo's assets and pretrained model: GRPO with the
    `label_match` reward alone raises held-out label accuracy by more than two standard errors
    of the gain."""
    assets = demo_dir / "assets"
    code, _, err = run_cli(
        ["run", REPO / "recipes" / "demo-grpo.toml", "--run-dir", run_dir,
         "--set", f'data.sentiment.path="{assets / "sentiment_train"}"',
         "--set", f'data.sentiment.eval_path="{assets / "sentiment_eval"}"',
         "--set", f'sft.model="{demo_dir / "pretrain" / "model"}"'], capsys)
    assert code == 0, err
    grpo = manifest(run_dir / "grpo")["metrics"]
    gain = grpo["eval_task_accuracy_after"] - grpo["eval_task_accuracy_before"]
    assert gain > 2 * grpo["eval_task_accuracy_gain_sem"], grpo
    assert grpo["eval_reward_after"] > grpo["eval_reward_before"], grpo


def readme_commands() -> list[list[str]]:
    """Every `llmctl` command in the README's ```bash blocks, as argument lists (continuation
    lines joined, comments dropped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("llmctl ")]


def test_readme_commands_parse():
    """The README's commands name llmctl's commands, options and arguments as they are: each
    parses (the slow demo test runs them), so a renamed option fails here, in the fast tier."""
    import click
    import typer.main

    from llmctl.cli import app
    commands = readme_commands()
    assert len(commands) >= 7, commands  # the quick start and "Your own data"
    for command in commands:
        name, args = command[0], command[1:]
        cmd: click.Command = typer.main.get_command(app)
        ctx = click.Context(cmd, info_name=name)
        while isinstance(cmd, click.Group):  # `llmctl data show ...`: down to `show`
            name, args = args[0], args[1:]
            cmd = cmd.get_command(ctx, name)
            assert cmd is not None, command
            ctx = click.Context(cmd, info_name=name, parent=ctx)
        cmd.make_context(name, list(args), parent=ctx.parent)  # raises click.UsageError if not


def check_readme_commands(work: Path, capsys, monkeypatch) -> None:
    """The README's commands, as a user types them after `make demo` (runs/demo in the working
    directory): each exits 0. `llmctl demo` made the run; `llmctl serve` runs until stopped
    (tests/test_serve.py serves the demo's models)."""
    monkeypatch.chdir(work)
    (work / "my_rows.jsonl").write_text(  # the "Your own data" example's file
        '{"question": "Is the tax due in April?", "response": "yes"}\n'
        '{"question": "Who pays it?", "response": "everyone"}\n')
    commands = [c for c in readme_commands() if c[1] not in ("demo", "serve")]
    assert len(commands) >= 7, commands  # the quick start and "Your own data"
    for command in commands:
        code, out, err = run_cli(command[1:], capsys)
        assert code == 0 and out.strip(), (command, err)


def test_repo_demo_recipe_matches_embedded_one():
    template = resources.files("llmctl.demo").joinpath("demo.toml").read_text()
    shipped = (REPO / "recipes" / "demo.toml").read_text()
    strip = lambda text: [l for l in text.splitlines() if not l.startswith("#")]  # noqa: E731
    names = set(re.findall(r"\$\{(\w+)\}", template))
    expected = Template(template).substitute({n: f"runs/demo/assets/{n}" for n in names})
    assert strip(shipped) == strip(expected)


@pytest.mark.slow
def test_rebuilt_assets_make_finished_demo_stages_stale(tmp_path, monkeypatch):
    """Assets rebuilt by a newer llmctl land at the same paths: the stages that read them must
    rerun (their contents differ: Deep Lake commits carry ids and times)."""
    from llmctl.demo import assets, pipeline
    from llmctl.pipeline import why_stale
    from llmctl.rundir import input_fingerprints

    stale = []
    monkeypatch.setattr(pipeline, "run_all", lambda recipe, force=False: stale.append(
        why_stale(recipe, "pretrain") is not None))
    monkeypatch.setattr(pipeline, "print_summary", lambda *args: None)
    pipeline.run_demo(tmp_path)  # fresh: assets built, nothing finished yet
    recipe = load_recipe(tmp_path / "recipe.toml", [f"run.dir={json.dumps(str(tmp_path))}"])
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "manifest.json").write_text(json.dumps({  # as if it finished now
        "status": "complete", "config_hash": recipe.stage_hash("pretrain"),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": {"config": recipe.hashed_config("pretrain"),
                        "inputs": input_fingerprints(recipe, "pretrain")}}))
    pipeline.run_demo(tmp_path)  # the same assets: pretrain may be skipped
    monkeypatch.setattr(assets, "ASSETS_VERSION", assets.ASSETS_VERSION + 1)
    pipeline.run_demo(tmp_path)  # rebuilt: new Deep Lake commits, so new contents
    assert stale == [True, False, True]


