"""`llmctl bench`: vanilla vs quantized side by side (lm-eval task, perplexity, latency,
reports), agreement with a direct lm-eval call, and input errors."""

import json

import pytest

from tests.conftest import corpus_source, manifest, recipe_head, run_cli, sentiment_source


def bench_recipe(path, run_dir, assets, models, body: str = "") -> None:
    head = recipe_head(run_dir, "bench", assets["tokenizer"], sentiment=sentiment_source(assets))
    path.write_text(head + f"""
[bench]
models = {json.dumps([str(m) for m in models])}
tasks = ["demo_sentiment"]
task_path = "{assets['lm_tasks']}"
limit = 20
{body}
""")


@pytest.fixture(scope="module")
def quantized_run(assets, pretrained_model, tmp_path_factory):
    """A run directory whose quantize stage holds a torch dynamic INT8 copy of the model."""
    from llmctl.pipeline import run_stage
    from llmctl.recipe import load_recipe

    root = tmp_path_factory.mktemp("quantized")
    path = root / "q.toml"
    head = recipe_head(root / "run", "q", assets["tokenizer"], corpus=corpus_source(assets))
    path.write_text(head + f"""
[quantize]
model = "{pretrained_model}"
backend = "torch"
method = "dynamic"
bits = 8
data = "corpus"
seq_len = 64
eval_max_batches = 2
eval_batch_size = 4
tolerable_loss = 0.5
""")
    run_stage(load_recipe(path), "quantize")
    return root / "run"


@pytest.mark.slow
def test_vanilla_vs_quantized(quantized_run, assets, pretrained_model, capsys):
    recipe = quantized_run.parent / "bench.toml"
    bench_recipe(recipe, quantized_run, assets, [pretrained_model, "quantize"], """
data = "sentiment"
seq_len = 64
eval_batch_size = 4
eval_max_batches = 2
latency = { prompt_tokens = 16, new_tokens = 8, runs = 1, batch_sizes = [1, 2], num_beams = [1, 2] }
""")
    code, _, err = run_cli(["bench", recipe], capsys)
    assert code == 0, err
    stage = quantized_run / "bench"
    m = manifest(stage)
    assert m["status"] == "complete"

    report = json.loads((stage / "report.json").read_text())
    assert list(report["models"]) == ["pretrain", "quantize"]
    for label, entry in report["models"].items():
        assert 0 <= entry["tasks"]["demo_sentiment"]["acc"] <= 1, label
        assert entry["perplexity"] > 1, label
        assert {(r["mode"], r["batch_size"]) for r in entry["latency"]} == {
            ("greedy", 1), ("greedy", 2), ("beam2", 1), ("beam2", 2)}
        assert all(r["new_tokens"] == 8 and 0 < r["seconds_min"] <= r["seconds"]
                   <= r["seconds_max"] for r in entry["latency"])
    assert report["models"]["quantize"]["path"] == str(quantized_run / "quantize" / "model")
    # The quantized model really is a different model.
    assert report["models"]["quantize"]["perplexity"] != report["models"]["pretrain"]["perplexity"]

    md = (stage / "report.md").read_text()
    assert f"| pretrain | `{pretrained_model}` |" in md
    assert f"| quantize | `{quantized_run / 'quantize' / 'model'}` |" in md
    assert "| quantize | demo_sentiment | acc |" in md and "| pretrain | greedy | 1 |" in md
    row = next(r for r in report["models"]["pretrain"]["latency"] if r["mode"] == "greedy")
    assert f"({row['seconds_min']:.3f}-{row['seconds_max']:.3f})" in md  # the spread is shown
    assert m["metrics"]["greedy_b1_seconds_min"] <= m["metrics"]["greedy_b1_seconds_max"]
    assert (stage / "latency.png").read_bytes().startswith(b"\x89PNG")
    assert m["outputs"]["latency_chart"] == "latency.png"

    metrics = m["metrics"]
    model = report["models"]["pretrain"]
    assert metrics["demo_sentiment.acc"] == model["tasks"]["demo_sentiment"]["acc"]
    assert metrics["perplexity"] == model["perplexity"]
    assert metrics["quantize/perplexity"] == report["models"]["quantize"]["perplexity"]
    assert metrics["pretrain/speedup_greedy_b1"] == 1.0
    assert metrics["quantize/speedup_greedy_b1"] > 0
    for key in ("quantize/speedup_greedy_b2", "quantize/speedup_beam2_b1", "quantize/speedup_beam2_b2"):
        assert key in metrics, key


@pytest.mark.slow  # runs the lm_eval command in a second process
def test_matches_direct_lm_eval(tmp_path, assets, pretrained_model, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from llmctl.models import device

    recipe = tmp_path / "bench.toml"
    bench_recipe(recipe, tmp_path / "run", assets, [pretrained_model],
                 "batch_size = 8\nlatency = { runs = 0 }")
    code, _, err = run_cli(["bench", recipe], capsys)
    assert code == 0, err
    metrics = manifest(tmp_path / "run" / "bench")["metrics"]
    assert not (tmp_path / "run" / "bench" / "latency.png").exists()

    direct = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={pretrained_model}", tasks=["demo_sentiment"],
        limit=20, batch_size=8, task_manager=TaskManager(include_path=assets["lm_tasks"]),
        device=str(device()))  # lm-eval 0.4.13 defaults to CUDA even on a CPU-only torch
    results = direct["results"]["demo_sentiment"]
    assert metrics["demo_sentiment.acc"] == results["acc,none"]
    assert metrics["demo_sentiment.acc_norm"] == results["acc_norm,none"]
    assert metrics["demo_sentiment.acc_stderr"] == results["acc_stderr,none"]


def test_missing_model_path(tmp_path, assets, capsys):
    missing = tmp_path / "nowhere" / "model"
    recipe = tmp_path / "bench.toml"
    bench_recipe(recipe, tmp_path / "run", assets, [missing])
    code, _, err = run_cli(["bench", recipe], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0], err
    assert not (tmp_path / "run" / "bench").exists()


def test_unknown_task(tmp_path, assets, pretrained_model, capsys):
    recipe = tmp_path / "bench.toml"
    bench_recipe(recipe, tmp_path / "run", assets, [pretrained_model], "latency = { runs = 0 }")
    code, _, err = run_cli(["bench", recipe, "--set", 'bench.tasks=["no_such_task"]'], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "'no_such_task'" in last, err
    assert not (tmp_path / "run" / "bench").exists()


def test_two_model_paths_keep_both(tmp_path, assets, pretrained_model, quantized_run):
    from llmctl.recipe import load_recipe

    recipe = tmp_path / "bench.toml"
    bench_recipe(recipe, tmp_path / "run", assets,
                 [pretrained_model, quantized_run / "quantize" / "model"])
    models = load_recipe(recipe).upstream_inputs("bench")
    assert list(models) == ["pretrain", "quantize"]  # a stage's model/ dir is named by its stage
