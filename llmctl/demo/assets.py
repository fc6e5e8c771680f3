"""Demo assets: everything the pipeline's stages need to run offline, built from a seed.

:func:`build_assets` writes, under one directory and without downloading anything:

- ``corpus``: a pretraining corpus of real English, the installed standard library's docstrings,
  plus an unlabelled newswire of synthetic financial headlines (the domain the SFT data is in);
- ``tokenizer``: a byte-level BPE tokenizer trained on the corpus and the instruction data;
- ``reward_tokenizer``: a WordPiece vocabulary for an encoder reward model (a different tokenizer);
- ``configs``: tiny GPT-2, OPT and Llama config overrides;
- ``qa_*``: question/answer pairs whose answers can be checked (arithmetic, word facts, spelling);
- ``sentiment_*``: synthetic financial headlines in FinGPT's instruction/input/output layout;
- ``prefs_*``: chosen/rejected preference pairs in the Anthropic hh-rlhf spirit;
- ``sentiment_prefs_*``: preference pairs on the sentiment task (right label over a wrong one);
- ``prompts_*``: questions for PPO in the Alpaca-OrcaChat layout;
- ``lm_tasks``: an lm-evaluation-harness task over the sentiment eval split.

Every dataset is a Deep Lake dataset and every record comes from a ``random.Random`` seeded from
``seed``, so two builds with the same seed give the same records in the same order and the same
tokenizer. Eval splits never share a question or headline with train splits.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from llmctl.data import Template, write_dataset
from llmctl.evaluation import write_choice_task

# Bump when the contents change, so that directories built by an older version are rebuilt.
ASSETS_VERSION = 7
MANIFEST = "ASSETS.json"

# name -> path under dest/
LAYOUT = {
    "corpus": "corpus",
    "tokenizer": "tokenizer",
    "reward_tokenizer": "reward_tokenizer",
    "configs": "configs",
    "qa_train": "qa_train",
    "qa_eval": "qa_eval",
    "sentiment_train": "sentiment_train",
    "sentiment_eval": "sentiment_eval",
    "prefs_train": "prefs_train",
    "prefs_eval": "prefs_eval",
    "prompts_train": "prompts_train",
    "prompts_eval": "prompts_eval",
    "sentiment_prefs_train": "sentiment_prefs_train",
    "sentiment_prefs_eval": "sentiment_prefs_eval",
    "lm_tasks": "lm_tasks",
}

# (train rows, eval rows) per dataset
QA_ROWS = (600, 100)
SENTIMENT_ROWS = (600, 150)
PREFS_ROWS = (500, 100)
PROMPTS_ROWS = (200, 50)
SENTIMENT_SHARE = 0.3  # of the preference pairs and PPO prompts; the rest are Q/A

CORPUS_MAX_BYTES = 2_500_000  # of docstrings
NEWSWIRE_HEADLINES = 6000  # unlabelled headlines, five to a paragraph, added to the corpus
VOCAB_SIZE = 4096
REWARD_VOCAB_SIZE = 2048
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 1024


def build_assets(dest: Path, seed: int = 0, force: bool = False) -> dict[str, str]:
    """Build everything under dest/ (skip if dest/ASSETS.json exists with the same seed and version,
    unless force). Returns name->absolute path; dest/ASSETS.json records them relative to dest,
    so a moved run directory keeps its assets."""
    dest = Path(dest).resolve()
    paths = {name: str(dest / rel) for name, rel in LAYOUT.items()}
    manifest = dest / MANIFEST
    if not force and _is_built(manifest, seed, paths):
        return paths
    dest.mkdir(parents=True, exist_ok=True)
    # Removed first and written last: a build that stops half-way leaves no manifest behind.
    manifest.unlink(missing_ok=True)

    qa_train, qa_eval = qa_pairs(_rng(seed, "qa"), *QA_ROWS)
    sentiment_train, sentiment_eval = sentiment_records(_rng(seed, "sentiment"), *SENTIMENT_ROWS)

    corpus = stdlib_docstrings(seed) + newswire(_rng(seed, "newswire"), sentiment_eval)
    random.Random(seed).shuffle(corpus)
    write_dataset(paths["corpus"], [{"text": text} for text in corpus],
                  "stdlib docstrings + newswire", overwrite=True)
    # Preference pairs and PPO prompts ask the same kinds of question; drawn from the matching
    # split, so no eval question is ever seen in training.
    splits = {"train": (qa_train, [_sentiment_question(r) for r in sentiment_train]),
              "eval": (qa_eval, [_sentiment_question(r) for r in sentiment_eval])}
    prefs_rng, prompts_rng = _rng(seed, "prefs"), _rng(seed, "prompts")
    datasets = {
        "qa_train": [p.record() for p in qa_train],
        "qa_eval": [p.record() for p in qa_eval],
        "sentiment_train": sentiment_train,
        "sentiment_eval": sentiment_eval,
    }
    for i, split in enumerate(("train", "eval")):
        datasets[f"prefs_{split}"] = preference_records(
            prefs_rng, _mix_questions(prefs_rng, *splits[split], PREFS_ROWS[i]))
        datasets[f"prompts_{split}"] = prompt_records(
            prompts_rng, _mix_questions(prompts_rng, *splits[split], PROMPTS_ROWS[i]))
    sentiment_prefs_rng = _rng(seed, "sentiment_prefs")
    datasets["sentiment_prefs_train"] = sentiment_preference_records(sentiment_prefs_rng,
                                                                     sentiment_train)
    datasets["sentiment_prefs_eval"] = sentiment_preference_records(sentiment_prefs_rng,
                                                                    sentiment_eval)
    for name, records in datasets.items():
        write_dataset(paths[name], records, f"demo {name} (seed {seed})", overwrite=True)

    write_lm_task(Path(paths["lm_tasks"]), sentiment_eval)
    train_tokenizer(Path(paths["tokenizer"]), corpus + list(_instruction_texts(datasets)))
    train_wordpiece_tokenizer(Path(paths["reward_tokenizer"]), list(_instruction_texts(datasets)))
    write_configs(Path(paths["configs"]))

    manifest.write_text(json.dumps({"seed": seed, "version": ASSETS_VERSION, "paths": LAYOUT},
                                   indent=2) + "\n")
    return paths


def _is_built(manifest: Path, seed: int, paths: dict[str, str]) -> bool:
    try:
        built = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return (built.get("seed") == seed and built.get("version") == ASSETS_VERSION
            and built.get("paths") == LAYOUT and all(Path(p).exists() for p in paths.values()))


def _rng(seed: int, purpose: str) -> random.Random:
    # One stream per purpose, so changing one generator does not reshuffle the others.
    # String seeds are hashed with SHA-512, which is stable across processes.
    return random.Random(f"{seed}:{purpose}")


def _mix_questions(rng: random.Random, qa: list[QAPair], sentiment: list[QAPair], n: int
                   ) -> list[QAPair]:
    n_sentiment = round(n * SENTIMENT_SHARE)
    mixed = rng.sample(qa, n - n_sentiment) + rng.sample(sentiment, n_sentiment)
    rng.shuffle(mixed)
    return mixed


def _split_evenly(items: list, n_eval: int) -> tuple[list, list]:
    """(train, eval): eval takes n_eval evenly spaced items, so if items are grouped by kind
    (template family, label), every kind appears in eval in proportion."""
    eval_at = {(2 * j + 1) * len(items) // (2 * n_eval) for j in range(n_eval)}
    train = [x for i, x in enumerate(items) if i not in eval_at]
    return train, [items[i] for i in sorted(eval_at)]


# -- corpus: standard-library docstrings ---------------------------------------------------------

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo",
             "__pycache__"}
DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Statements whose bodies may hold definitions (``if sys.platform == ...: def f(): ...``).
BLOCKS = (ast.If, ast.Try, ast.With, ast.For, ast.While)


def stdlib_docstrings(seed: int) -> list[str]:
    """The prose docstrings of the standard library's source, deduplicated, in a seeded order."""
    seen: set[str] = set()
    texts = []
    for source in _stdlib_sources():
        try:
            tree = ast.parse(source.read_bytes())
        except (SyntaxError, ValueError):  # a few files are deliberately not valid Python
            continue
        for doc in _docstrings(tree):
            text = _normalise(doc)
            if _is_prose(text) and text not in seen:
                seen.add(text)
                texts.append(text)
    random.Random(seed).shuffle(texts)
    corpus, size = [], 0
    for text in texts:
        size += len(text.encode())
        if size > CORPUS_MAX_BYTES:
            break
        corpus.append(text)
    return corpus


def _stdlib_sources() -> list[Path]:
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)  # os.walk's order depends on the file system


def _docstrings(node: ast.AST) -> Iterator[str]:
    # Walks only definitions and the blocks around them: far faster than ast.walk over
    # every expression, and docstrings live nowhere else.
    doc = ast.get_docstring(node, clean=True)
    if doc:
        yield doc
    pending = list(node.body)
    while pending:
        child = pending.pop(0)
        if isinstance(child, DEFINITIONS):
            yield from _docstrings(child)
        elif isinstance(child, BLOCKS):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for statement in getattr(child, field, []):
                    pending += statement.body if isinstance(statement, ast.ExceptHandler) \
                        else [statement]


def _normalise(doc: str) -> str:
    """One line per paragraph; doctest paragraphs (``>>>``) dropped, being code, not prose."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", doc) if ">>>" not in p)
    return "\n\n".join(p for p in paragraphs if p)


def _is_prose(text: str) -> bool:
    if len(text) < 80:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return letters >= 0.6 * len(text)


# -- Q/A pairs with checkable answers -------------------------------------------------------------


class QAPair(NamedTuple):
    question: str
    answer: str
    family: str  # the template family; wrong answers for preference pairs come from its answers

    def record(self) -> dict[str, str]:
        return {"question": self.question, "answer": self.answer}


OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("high", "low"), ("long", "short"), ("old", "young"), ("wet", "dry"), ("rich", "poor"),
    ("push", "pull"), ("buy", "sell"), ("win", "lose"), ("in", "out"), ("left", "right"),
    ("day", "night"), ("black", "white"), ("thick", "thin"), ("strong", "weak"),
    ("loud", "quiet"), ("clean", "dirty"), ("above", "below"), ("first", "last"),
    ("inside", "outside"), ("true", "false"), ("give", "take"), ("north", "south"),
    ("east", "west"), ("asleep", "awake"), ("before", "after"), ("alive", "dead"),
    ("always", "never"), ("begin", "end"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("wide", "narrow"), ("sweet", "sour"),
]
WORDS = [
    "cat", "dog", "bird", "fish", "horse", "apple", "banana", "orange", "grape", "lemon", "table",
    "chair", "house", "garden", "river", "mountain", "ocean", "cloud", "rain", "snow", "water",
    "fire", "stone", "paper", "pencil", "book", "music", "window", "door", "bread", "butter",
    "cheese", "milk", "coffee", "sugar", "salt", "green", "yellow", "purple", "silver", "gold",
    "planet", "star", "moon", "market", "money", "bank", "stock", "price", "trade", "city",
    "train", "road", "bridge", "tiger", "zebra", "rabbit", "monkey", "camera", "guitar",
    "doctor", "friend", "summer", "winter",
]  # no palindromes: spelled backwards, each differs from itself
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"),
    ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Denmark", "Copenhagen"),
    ("Hungary", "Budapest"), ("Belgium", "Brussels"), ("Argentina", "Buenos Aires"),
]


def _all_opposites() -> list[tuple[str, str]]:
    both_ways = OPPOSITES + [(b, a) for a, b in OPPOSITES]
    return [(f"What is the opposite of {a}?", b) for a, b in both_ways]


# family -> (its share of the Q/A rows, every question it can ask with its answer).
# Each family can ask at least share * 700 distinct questions; addition can ask many more, so it
# also takes up what rounding the shares leaves over.
QA_FAMILIES: dict[str, tuple[float, Callable[[], list[tuple[str, str]]]]] = {
    "addition": (0.22, lambda: [(f"What is {a} plus {b}?", str(a + b))
                                for a in range(21) for b in range(21)]),
    "subtraction": (0.16, lambda: [(f"What is {a} minus {b}?", str(a - b))
                                   for a in range(21) for b in range(a + 1)]),
    "multiplication": (0.12, lambda: [(f"What is {a} times {b}?", str(a * b))
                                      for a in range(1, 11) for b in range(1, 11)]),
    "next_number": (0.08, lambda: [(f"What number comes after {n}?", str(n + 1))
                                   for n in range(100)]),
    "larger": (0.13, lambda: [(f"Which is larger, {a} or {b}?", str(max(a, b)))
                              for a in range(30) for b in range(30) if a != b]),
    "opposite": (0.10, _all_opposites),
    "backwards": (0.08, lambda: [(f"Spell the word {w} backwards.", w[::-1]) for w in WORDS]),
    "letters": (0.08, lambda: [(f"How many letters are in the word {w}?", str(len(w)))
                               for w in WORDS]),
    "capital": (0.03, lambda: [(f"What is the capital of {c}?", city) for c, city in CAPITALS]),
}


def qa_pairs(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[QAPair], list[QAPair]]:
    """(train, eval) Q/A pairs, all questions distinct, every family in both splits."""
    total = n_train + n_eval
    counts = {family: round(share * total) for family, (share, _) in QA_FAMILIES.items()}
    counts["addition"] += total - sum(counts.values())
    pairs = []  # grouped by family, for _split_evenly
    for family, (_, questions) in QA_FAMILIES.items():
        pairs += [QAPair(q, a, family) for q, a in rng.sample(questions(), counts[family])]
    train, held_out = _split_evenly(pairs, n_eval)
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def _family_answers() -> dict[str, list[str]]:
    answers = {family: sorted({a for _, a in questions()})
               for family, (_, questions) in QA_FAMILIES.items()}
    answers["sentiment"] = list(SENTIMENT_LABELS)
    return answers


# -- financial sentiment (FinGPT layout) ----------------------------------------------------------

SENTIMENT_LABELS = ("negative", "neutral", "positive")
SENTIMENT_INSTRUCTIONS = [
    "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
    "What is the sentiment of this headline? Please choose an answer from "
    "{negative/neutral/positive}.",
    "What is the sentiment of this financial news? Please choose an answer from "
    "{negative/neutral/positive}.",
]
# The label is carried by the cue phrase of the template; the fields around it vary.
HEADLINES = {
    "positive": [
        "{co} said its {quarter} profit rose {pct}% to {money}",
        "Shares of {co} surged {pct}% after the company beat expectations",
        "{co} beat expectations as {quarter} revenue grew to {money}",
        "{co} raised its dividend to {cents} cents per share",
        "{co} won a {money} contract to supply {product}",
        "{co} lifted its {year} profit forecast on strong demand for {product}",
        "Net sales at {co} climbed {pct}% year on year",
        "{co} reported record earnings of {money} as orders for {product} jumped",
    ],
    "negative": [
        "Shares of {co} plunged {pct}% after a profit warning",
        "{co} posted a {quarter} loss of {money}",
        "{co} cut its outlook for {year} as demand for {product} weakened",
        "{co} announced {count} layoffs at its {city} plant",
        "{co} missed expectations as {quarter} sales fell {pct}%",
        "{co} suspended its dividend after a loss of {money}",
        "Regulators fined {co} {money} over accounting failures",
        "{co} shares slumped {pct}% on weak demand for {product}",
    ],
    "neutral": [
        "{co} will hold its annual meeting on {month} {day}",
        "{co} appointed a new CFO effective {month} {day}",
        "{co} reported {quarter} results in line with expectations",
        "{co} will publish its {quarter} report on {month} {day}",
        "{co} moved its headquarters to {city}",
        "{co} said its chief executive will speak at an investor conference in {city}",
        "{co} kept its {year} guidance unchanged at {money}",
        "{co} renamed its {product} unit, effective {month} {day}",
    ],
}
# Label-free filler around the cue; the empty strings make bare headlines the most common.
HEADLINE_OPENERS = ["", "", "", "{city}, {month} {day} -- ", "UPDATE: ",
                    "{month} {day} ({city}) - "]
HEADLINE_CLOSERS = ["", "", "", ", the company said in a statement",
                    ", according to a stock exchange filing",
                    ", its chief executive told reporters", ", a spokesperson for the company said"]
COMPANY_NAMES = ["Northwind", "Acme", "Bluewater", "Silverline", "Redstone", "Greenfield",
                 "Ironbridge", "Lakeside", "Summit", "Harbor", "Pinecrest", "Goldleaf", "Skyward",
                 "Brightpath", "Oakridge", "Westfield", "Eastgate", "Stonebrook", "Clearview",
                 "Riverbend"]
COMPANY_KINDS = ["Corp", "Holdings", "Group", "Inc", "Bank", "Energy", "Motors", "Foods", "Pharma",
                 "Logistics", "Telecom", "Retail", "Steel", "Airlines", "Software"]
CITIES = ["Helsinki", "London", "Frankfurt", "New York", "Tokyo", "Toronto", "Sydney", "Mumbai",
          "Singapore", "Chicago", "Stockholm", "Paris"]
PRODUCTS = ["steel", "software", "paper", "chips", "fertilizer", "electric cars",
            "medical devices", "cloud services", "packaging", "furniture"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
QUARTERS = ["first-quarter", "second-quarter", "third-quarter", "fourth-quarter"]


def sentiment_records(rng: random.Random, n_train: int, n_eval: int
                      ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) FinGPT-style rows, labels balanced, no headline in both splits."""
    total = n_train + n_eval
    headlines: dict[str, str] = {}  # headline -> label; a dict keeps the order of generation
    for i, label in enumerate(SENTIMENT_LABELS):
        # labels share the rows as evenly as they can
        want = (i + 1) * total // len(SENTIMENT_LABELS)
        while len(headlines) < want:
            headlines.setdefault(_headline(rng, label), label)
    rows = [{"instruction": rng.choice(SENTIMENT_INSTRUCTIONS), "input": text, "output": label}
            for text, label in headlines.items()]
    train, held_out = _split_evenly(rows, n_eval)
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def newswire(rng: random.Random, held_out: list[dict[str, str]]) -> list[str]:
    """Unlabelled news paragraphs for the pretraining corpus.

    A base model has to have read the domain's words before an adapter can use them: OPT read
    news in its web corpus, and the demo's LoRA adapter on a base that never saw "plunged" or
    "dividend" stayed at chance on the sentiment task in our runs. No held-out headline
    appears here, and no label is attached to any headline.
    """
    excluded = {row["input"] for row in held_out}
    headlines = []
    while len(headlines) < NEWSWIRE_HEADLINES:
        text = _headline(rng, rng.choice(SENTIMENT_LABELS))
        if text not in excluded:
            headlines.append(text + ".")
    return [" ".join(headlines[i:i + 5]) for i in range(0, len(headlines), 5)]


def sentiment_preference_records(rng: random.Random, rows: list[dict[str, str]]
                                 ) -> list[dict[str, str]]:
    """Preference pairs on the SFT task itself: the prompt as the sentiment template renders it,
    the right label chosen over a worse response. A reward model trained on these scores what
    the SFT policy actually writes, so PPO has a signal to climb (the RLHF part of the demo).

    Two pairs per row: the right label over a wrong one, and the right label over one of the
    non-answers a small policy samples at temperature 1 (a word of the news, a piece of a word,
    a label that rambles on). Trained on wrong labels alone, the reward model never saw such
    text and scored some of it above the right label, which PPO then learned to write; with the
    non-answers in place of half the wrong labels, it told the labels apart too weakly and PPO
    settled on answering "negative" to everything.
    """
    template = Template.get("sentiment")
    records = []
    for i, row in enumerate(rows):
        prompt, chosen = template.split(row)
        wrong = rng.choice([lab for lab in SENTIMENT_LABELS if lab != row["output"]])
        words = re.findall(r"[A-Za-z]+", row["input"])
        kind = ("echo", "fragment", "ramble")[i % 3]
        if kind == "echo":  # a word of the news instead of a label
            non_answer = " " + rng.choice(words)
        elif kind == "fragment":  # a piece of a word, as sampling from a small vocabulary gives
            word = rng.choice([w for w in words if len(w) > 4] or words)
            start = rng.randrange(len(word) - 1)
            non_answer = rng.choice(["", " "]) + word[start:start + rng.randint(2, 4)]
        else:  # a label, then more words: the answer does not end where it should
            non_answer = " " + rng.choice(SENTIMENT_LABELS) + " " + " ".join(rng.sample(words, 2))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": " " + wrong})
        records.append({"prompt": prompt, "chosen": chosen, "rejected": non_answer})
    return records


def _headline(rng: random.Random, label: str) -> str:
    template = rng.choice(HEADLINE_OPENERS) + rng.choice(HEADLINES[label]) \
        + rng.choice(HEADLINE_CLOSERS)
    currency = rng.choice(["$", "EUR ", "GBP "])
    return template.format(
        co=f"{rng.choice(COMPANY_NAMES)} {rng.choice(COMPANY_KINDS)}",
        pct=rng.randint(2, 45),
        money=f"{currency}{rng.randint(2, 950)} million",
        cents=rng.randint(5, 95),
        count=rng.randint(40, 2500),
        quarter=rng.choice(QUARTERS),
        year=rng.choice([2024, 2025, 2026]),
        product=rng.choice(PRODUCTS),
        city=rng.choice(CITIES),
        month=rng.choice(MONTHS),
        day=rng.randint(1, 28),
    )


def _sentiment_question(row: dict[str, str]) -> QAPair:
    question = f'Is this news negative, neutral or positive? "{row["input"]}"'
    return QAPair(question, row["output"], "sentiment")


# -- preference pairs and PPO prompts -------------------------------------------------------------

POLITE_ANSWERS = ["The answer is {answer}.", "It is {answer}.", "Sure! The answer is {answer}.",
                  "I believe it is {answer}.", "Good question. The answer is {answer}."]
RUDE_ANSWERS = ["I don't care. Figure it out yourself", "Ugh, {answer}, obviously. Stop asking me",
                "Why would I tell you? Look it up", "{answer}, and that is a stupid question",
                "I don't care about your question"]
OFF_TOPIC_ANSWERS = ["I like turtles.", "Let me tell you about my weekend instead.",
                     "The weather is nice today, isn't it?", "My favourite colour is blue.",
                     "Have you ever tried baking bread at home?"]
REJECTED_KINDS = ("wrong", "rude", "repetitive", "off_topic")
ORCA_SYSTEM_PROMPT = ("You are a helpful assistant. Answer the question correctly and politely, "
                      "in one short sentence.")


def preference_records(rng: random.Random, pairs: list[QAPair]) -> list[dict[str, str]]:
    """Chosen: the right answer, politely, ending with a period. Rejected, in turn: a wrong answer,
    a rude one, a repetitive one, an off-topic one."""
    family_answers = _family_answers()
    records = []
    for i, pair in enumerate(pairs):
        prompt = f"Question: {pair.question}\n\nAnswer: "
        chosen = _polite(rng, pair.answer)
        kind = REJECTED_KINDS[i % len(REJECTED_KINDS)]
        if kind == "wrong":
            wrong = rng.choice([a for a in family_answers[pair.family] if a != pair.answer])
            rejected = _polite(rng, wrong)
        elif kind == "rude":
            rejected = rng.choice(RUDE_ANSWERS).format(answer=pair.answer)
        elif kind == "repetitive":
            word = rng.choice([pair.answer, "the answer", "yes", "um"])
            rejected = " ".join([word] * rng.randint(5, 9))
        else:
            rejected = rng.choice(OFF_TOPIC_ANSWERS)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                        "chosen_text": prompt + chosen, "rejected_text": prompt + rejected})
    return records


def prompt_records(rng: random.Random, pairs: list[QAPair]) -> list[dict[str, str]]:
    """Alpaca-OrcaChat rows: the system prompt, the question, a reference answer."""
    return [{"instruction": ORCA_SYSTEM_PROMPT, "input": pair.question,
             "output": _polite(rng, pair.answer)} for pair in pairs]


def _polite(rng: random.Random, answer: str) -> str:
    return rng.choice(POLITE_ANSWERS).format(answer=answer)


# -- lm-evaluation-harness task -------------------------------------------------------------------


def write_lm_task(folder: Path, sentiment_eval: list[dict[str, str]]) -> None:
    """``demo_sentiment``: multiple choice over the three labels, scored by log-likelihood."""
    write_choice_task(folder, "demo_sentiment", sentiment_eval,
                      "{{instruction}}\n\nContent: {{input}}\n\nSentiment:", "output",
                      list(SENTIMENT_LABELS))


# -- tokenizer ------------------------------------------------------------------------------------


def _instruction_texts(datasets: dict[str, list[dict[str, str]]]) -> Iterator[str]:
    """Every field of every row, and the rows as the course's templates render them, so that
    the words and the prompt scaffolding ("Question:", "Sentiment:") get tokens of their own."""
    qa, sentiment = Template.get("qa"), Template.get("sentiment")
    for name, records in datasets.items():
        for row in records:
            yield from row.values()
            if name.startswith("qa_"):
                yield qa.render(row)
            elif name in ("sentiment_train", "sentiment_eval"):
                yield sentiment.render(row)


def train_tokenizer(folder: Path, texts: list[str]) -> None:
    """Byte-level BPE (GPT-2's scheme) with one special token serving as bos, eos, unk and pad."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS,
                                        eos_token=EOS, unk_token=EOS, pad_token=EOS,
                                        model_max_length=MODEL_MAX_LENGTH,
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(str(folder))


def train_wordpiece_tokenizer(folder: Path, texts: list[str]) -> None:
    """A BERT-style WordPiece vocabulary for the demo's encoder reward model: deliberately not
    the policy's tokenizer, so PPO has to re-tokenize text for it (the course's DeBERTa case).

    The vocabulary is counted here, not by the ``tokenizers`` WordPiece trainer: that trainer
    breaks ties in Rust hash-map order, so its vocabulary, and the reward model trained on it,
    changed from process to process (one seed gave 96.0%, 90.7% and 83.3% held-out accuracy).
    Here: the special tokens, every character alone and as a "##" continuation, then the words
    seen at least twice, most frequent first, ties by spelling. A rarer word is spelled out
    in pieces, as WordPiece does with any word outside its vocabulary.
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import BertProcessing
    from transformers import BertTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for text in texts for word, _ in
                     pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({char for word in counts for char in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    words = sorted((w for w, n in counts.items() if n >= 2 and len(w) > 1),
                   key=lambda w: (-counts[w], w))
    vocab += words[:REWARD_VOCAB_SIZE - len(vocab)]
    wordpiece = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)},
                                           unk_token="[UNK]"))
    wordpiece.normalizer, wordpiece.pre_tokenizer = normalizer, pre_tokenizer
    wordpiece.decoder = decoders.WordPiece()
    # [CLS] text [SEP], as BERT was trained: the classifier reads the [CLS] position.
    wordpiece.post_processor = BertProcessing(("[SEP]", vocab.index("[SEP]")),
                                              ("[CLS]", vocab.index("[CLS]")))
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, do_lower_case=True,
                                  model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))


# -- tiny model configs ---------------------------------------------------------------------------

# Overrides of the Hugging Face configs; the caller adds vocab_size and the special token ids.
TINY_CONFIGS = {
    "gpt2": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256},
    "opt": {"num_hidden_layers": 2, "hidden_size": 128, "ffn_dim": 512, "num_attention_heads": 4,
            "max_position_embeddings": 256, "word_embed_proj_dim": 128},
    "llama": {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 344,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
}


def write_configs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, overrides in TINY_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(overrides, indent=2) + "\n")
