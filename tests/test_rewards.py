"""GRPO's rewards: each built-in reward on known completions, a model reward scoring exactly
what its reward model scores, user functions, and the recipe rules (exit 2 on bad input)."""

import sys

import pytest

from llmctl.errors import UserError
from llmctl.rewards import LabelMatch, LengthBand, ModelScore, RegexMatch, build_rewards, \
    first_word, load_function, weighted_rewards
from llmctl.schema import GrpoConfig
from tests.conftest import run_cli


def test_label_match_reads_the_first_word():
    reward = LabelMatch("output")
    completions = [" Negative. It fell", "positive", "neutral-ish", "", "the answer: negative"]
    labels = ["negative", "positive", "neutral", "neutral", "negative"]
    assert reward(prompts=[""] * 5, completions=completions, completion_ids=[[]] * 5,
                  output=labels) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert first_word("  “Positive!” yes") == "positive"


def test_regex_and_length_bands():
    regex = RegexMatch(r"^(negative|neutral|positive)\b")
    assert regex(completions=["positive.", "so positive", "neutral"]) == [1.0, 0.0, 1.0]
    length = LengthBand(2, 3)
    assert length(completion_ids=[[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]) == [0, 1, 1, 0]


def test_model_reward_scores_the_text_its_model_scores(assets):
    """The score trl receives is the reward model's own score of the formatted text."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from llmctl.evaluation import reward_scores

    tokenizer = AutoTokenizer.from_pretrained(assets["reward_tokenizer"])
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=1)).eval()
    reward = ModelScore(model, tokenizer, "{response}: {input}", 64, 2)
    rows = {"input": ["Shares fell.", "Profit rose."], "output": ["negative", "positive"]}
    scores = reward(prompts=["p1", "p2"], completions=[" negative", " neutral"],
                    completion_ids=[[1], [2]], trainer_state=None, **rows)
    texts = ["negative: Shares fell.", "neutral: Profit rose."]
    assert scores == pytest.approx(reward_scores(model, tokenizer, texts, 64, 2))
    plain = ModelScore(model, tokenizer, None, 64, 2)
    assert plain.texts(["Q: a", "Q: b"], [" x", " y"]) == ["Q: a x", "Q: b y"]


def test_rewards_are_weighted_and_summed(monkeypatch, tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, completion_ids, **kw):\n"
        "    return [1.0 / len(ids) for ids in completion_ids]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = GrpoConfig.model_validate({"rewards": [
        {"kind": "label_match", "weight": 2.0}, {"kind": "function", "function": "my_rewards:brevity"}]})
    funcs, weights = build_rewards(cfg.rewards, "output", {})
    assert weights == [2.0, 1.0]
    total = weighted_rewards(funcs, weights, ["p", "p"], [" positive", " negative"],
                             [[5], [5, 6]], {"output": ["positive", "positive"]})
    assert total == pytest.approx([2.0 + 1.0, 0.0 + 0.5])
    sys.modules.pop("my_rewards", None)


def test_user_function_must_exist():
    with pytest.raises(UserError, match="cannot import no_such_module_xyz"):
        load_function("no_such_module_xyz:f", "grpo.rewards[0].function")
    with pytest.raises(UserError, match="has no function nope"):
        load_function("json:nope", "grpo.rewards[0].function")


@pytest.mark.parametrize("table, message", [
    ('batch_size = 12\n[[grpo.rewards]]\nkind = "label_match"',
     "grpo.batch_size: batch_size x grad_accum (12 x 1) must be a multiple of num_generations"),
    ('[[grpo.rewards]]\nkind = "regex"\npattern = "(unclosed"', "grpo.rewards.0.pattern: not a regular"),
    ('[[grpo.rewards]]\nkind = "function"\nfunction = "not a spec"', "expected module:function"),
    ('[[grpo.rewards]]\nkind = "vibes"', "grpo.rewards.0"),
    ('[[grpo.rewards]]\nkind = "regex"\npattern = "x"\nweight = inf', "grpo.rewards.0.weight: "),
    ('num_generations = 8', "grpo.rewards: missing required key"),
    ('[[grpo.rewards]]\nkind = "function"\nfunction = "no_such_module_xyz:f"',
     "grpo.rewards[0].function: no module no_such_module_xyz"),
    ('[[grpo.rewards]]\nkind = "model"\nmodel = "m"\ntext = "{response}: {nope}"',
     "grpo.rewards[0].text: {nope} is not a field of the prompts"),
])
def test_bad_grpo_tables_are_exit_2(tmp_path, assets, capsys, table, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[data.s]\npath = "{assets["sentiment_train"]}"\ntemplate = "sentiment"\n'
                      f'[grpo]\ndata = "s"\nmodel = "{tmp_path}"\n{table}\n')
    code, _, err = run_cli(["grpo", str(recipe), "--dry-run"], capsys)
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and err.count("\n") == 1
