"""Model families end to end: a tiny random-weight text-only model of each family
(qwen3_5, gemma4, ministral3, smollm3: new in transformers 5; llama, gpt2, opt), built offline
with the family's own tokenizer class where one can be trained here (else the demo's byte-level
BPE) and, for a chat family, a chat template its rows and prompts go through; then the CLI:
sft (LoRA) -> merge -> dpo (LoRA) -> grpo (full) -> quantize (torch dynamic INT8) -> bench
(perplexity) -> generate in one `llmctl run`, quantize to OpenVINO INT8 weights (and generate
from it), and `llmctl serve`'s server answering one request from the `openai` client.

A stage a family cannot pass is exit 2 with one `error:` line saying why, asserted as such:
optimum-intel 2.2 exports none of qwen3_5_text, gemma4_text, ministral3 with transformers 5.5.
The README's "Model families" table is this file's outcome. The fast tests at the end check the
two rules this tier needed without building anything.
"""

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import manifest, recipe_head, run_cli

VOCAB = 1024
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

# ChatML, as Qwen and SmolLM3 use; Gemma's turns; Mistral's [INST]: enough of each for `serve`'s
# chat endpoint and chat templating, not the hub files' full templates (tools, thinking).
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
         "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
         "{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST]"
           "{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
           "{% endfor %}")


@dataclass(frozen=True)
class Family:
    model_type: str  # the saved config's model_type: the text-only one
    config: dict = field(default_factory=dict)  # its config's keys beyond COMMON
    tokenizer: str | None = None  # the family's tokenizer class (trained here), else the demo's
    chat_template: str | None = None  # a chat model: trained and prompted through its template
    openvino: str | None = None  # why `quantize` with backend openvino is exit 2; None: exports


# transformers 5.5.4, optimum-intel 2.2.0: the outcomes the README's "Model families" table shows
FAMILIES = {
    "qwen3_5": Family(
        "qwen3_5_text", dict(layer_types=["linear_attention", "full_attention"],
                             linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=16, linear_value_head_dim=16),
        "Qwen3_5Tokenizer", CHATML,
        openvino="qwen3_5_text model, which optimum-intel 2.2.0 exports to OpenVINO only with "
                 "transformers >= 5.2.0 and <= 5.2.*"),
    "gemma4": Family(
        "gemma4_text", dict(layer_types=["sliding_attention", "full_attention"], sliding_window=64,
                            global_head_dim=16, vocab_size_per_layer_input=VOCAB,
                            hidden_size_per_layer_input=16),
        "GemmaTokenizer", GEMMA,
        # optimum-intel 2.2's Gemma4 export config inherits Gemma's cap below its own minimum
        openvino="gemma4_text model, which optimum-intel 2.2.0 exports to OpenVINO only with "
                 "transformers >= 5.5 and <= 5.0"),
    "ministral3": Family("ministral3", chat_template=MISTRAL,
                         openvino="ministral3 model, which optimum-intel 2.2.0 cannot export to "
                                  "OpenVINO (no export config for text generation)"),
    "smollm3": Family("smollm3", chat_template=CHATML),
    "llama": Family("llama", tokenizer="LlamaTokenizer"),
    "gpt2": Family("gpt2", dict(n_inner=128), "GPT2Tokenizer"),
    "opt": Family("opt", dict(ffn_dim=128, word_embed_proj_dim=64), "GPT2Tokenizer"),
}


def build_family(family: Family, folder: Path, texts: list[str], demo_tokenizer: str) -> Path:
    """A tiny random model of ``family`` and its tokenizer, saved with save_pretrained."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    if family.tokenizer:
        tokenizer = getattr(transformers, family.tokenizer)().train_new_from_iterator(
            texts, vocab_size=VOCAB)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(demo_tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if family.chat_template:
        tokenizer.chat_template = family.chat_template
    config = AutoConfig.for_model(
        family.model_type, **COMMON, **family.config, vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def tokenizer_texts(assets) -> list[str]:
    """What the families' tokenizers are trained on: corpus text and the sentiment rows."""
    import deeplake

    rows = deeplake.open_read_only(assets["sentiment_train"])
    return ([row["text"] for row in deeplake.open_read_only(assets["corpus"])][:400]
            + [f"{r['instruction']} {r['input']} {r['output']}" for r in rows][:200])


def family_recipe(tmp_path: Path, assets, model: Path, chat: bool) -> Path:
    """sft (LoRA) -> merge -> dpo (LoRA) -> grpo (full) -> quantize (torch INT8) -> bench ->
    generate, a couple of steps each. A chat family's rows go through its chat template."""
    chat_keys = {"template": "chat", "user": "{instruction}\n\nContent: {input}",
                 "assistant": "output"} if chat else {"template": "sentiment"}
    path = tmp_path / "family.toml"
    head = recipe_head(
        tmp_path / "run", "family",
        corpus={"path": assets["corpus"], "eval_fraction": 0.02, "limit": 200},
        sentiment={"path": assets["sentiment_train"], "eval_path": assets["sentiment_eval"],
                   "limit": 32, **chat_keys},
        prefs={"path": assets["sentiment_prefs_train"], "eval_path": assets["sentiment_prefs_eval"],
               "limit": 32, **({"template": "chat"} if chat else {})})
    path.write_text(head + f"""
[sft]
data = "sentiment"
model = "{model}"
method = "lora"
lora = {{ r = 4, alpha = 8, dropout = 0.0 }}
seq_len = 96
packing = false
completion_only_loss = true
batch_size = 4
max_steps = 2
lr = 1e-3
logging_steps = 1
save_steps = 100
eval_task_rows = 8
eval_max_batches = 1

[merge]
dtype = "float32"

[dpo]
data = "prefs"
method = "lora"
lora = {{ r = 4, alpha = 8, dropout = 0.0 }}
max_steps = 2
batch_size = 4
max_length = 96
lr = 1e-3
logging_steps = 1
save_steps = 100
eval_task_rows = 8
eval_max_batches = 1

[grpo]
data = "sentiment"
method = "full"
max_steps = 1
batch_size = 4
num_generations = 2
max_completion_length = 4
eval_prompts = 4
eval_task_rows = 8
lr = 1e-4
logging_steps = 1
save_steps = 100
rewards = [{{ kind = "label_match" }}]

[quantize]
backend = "torch"
method = "dynamic"
bits = 8
data = "corpus"
seq_len = 32
eval_max_batches = 1
tolerable_loss = 1.0

[bench]
data = "corpus"
seq_len = 32
eval_max_batches = 1
latency = {{ runs = 0 }}

[generate]
prompts = ["The function"]
max_new_tokens = 4
{'template = "chat"' if chat else ''}
""")
    return path


@pytest.fixture(scope="module")
def texts(assets) -> list[str]:
    return tokenizer_texts(assets)


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@contextmanager
def serving(recipe: Path, model: str, monkeypatch):
    """`llmctl serve`'s own function (``llmctl.serve.serve``: the model it picks, its engine,
    its FastAPI app on uvicorn) in a thread of this process; yields the base URL. A subprocess,
    as tests/test_serve.py starts, would import torch and transformers again: about 10 s of CPU
    per family, most of this tier's cost."""
    import uvicorn

    from llmctl import serve as serve_module
    from llmctl.recipe import load_recipe

    servers, sockets, errors = [], [], []

    class Server(uvicorn.Server):  # the one serve() makes, kept to stop it
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    def bind(host, port):
        sockets.append(real_bind(host, port))
        return sockets[-1]

    def run():
        try:
            serve_module.serve(load_recipe(recipe), model, "127.0.0.1", 0)
        except BaseException as err:  # noqa: BLE001  (reported by the test thread)
            errors.append(err)

    real_bind = serve_module.bind
    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(serve_module, "bind", bind)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not (servers and servers[0].started) and thread.is_alive() \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert servers and servers[0].started, errors
    try:
        yield f"http://127.0.0.1:{sockets[0].getsockname()[1]}/v1"
    finally:
        servers[0].should_exit = True  # what SIGTERM does: in-flight requests finish first
        thread.join(60)
    assert not thread.is_alive() and not errors, errors


def one_request(url: str, model: str, chat: bool) -> str:
    """One greedy request from the openai client: a chat turn for a chat family."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="-", max_retries=0)
    assert [m.id for m in client.models.list()] == [model]
    if chat:
        done = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
            temperature=0)
        text = done.choices[0].message.content
    else:
        done = client.completions.create(model=model, prompt="The function", max_tokens=4,
                                         temperature=0)
        text = done.choices[0].text
    assert done.usage.completion_tokens > 0 and isinstance(text, str)
    return text


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_through_every_stage(name, tmp_path, assets, texts, capsys, monkeypatch):
    family = FAMILIES[name]
    model = build_family(family, tmp_path / name, texts, assets["tokenizer"])
    assert json.loads((model / "config.json").read_text())["model_type"] == family.model_type
    chat = family.chat_template is not None
    recipe = family_recipe(tmp_path, assets, model, chat)
    run = tmp_path / "run"

    code, _, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    for stage in ("sft", "merge", "dpo", "grpo", "quantize", "bench", "generate"):
        assert manifest(run / stage)["status"] == "complete", stage
    quantized = manifest(run / "quantize")["metrics"]
    bench = manifest(run / "bench")["metrics"]
    assert quantized["accepted"] == 1 and quantized["size_bytes_after"] > 0
    # bench reloads the INT8 model from disk: the perplexity quantize measured in memory
    assert bench["quantize/perplexity"] == pytest.approx(quantized["metric_after"], rel=1e-4)
    assert bench["perplexity"] == pytest.approx(quantized["metric_before"], rel=1e-4)
    assert manifest(run / "generate")["metrics"]["new_tokens"] > 0

    # OpenVINO INT8 weights of the GRPO model, in a second run directory
    ov_run = tmp_path / "ov"
    code, _, err = run_cli(["quantize", recipe, "--run-dir", ov_run,
                            "--set", 'quantize.backend="openvino"',
                            "--set", 'quantize.method="weight"', "--set", "quantize.bits=8",
                            "--set", f'quantize.model="{run / "grpo" / "model"}"'], capsys)
    if family.openvino:
        assert code == 2, err
        assert family.openvino in one_error_line(err)
        assert not (ov_run / "quantize").exists()
    else:
        assert code == 0, err
        assert manifest(ov_run / "quantize")["metrics"]["accepted"] == 1
        code, out, err = run_cli(["generate", "--model", ov_run / "quantize" / "model",
                                  "-p", "The function", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["prompt"] == "The function"

    with serving(recipe, "quantize", monkeypatch) as url:  # INT8, by transformers' engine
        one_request(url, "quantize", chat)


# -- the rules, without a run -----------------------------------------------------------------


@pytest.mark.slow  # importing optimum-intel's export configs takes seconds
def test_openvino_refuses_families_optimum_cannot_export(tmp_path):
    pytest.importorskip("optimum.intel")
    from llmctl.errors import UserError
    from llmctl.quantization import check_supported

    for model_type in ("ministral3", "qwen3_5_text", "gemma4_text", "llama"):
        folder = tmp_path / model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
        reason = next((f.openvino for f in FAMILIES.values()
                       if f.model_type == model_type), None)
        if reason is None:
            check_supported("openvino", str(folder))
            continue
        with pytest.raises(UserError) as err:
            check_supported("openvino", str(folder))
        assert str(err.value).startswith(f"quantize.model: {folder} is a {reason}")
        check_supported("torch", str(folder))  # the other backends take any family


def test_lora_targets_default_to_query_value_where_peft_has_none():
    """peft 0.21 has no default target modules for qwen3_5_text, gemma4_text, ministral3 or
    smollm3: llmctl adapts q_proj and v_proj there, as it does for OPT and Llama."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmctl.models import lora_config
    from llmctl.schema import LoraConfig

    config = AutoConfig.for_model("smollm3", **COMMON, vocab_size=64, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    assert set(lora_config(LoraConfig(), model, "sft.lora").target_modules) == {"q_proj", "v_proj"}
    assert lora_config(LoraConfig(target_modules=["o_proj"]), model,
                       "sft.lora").target_modules == {"o_proj"}
