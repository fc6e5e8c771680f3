"""llama.cpp as the runtime of a GGUF quantize output (llmctl.quantization.llamacpp).

Without the ``llamacpp`` extra, generate, bench and serve refuse such an output with exit 2
naming the extra (the import of llama_cpp made to fail for real: ``sys.modules`` holds None for
it, which makes ``import llama_cpp`` raise ImportError). With the extra (llama-cpp-python, built
from source in 8+ minutes on 2 cores: too long for CI, so CI skips these), llama.cpp decodes the
file: greedy tokens and logits against transformers on the same f16 weights, generate, bench
and serve end to end.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from tests.conftest import TINY_TEXTS, recipe_head, run_cli

EXTRA_MISSING = "llama-cpp-python (the llamacpp extra) is not installed; it builds from source " \
                "in 8+ minutes, more than CI's budget"


def gguf_output(folder, method: str):
    """(directory as `quantize` writes it for backend "gguf", the source model, its tokenizer):
    a random 2-layer Llama with a byte-level BPE tokenizer, exported at ``method``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmctl.demo.assets import train_tokenizer
    from llmctl.models import load_tokenizer
    from llmctl.quantization.gguf_export import GGUF_FILE, export_gguf

    train_tokenizer(folder, TINY_TEXTS)
    tokenizer = load_tokenizer(str(folder))
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights: decisive logits, so greedy paths do not tie
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    export_gguf(model, tokenizer, folder / GGUF_FILE, method)
    (folder / "quantization.json").write_text(json.dumps({"backend": "gguf", "method": method}))
    return folder, model, tokenizer


@pytest.fixture(scope="module")
def f16_output(tmp_path_factory):
    return gguf_output(tmp_path_factory.mktemp("gguf_f16"), "f16")


def bench_recipe(tmp_path, model_dir, latency: str = "runs = 0") -> str:
    path = tmp_path / "bench.toml"
    path.write_text(recipe_head(tmp_path / "run") + f'[bench]\nmodels = ["{model_dir}"]\n'
                    f"[bench.latency]\n{latency}\n")
    return str(path)


def test_without_the_extra_generate_bench_and_serve_are_exit_2_naming_it(
        f16_output, tmp_path, monkeypatch, capsys):
    folder = f16_output[0]
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp -> ImportError
    recipe = bench_recipe(tmp_path, folder)
    for args in (["generate", "--model", folder, "--prompt", "The function"],
                 ["bench", recipe],
                 ["serve", recipe, "--model", folder, "--port", "0"]):
        code, out, err = run_cli(args, capsys)
        assert code == 2, (args[0], err)
        assert err.startswith("error:") and "llmctl[llamacpp]" in err and str(folder) in err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # bench refused before its stage started


# -- with the extra ---------------------------------------------------------------------------

needs_extra = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason=EXTRA_MISSING)


@needs_extra
def test_llama_cpp_decodes_the_file_as_transformers_decodes_the_weights(f16_output):
    """f16: llama.cpp's greedy tokens are transformers' on the same weights, and its logits
    (the scoring context: every position) agree to 1e-2 of their range."""
    from transformers import GenerationConfig

    from llmctl.quantization import load_model

    folder, model, tokenizer = f16_output
    runtime = load_model(str(folder))
    assert type(runtime).__name__ == "LlamaCppModel"
    ids = tokenizer("Shares of the bank", return_tensors="pt")["input_ids"]
    config = GenerationConfig(max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert runtime.generate(ids, generation_config=config).tolist() == expected.tolist()
    with torch.no_grad():
        want = model(ids).logits
    got = runtime(input_ids=ids).logits
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-2 * (want.max() - want.min())


@needs_extra
def test_lm_eval_scores_the_file_as_it_scores_the_weights(f16_output, tmp_path):
    """bench's lm-eval path (the harness's HFLM over the llama.cpp model): the same per-task
    accuracy as the transformers model at f16, on a local multiple-choice task."""
    from llmctl.evaluation import lm_eval_tasks, write_choice_task
    from llmctl.quantization import load_model

    folder, model, tokenizer = f16_output
    rows = [{"text": t, "label": ["yes", "no"][i % 2]} for i, t in enumerate(TINY_TEXTS[:12])]
    write_choice_task(tmp_path, "tiny_choice", rows, "{{text}} Answer:", "label", ["yes", "no"])
    scores = [lm_eval_tasks(m, tokenizer, ["tiny_choice"], str(tmp_path), batch_size=4)
              ["tiny_choice"] for m in (model, load_model(str(folder)))]
    assert scores[0]["acc"] == scores[1]["acc"] and scores[0]["acc_norm"] == scores[1]["acc_norm"]


@needs_extra
def test_quantize_scores_each_gguf_trial_under_llama_cpp(f16_output, assets, tmp_path, capsys):
    """With the extra, a trial's figure is the file's under llama.cpp (its kernels and f16 KV
    cache), the runtime it is exported for: the accepted trial's perplexity is the saved file's
    perplexity under llama.cpp, to the last digit."""
    from llmctl.data import heldout_blocks
    from llmctl.evaluation import perplexity
    from llmctl.quantization import load_model
    from llmctl.recipe import load_recipe
    from tests.test_gguf_export import gguf_recipe

    _, model, tokenizer = f16_output
    model_dir = tmp_path / "source"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = gguf_recipe(tmp_path, assets, model_dir,
                         'method = "q8_0"\ndata = "corpus"\nseq_len = 32\n'
                         'eval_max_batches = 2\ntolerable_loss = 1.0')
    code, _, err = run_cli(["quantize", recipe], capsys)
    assert code == 0, err
    stage = tmp_path / "run" / "quantize"
    trial = json.loads((stage / "trials.json").read_text())["trials"][0]
    assert trial["scored_by"] == "llama.cpp" and trial["accepted"]
    loaded = load_recipe(recipe)
    blocks = heldout_blocks(loaded.data_source("quantize", "corpus"), "corpus", tokenizer,
                            loaded.quantize)
    saved = load_model(str(stage / "model"))
    assert perplexity(saved, blocks, loaded.quantize.eval_batch_size) == trial["metric"]


@needs_extra
def test_bench_runs_the_gguf_through_llama_cpp(f16_output, tmp_path, capsys):
    folder = f16_output[0]
    recipe = bench_recipe(tmp_path, folder, "runs = 1\nnew_tokens = 8\nprompt_tokens = 8\n"
                                            "num_beams = [1, 4]")
    code, out, err = run_cli(["bench", recipe], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "bench" / "report.json").read_text())
    entry = next(iter(report["models"].values()))
    assert entry["size_bytes"] == (folder / "model.gguf").stat().st_size
    assert [row["mode"] for row in entry["latency"]] == ["greedy"]  # no beam search in llama.cpp
    assert entry["latency"][0]["tokens_per_second"] > 0


@needs_extra
def test_serve_streams_what_it_answers_and_loses_no_request(f16_output):
    """The llama.cpp engine: a streamed answer adds up to the plain one, concurrent requests
    all come back (one at a time, in order), greedy n = 2 gives the same text twice."""
    import concurrent.futures

    from llmctl.quantization import load_model
    from llmctl.serve import CompletionRequest, Job, LlamaCppEngine

    folder, _, tokenizer = f16_output
    engine = LlamaCppEngine(load_model(str(folder)), tokenizer, "tiny", 16)

    def ask(prompt: str, stream: bool, n: int = 1):
        pieces = []
        job = Job(engine.encode(prompt, chat=False, param="prompt"), 10,
                  CompletionRequest(prompt=prompt, temperature=0, n=n), [],
                  (lambda c, text: pieces.append(text)) if stream else None)
        engine.jobs.put(job)
        return job.done.result(timeout=120), "".join(pieces)

    plain, _ = ask("The quick brown", stream=False)
    streamed, text = ask("The quick brown", stream=True)
    assert text == plain[0].text == streamed[0].text and plain[0].tokens > 0
    twice, _ = ask("Profit fell", stream=False, n=2)
    assert len(twice) == 2 and twice[0].text == twice[1].text
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda p: ask(p, stream=False)[0][0].text, TINY_TEXTS[:8]))
    assert len(answers) == 8 and engine.largest_batch == 1


@needs_extra
def test_a_model_open_at_exit_is_closed_without_a_traceback(f16_output):
    """A script that keeps a model to the end (bench_peer.py does) exits quietly: llama-cpp-python's
    own __del__ at interpreter shutdown printed "Exception ignored ... TypeError"."""
    import subprocess

    from tests.conftest import REPO

    file = f16_output[0] / "model.gguf"
    script = ("from llmctl.quantization import llamacpp\n"
              f"model = llamacpp.load({str(file)!r})\n"
              "model.close(); model.close()  # twice is harmless\n"
              f"kept = llamacpp.load({str(file)!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
