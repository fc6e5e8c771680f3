"""template = "chat": rows rendered by the tokenizer's chat template, assistant-only loss, and
the same rendering for label scoring and generation."""

import json
from pathlib import Path

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


def chat_prefs_recipe(tmp_path, assets, chat_model) -> Path:
    """Preference pairs on the demo's headlines (the headline as the user's question, the right
    label over a wrong one) as a chat source, and a two-step DPO on the tiny chat model."""
    import random

    from llmctl.data import open_dataset, write_dataset

    labels = ("negative", "neutral", "positive")
    for split in ("train", "eval"):
        ds = open_dataset(assets[f"sentiment_{split}"])
        rows = [{"input": str(ds[i]["input"]), "output": str(ds[i]["output"])}
                for i in range(min(len(ds), 24))]
        rng = random.Random(0)
        write_dataset(str(tmp_path / f"prefs_{split}"), [
            {"prompt": f"Sentiment of: {r['input']}", "chosen": r["output"],
             "rejected": rng.choice([x for x in labels if x != r["output"]])} for r in rows], split)
    recipe = tmp_path / "dpo.toml"
    recipe.write_text(recipe_head(tmp_path / "run", "chat-dpo", prefs={
        "path": str(tmp_path / "prefs_train"), "eval_path": str(tmp_path / "prefs_eval"),
        "template": "chat", "system": "Answer with one word."}) + f"""
[dpo]
model = "{chat_model}"
data = "prefs"
max_steps = 2
batch_size = 4
max_length = 96
lr = 1e-3
logging_steps = 1
save_steps = 2
""")
    return recipe


def test_chat_preference_pairs_are_conversations(tmp_path, assets, chat_model, capsys):
    """DPO on a chat source: the prompt is a system + user turn and the answers are assistant
    turns (trl's conversational format, which it renders with the chat template), the label
    task is scored in the same rendering, and the stage reports its gain with a standard error."""
    from transformers import AutoTokenizer

    from llmctl.data import hf_dataset, preference_template
    from llmctl.recipe import load_recipe

    recipe = chat_prefs_recipe(tmp_path, assets, chat_model)
    source = load_recipe(recipe).data["prefs"]
    row = hf_dataset(source, "train", "data.prefs", "preference", str(tmp_path / "cache"))[0]
    assert row["prompt"][0] == {"role": "system", "content": "Answer with one word."}
    assert row["prompt"][1]["role"] == "user" and row["prompt"][1]["content"].startswith("Sentiment of: ")
    assert row["chosen"] == [{"role": "assistant", "content": row["chosen"][0]["content"]}]
    assert row["rejected"][0]["role"] == "assistant" and row["rejected"] != row["chosen"]
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    flat = {"prompt": row["prompt"][1]["content"], "chosen": row["chosen"][0]["content"]}
    template = preference_template(source, tokenizer)
    assert template.prompt(flat) == tokenizer.apply_chat_template(
        row["prompt"], tokenize=False, add_generation_prompt=True)
    assert template.response(flat) == flat["chosen"]

    code, _, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    m = manifest(tmp_path / "run" / "dpo")["metrics"]
    assert m["eval_task_chance"] == pytest.approx(1 / 3)
    for key in ("eval_task_accuracy_before", "eval_task_accuracy_after"):
        assert 0 <= m[key] <= 1
    assert m["eval_task_accuracy_gain_sem"] >= 0


def test_ppo_pads_with_a_token_the_prompts_do_not_hold(chat_model):
    """trl's PPO masks pad tokens out of attention; the tiny chat model pads with <|im_end|>,
    which every chat prompt contains, so PPO switches to another special token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.stages.ppo import use_distinct_pad

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"}],
                                        add_generation_prompt=True)["input_ids"]
    assert tokenizer.pad_token_id in ids
    use_distinct_pad(tokenizer, [ids], model)
    assert tokenizer.pad_token_id not in ids and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_ppo_reward_text_reads_the_row_and_the_answer(chat_model):
    """ppo.reward_text: the reward model reads a format over the prompt row and the answer,
    found from a rollout's token ids (the query's ids, then the response's)."""
    from transformers import AutoTokenizer

    from llmctl.data import ChatTemplate
    from llmctl.errors import StageFailed
    from llmctl.stages.ppo import query_ids
    from llmctl.trainers.ppo import RewardInput

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    template = ChatTemplate(tokenizer, user="Sentiment of: {text}", assistant="label")
    rows = [{"text": "Shares plunged."}, {"text": "Profit rose."}]
    queries = query_ids(rows, template, tokenizer, 64)
    reward_input = RewardInput(tokenizer, "{response}: {text}", list(zip(queries, rows)))
    answer = tokenizer("negative<|im_end|>", add_special_tokens=False)["input_ids"]
    assert reward_input(queries[0] + answer) == "negative: Shares plunged."
    assert reward_input(queries[1] + answer) == "negative: Profit rose."
    plain = RewardInput(tokenizer, None, [])
    assert plain(queries[0] + answer) == tokenizer.decode(queries[0] + answer, skip_special_tokens=True)
    with pytest.raises(StageFailed, match="reward_text"):
        reward_input(answer)
