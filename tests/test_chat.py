"""template = "chat": rows rendered by the tokenizer's chat template, assistant-only loss, and
the same rendering for label scoring and generation."""

import json

import pytest

from tests.conftest import manifest, recipe_head, run_cli, sentiment_source
from tests.test_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, assets):
    """A tiny chat model (ChatML template, eos <|im_end|>): the tiny GGUF, converted."""
    import os

    from llmctl.gguf import converted

    root = tmp_path_factory.mktemp("chat")
    old = os.environ.get("LLMCTL_CACHE")
    os.environ["LLMCTL_CACHE"] = str(root / "cache")
    try:
        return converted(write_tiny_gguf(root / "tiny-chat.gguf", assets["tokenizer"]))
    finally:
        if old is None:
            os.environ.pop("LLMCTL_CACHE")
        else:
            os.environ["LLMCTL_CACHE"] = old


def test_rendering_matches_apply_chat_template(chat_model):
    from transformers import AutoTokenizer

    from llmctl.data import ChatTemplate

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}]
    by_messages = ChatTemplate(tokenizer)
    row = {"messages": json.dumps(messages)}  # as `llmctl data ingest` stores a list
    assert by_messages.render(row) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert by_messages.prompt(row) == tokenizer.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True)
    assert by_messages.response(row) == "Hello."
    mapped = ChatTemplate(tokenizer, system="Be brief.", user="{question}", assistant="answer")
    row = {"question": "Hi?", "answer": "Hello."}
    assert mapped.render(row) == tokenizer.apply_chat_template(messages, tokenize=False)
    prompt, completion = mapped.split(row)
    assert prompt + completion == mapped.render(row)
    assert completion.startswith("Hello.")


def test_no_chat_template_is_exit_2(tmp_path, assets, pretrained_model, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_head(tmp_path / "run", "chat", sentiment=sentiment_source(
        assets, template="chat", user="{input}", assistant="output")) + f"""
[sft]
model = "{pretrained_model}"
data = "sentiment"
max_steps = 1
""")
    code, _, err = run_cli(["sft", recipe], capsys)
    assert code == 2 and "template = \"chat\"" in err and "has no chat template" in err, err
    assert not (tmp_path / "run").exists()


def chat_sft_recipe(tmp_path, assets, chat_model, packing="false"):
    recipe = tmp_path / "r.toml"
    source = sentiment_source(assets, template="chat", limit=96,
                              user="{instruction}\n\nContent: {input}", assistant="output")
    recipe.write_text(recipe_head(tmp_path / "run", "chat", sentiment=source) + f"""
[sft]
model = "{chat_model}"
data = "sentiment"
lora = {{ r = 8, alpha = 16, dropout = 0.0 }}
seq_len = 96
packing = {packing}
batch_size = 8
max_steps = 12
lr = 2e-2
logging_steps = 2
eval_max_batches = 2

[generate]
template = "chat"
prompts = ["Shares of Norvik Bank plunged 14% after it cut its outlook."]
max_new_tokens = 3
""")
    return recipe


def test_sft_learns_assistant_turns_only(tmp_path, assets, chat_model, capsys):
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from llmctl.data import hf_dataset
    from llmctl.recipe import load_recipe

    recipe = chat_sft_recipe(tmp_path, assets, chat_model)
    # what trl trains on: the completion mask covers exactly the assistant's turn
    source = load_recipe(recipe).data["sentiment"]
    dataset = hf_dataset(source, "train", "data.sentiment", "prompt_completion",
                         str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    from transformers import AutoModelForCausalLM

    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(chat_model),
                         args=SFTConfig(output_dir=str(tmp_path / "t"), max_length=96,
                                        completion_only_loss=True, report_to=[], use_cpu=True),
                         train_dataset=dataset, processing_class=tokenizer)
    example = trainer.train_dataset[0]  # labels: -100 wherever no loss is taken
    learned = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
    ignored = [t for t, label in zip(example["input_ids"], example["labels"]) if label == -100]
    answer = dataset[0]["completion"][0]["content"]
    assert tokenizer.decode(learned).strip() == f"{answer}<|im_end|>"
    assert tokenizer.decode(ignored).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(example["input_ids"]) == \
        tokenizer.decode(ignored) + tokenizer.decode(learned)
    # and the stage itself: label accuracy scored in the same chat rendering
    code, _, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    m = manifest(tmp_path / "run" / "sft")["metrics"]
    assert m["train_loss_last"] < m["train_loss_first"]
    assert 0 <= m["eval_task_accuracy_after"] <= 1
    generations = [json.loads(line) for line in
                   (tmp_path / "run" / "generate" / "generations.jsonl").read_text().splitlines()]
    assert generations and generations[0]["input"].endswith("<|im_start|>assistant\n")


def test_generate_chat_prompt_is_the_user_turn(tmp_path, chat_model, capsys):
    recipe = tmp_path / "g.toml"
    recipe.write_text(recipe_head(tmp_path / "run", "g") + f"""
[generate]
model = "{chat_model}"
template = "chat"
system = "Answer in one word."
max_new_tokens = 4
""")
    code, out, err = run_cli(["generate", recipe, "-p", "Capital of France?", "--json"], capsys)
    assert code == 0, err
    rendered = manifest(tmp_path / "run" / "generate")
    text = json.loads((tmp_path / "run" / "generate" / "generations.jsonl").read_text())["input"]
    assert text == ("<|im_start|>system\nAnswer in one word.<|im_end|>\n"
                    "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered["metrics"]["num_prompts"] == 1
