"""The demo assets: built offline, deterministic per seed, with eval splits disjoint from train."""

from __future__ import annotations

import json
import shutil
import random
import re
from pathlib import Path

import deeplake
import pytest
import yaml

from llmctl.demo.assets import (ASSETS_VERSION, EOS, SENTIMENT_LABELS, build_assets, qa_pairs,
                                sentiment_records)

DATASET_COLUMNS = {
    "corpus": {"text"},
    "qa_train": {"question", "answer"},
    "qa_eval": {"question", "answer"},
    "sentiment_train": {"instruction", "input", "output"},
    "sentiment_eval": {"instruction", "input", "output"},
    "prefs_train": {"prompt", "chosen", "rejected", "chosen_text", "rejected_text"},
    "prefs_eval": {"prompt", "chosen", "rejected", "chosen_text", "rejected_text"},
    "prompts_train": {"instruction", "input", "output"},
    "prompts_eval": {"instruction", "input", "output"},
    "sentiment_prefs_train": {"prompt", "chosen", "rejected"},
    "sentiment_prefs_eval": {"prompt", "chosen", "rejected"},
}
ROWS = {"qa_train": 600, "qa_eval": 100, "sentiment_train": 600, "sentiment_eval": 150,
        "prefs_train": 500, "prefs_eval": 100, "prompts_train": 200, "prompts_eval": 50,
        "sentiment_prefs_train": 1200, "sentiment_prefs_eval": 300}


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, str]:
    return build_assets(tmp_path_factory.mktemp("assets"), seed=0)


def rows(path: str) -> list[dict[str, str]]:
    ds = deeplake.open_read_only(path)
    n = len(ds)
    columns = {name: ds[0:n][name] for name in (c.name for c in ds.schema.columns)}
    return [{name: values[i] for name, values in columns.items()} for i in range(n)]


def column(path: str, name: str) -> list[str]:
    ds = deeplake.open_read_only(path)
    return ds[0:len(ds)][name]


def test_manifest_lists_every_asset_relative_to_its_directory(assets, tmp_path):
    assert set(assets) == set(DATASET_COLUMNS) | {"tokenizer", "reward_tokenizer", "configs",
                                                  "lm_tasks"}
    root = Path(assets["corpus"]).parent
    for path in assets.values():
        assert Path(path).is_absolute() and Path(path).exists()
    manifest = json.loads((root / "ASSETS.json").read_text())
    assert manifest["seed"] == 0 and manifest["version"] == ASSETS_VERSION
    assert {k: str(root / v) for k, v in manifest["paths"].items()} == assets
    # Moved elsewhere, the assets are still built: nothing in them names the old place.
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    before = (moved / "ASSETS.json").stat().st_mtime_ns
    assert build_assets(moved, seed=0) == {k: str(moved / v) for k, v in manifest["paths"].items()}
    assert (moved / "ASSETS.json").stat().st_mtime_ns == before


def test_second_build_with_same_seed_is_skipped(assets):
    manifest = Path(assets["corpus"]).parent / "ASSETS.json"
    before = manifest.stat().st_mtime_ns
    assert build_assets(manifest.parent, seed=0) == assets
    assert manifest.stat().st_mtime_ns == before


def test_same_seed_gives_same_records_and_tokenizer(assets, tmp_path):
    again = build_assets(tmp_path / "again", seed=0)
    for name in ("sentiment_train", "qa_eval", "prefs_train", "prompts_eval"):
        assert rows(again[name]) == rows(assets[name]), name
    assert column(again["corpus"], "text") == column(assets["corpus"], "text")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (Path(again["tokenizer"]) / file).read_text() == \
            (Path(assets["tokenizer"]) / file).read_text()


def test_other_seed_gives_other_records():
    assert qa_pairs(random.Random(1), 60, 10) != qa_pairs(random.Random(2), 60, 10)
    assert sentiment_records(random.Random(1), 60, 15) != \
        sentiment_records(random.Random(2), 60, 15)


@pytest.mark.parametrize("name", sorted(DATASET_COLUMNS))
def test_columns_and_sizes(assets, name):
    ds = deeplake.open_read_only(assets[name])
    assert {c.name for c in ds.schema.columns} == DATASET_COLUMNS[name]
    if name in ROWS:
        assert len(ds) == ROWS[name]


def test_sentiment_labels_are_balanced_and_fingpt_shaped(assets):
    for split in ("sentiment_train", "sentiment_eval"):
        records = rows(assets[split])
        labels = [r["output"] for r in records]
        assert set(labels) == set(SENTIMENT_LABELS)
        counts = [labels.count(label) for label in SENTIMENT_LABELS]
        assert max(counts) - min(counts) <= 1
        assert all("{negative/neutral/positive}" in r["instruction"] for r in records)
        assert len({r["input"] for r in records}) == len(records)


def test_eval_rows_are_disjoint_from_train_rows(assets):
    for kind, field in (("qa", "question"), ("sentiment", "input"), ("prefs", "prompt"),
                        ("prompts", "input")):
        train = set(column(assets[f"{kind}_train"], field))
        held_out = set(column(assets[f"{kind}_eval"], field))
        assert not train & held_out, kind
    # nor is an eval preference pair or PPO prompt a question of another training set
    train_questions = set(column(assets["qa_train"], "question")) \
        | set(column(assets["prompts_train"], "input")) \
        | {question_of(p) for p in column(assets["prefs_train"], "prompt")}
    held_out = {question_of(p) for p in column(assets["prefs_eval"], "prompt")} \
        | set(column(assets["prompts_eval"], "input")) | set(column(assets["qa_eval"], "question"))
    assert not train_questions & held_out


def question_of(prompt: str) -> str:
    return prompt.removeprefix("Question: ").removesuffix("\n\nAnswer: ")


def test_qa_answers_are_correct(assets):
    arithmetic = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b,
                  "times": lambda a, b: a * b}
    checked = 0
    for row in rows(assets["qa_train"]) + rows(assets["qa_eval"]):
        question, answer = row["question"], row["answer"]
        if m := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", question):
            assert answer == str(arithmetic[m[2]](int(m[1]), int(m[3])))
        elif m := re.fullmatch(r"Spell the word (\w+) backwards\.", question):
            assert answer == m[1][::-1]
        elif m := re.fullmatch(r"How many letters are in the word (\w+)\?", question):
            assert answer == str(len(m[1]))
        elif m := re.fullmatch(r"Which is larger, (\d+) or (\d+)\?", question):
            assert answer == str(max(int(m[1]), int(m[2])))
        else:
            continue
        checked += 1
    assert checked > 400


def test_preference_pairs_prefer_the_polite_correct_answer(assets):
    for record in rows(assets["prefs_train"]) + rows(assets["prefs_eval"]):
        assert record["prompt"].startswith("Question: ")
        assert record["prompt"].endswith("\n\nAnswer: ")
        assert record["chosen"].endswith(".")
        assert record["chosen"] != record["rejected"]
        assert record["chosen_text"] == record["prompt"] + record["chosen"]
        assert record["rejected_text"] == record["prompt"] + record["rejected"]


def test_tokenizer_loads_round_trips_and_pads_with_eos(assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    assert len(tokenizer) == 4096
    assert tokenizer.model_max_length == 1024
    assert tokenizer.pad_token == tokenizer.eos_token == tokenizer.bos_token == EOS
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    for text in ("Question: What is 7 plus 5?\n\nAnswer: The answer is 12.",
                 "Return the number of items in the list, or None.", "naïve café 🤖 -- 12.5%"):
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    # trained on the demo data, so its words are whole tokens
    headline = "Shares of Northwind Corp surged 12% after the company beat expectations"
    assert len(tokenizer(headline)["input_ids"]) <= 14


def test_corpus_is_real_english_over_a_megabyte(assets):
    texts = column(assets["corpus"], "text")
    assert sum(len(t.encode()) for t in texts) > 1_000_000
    assert len(set(texts)) == len(texts)
    assert all(len(t) >= 80 for t in texts)
    words = " ".join(texts).lower().split()
    for common in ("the", "return", "is", "of", "and"):
        assert words.count(common) > 100, common


def test_configs_use_valid_keys(assets):
    from transformers import GPT2Config, LlamaConfig, OPTConfig

    for name, config_class in (("gpt2", GPT2Config), ("opt", OPTConfig), ("llama", LlamaConfig)):
        overrides = json.loads((Path(assets["configs"]) / f"{name}.json").read_text())
        valid = set(config_class().to_dict())
        assert overrides and set(overrides) <= valid, name
        assert "vocab_size" not in overrides
        config = config_class(**overrides)
        assert all(getattr(config, k) == v for k, v in overrides.items())


def test_lm_task_points_at_the_sentiment_eval_split(assets):
    folder = Path(assets["lm_tasks"])
    task = yaml.safe_load((folder / "demo_sentiment.yaml").read_text())
    assert task["task"] == "demo_sentiment"
    assert task["output_type"] == "multiple_choice"
    assert task["doc_to_choice"] == list(SENTIMENT_LABELS)
    assert task["doc_to_text"] == "{{instruction}}\n\nContent: {{input}}\n\nSentiment:"
    data = Path(task["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data.is_file()
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    assert docs == rows(assets["sentiment_eval"])
    import jinja2

    target = jinja2.Template(task["doc_to_target"])
    assert all(int(target.render(**doc)) == SENTIMENT_LABELS.index(doc["output"]) for doc in docs)
    assert {m["metric"] for m in task["metric_list"]} == {"acc", "acc_norm"}
    assert all(m["higher_is_better"] for m in task["metric_list"])


def test_reward_tokenizer_differs_from_the_policy_tokenizer(assets):
    from transformers import AutoTokenizer

    policy = AutoTokenizer.from_pretrained(assets["tokenizer"])
    reward = AutoTokenizer.from_pretrained(assets["reward_tokenizer"])
    assert policy.get_vocab() != reward.get_vocab()
    ids = reward("Shares plunged.")["input_ids"]
    assert ids[0] == reward.cls_token_id and ids[-1] == reward.sep_token_id


def test_reward_tokenizer_is_the_same_every_time(tmp_path):
    """The reward model's vocabulary must not vary from build to build (the tokenizers
    trainer's did, through hash-map tie-breaking, and the reward model's accuracy with it)."""
    from llmctl.demo.assets import train_wordpiece_tokenizer

    words = ["plunged", "surged", "rose", "fell", "kept", "shares", "profit", "outlook", "cut"]
    texts = [" ".join(words[i:] + words[:i]) + f" {i}%" for i in range(len(words))] * 2
    for name in ("first", "second"):
        train_wordpiece_tokenizer(tmp_path / name, texts)
    first, second = ((tmp_path / n / "tokenizer.json").read_text() for n in ("first", "second"))
    assert first == second
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "first")
    assert tokenizer.tokenize("Shares plunged") == ["shares", "plunged"]
    unseen = tokenizer.tokenize("plunging")  # not a word of the texts: spelled out
    assert unseen == ["p", "##l", "##u", "##n", "##g", "##i", "##n", "##g"]


def test_sentiment_preferences_prefer_the_right_label(assets):
    prefs = column(assets["sentiment_prefs_eval"], "chosen")
    rows = column(assets["sentiment_eval"], "output")
    assert [c.strip() for c in prefs] == [label for label in rows for _ in range(2)]
    rejected = column(assets["sentiment_prefs_eval"], "rejected")
    assert all(c != r for c, r in zip(prefs, rejected))
    # each row: the right label over a wrong one, and over a non-answer a policy samples
    labels = sum(r.strip() in SENTIMENT_LABELS for r in rejected)
    assert labels == len(rejected) // 2


def test_newswire_in_corpus_leaves_eval_headlines_out(assets):
    corpus = "\n".join(column(assets["corpus"], "text"))
    held_out = column(assets["sentiment_eval"], "input")
    assert "Shares of" in corpus or "profit" in corpus
    assert not any(h + "." in corpus for h in held_out)
