"""GRPO's rewards: each a function with trl's reward-function signature.

trl calls ``f(prompts=..., completions=..., completion_ids=..., **columns)`` with one entry per
completion, ``columns`` being the dataset's other columns (here: the prompt row's fields), and
reads one float per completion. A recipe lists rewards under ``[[grpo.rewards]]`` (or
``[[rloo.rewards]]``); they are weighted and summed by trl.
"""

from __future__ import annotations

import importlib
import re
import string
from typing import Any, Callable

from llmctl.data import Template
from llmctl.errors import UserError
from llmctl.schema import FunctionReward, GrpoReward, LabelMatchReward, LengthReward, \
    ModelReward, RegexReward

_PUNCTUATION = string.punctuation + "“”‘’"


def first_word(text: str) -> str:
    """The first word of a completion, lower case, without surrounding punctuation."""
    words = text.split()
    return words[0].strip(_PUNCTUATION).lower() if words else ""


class LabelMatch:
    """1.0 when the completion starts with the row's label (``label_match``), else 0.0."""

    def __init__(self, field: str):
        self.field = field
        self.__name__ = "label_match"

    def __call__(self, completions: list[str], **columns: Any) -> list[float]:
        labels = columns[self.field]
        return [float(first_word(text) == str(label).strip().lower())
                for text, label in zip(completions, labels)]


class RegexMatch:
    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern)
        self.__name__ = "regex"

    def __call__(self, completions: list[str], **columns: Any) -> list[float]:
        return [float(self.pattern.search(text) is not None) for text in completions]


class LengthBand:
    def __init__(self, min_tokens: int, max_tokens: int):
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.__name__ = "length"

    def __call__(self, completion_ids: list[list[int]], **columns: Any) -> list[float]:
        return [float(self.min_tokens <= len(ids) <= self.max_tokens) for ids in completion_ids]


class ModelScore:
    """A reward model's score of each completion, read as text with the reward model's own
    tokenizer: the prompt and the completion, or ``text`` (a format over the row's fields and
    {response}, the completion alone) so that it reads what it was trained on."""

    def __init__(self, model, tokenizer, text: str | None, max_length: int, batch_size: int):
        self.model, self.tokenizer = model, tokenizer
        self.format = Template(text) if text else None
        self.max_length, self.batch_size = max_length, batch_size
        self.__name__ = "reward_model"

    def texts(self, prompts: list[str], completions: list[str], **columns: Any) -> list[str]:
        if self.format is None:
            return [p + c for p, c in zip(prompts, completions)]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())] \
            if columns else [{} for _ in completions]
        return [self.format.render({**row, "response": c.strip()})
                for row, c in zip(rows, completions)]

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        from llmctl.evaluation import reward_scores

        fields = {k: v for k, v in columns.items() if k not in TRL_KWARGS}
        return reward_scores(self.model, self.tokenizer, self.texts(prompts, completions, **fields),
                             self.max_length, self.batch_size)


# What trl passes besides the dataset's columns.
TRL_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def load_function(spec: str, key: str) -> Callable:
    """``module:function`` from the recipe, imported only because the recipe names it."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"{key}: cannot import {module_name} ({err}); it must be importable "
                        f"(installed, or on PYTHONPATH)") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{key}: {module_name} has no function {name}")
    return function


def build_rewards(rewards: list[GrpoReward], label_field: str, reward_models: dict[int, tuple],
                  stage: str = "grpo") -> tuple[list[Callable], list[float]]:
    """The trl reward functions and their weights, in recipe order. ``reward_models`` maps the
    index of each ``kind = "model"`` reward to its loaded (model, tokenizer); ``stage`` names
    the table in errors."""
    funcs = []
    for i, reward in enumerate(rewards):
        if isinstance(reward, LabelMatchReward):
            funcs.append(LabelMatch(reward.field or label_field))
        elif isinstance(reward, RegexReward):
            funcs.append(RegexMatch(reward.pattern))
        elif isinstance(reward, LengthReward):
            funcs.append(LengthBand(reward.min_tokens, reward.max_tokens))
        elif isinstance(reward, ModelReward):
            model, tokenizer = reward_models[i]
            funcs.append(ModelScore(model, tokenizer, reward.text, reward.max_length,
                                    reward.batch_size))
        elif isinstance(reward, FunctionReward):
            funcs.append(load_function(reward.function, f"{stage}.rewards[{i}].function"))
    return funcs, [reward.weight for reward in rewards]


def weighted_rewards(funcs: list[Callable], weights: list[float], prompts: list[str],
                     completions: list[str], completion_ids: list[list[int]],
                     columns: dict[str, list]) -> list[float]:
    """The summed reward GRPO maximises, of completions outside training (held-out scoring)."""
    total = [0.0] * len(completions)
    for func, weight in zip(funcs, weights):
        scores = func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                      **columns)
        total = [t + weight * float(s) for t, s in zip(total, scores)]
    return total
