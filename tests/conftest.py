"""Shared fixtures: the demo assets (built once per session, offline) and tiny recipes."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("WANDB_MODE", "disabled")
# `make test` runs two workers on CI's two cores, each torch with two threads. OpenMP's default
# spin-waiting makes two such processes slow each other 5-10x; sleeping threads cost nothing
# measurable alone (0.48 vs 0.50 s per demo pretraining step) and let both run (0.79 s each).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY_OPT = ("{ num_hidden_layers = 2, hidden_size = 64, ffn_dim = 128, num_attention_heads = 4, "
            "max_position_embeddings = 128, word_embed_proj_dim = 64, init_std = 0.05 }")


@pytest.fixture(scope="session", autouse=True)
def scratch_tmpdir(tmp_path_factory):
    """Temporary files of this process and its subprocesses go under pytest's own (rotated)
    base directory: wandb's media/artifact directories, for one, stay behind in /tmp when a
    process is killed, as the kill/resume tests do."""
    scratch = tmp_path_factory.mktemp("tmp")
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(scratch))
    patch.setattr(tempfile, "tempdir", str(scratch))
    yield scratch
    patch.undo()


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    from llmctl.demo.assets import build_assets

    return build_assets(tmp_path_factory.mktemp("assets"), seed=0)


@pytest.fixture(scope="session")
def tokenizer(assets):
    from llmctl.models import load_tokenizer

    return load_tokenizer(assets["tokenizer"])


def recipe_head(run_dir, name: str = "tiny", tokenizer: str | None = None, **sources: dict) -> str:
    """The top every test recipe shares: [run] (seed 0), an optional [model] tokenizer, and one
    [data.<name>] table per keyword (a dict of its keys)."""
    text = f'[run]\nname = "{name}"\ndir = "{run_dir}"\nseed = 0\n'
    if tokenizer:
        text += f'[model]\ntokenizer = "{tokenizer}"\n'
    for source, keys in sources.items():
        text += f"[data.{source}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    return text


def corpus_source(assets) -> dict:
    """The demo corpus, 400 rows, 2% held out: pretraining and perplexity data."""
    return {"path": assets["corpus"], "eval_fraction": 0.02, "limit": 400}


def sentiment_source(assets, **keys) -> dict:
    """The demo's labelled news headlines with its held-out split."""
    return {"path": assets["sentiment_train"], "eval_path": assets["sentiment_eval"],
            "template": "sentiment", **keys}


def tiny_recipe_text(assets, run_dir, **tables) -> str:
    """A tiny recipe on the demo assets: pretrain (a few steps) and generate; extend via tables."""
    text = recipe_head(run_dir, tokenizer=assets["tokenizer"], corpus=corpus_source(assets)) + f"""
[pretrain]
data = "corpus"
architecture = "opt"
config = {TINY_OPT}
seq_len = 64
batch_size = 8
max_steps = 30
lr = 3e-3
warmup_steps = 2
logging_steps = 5
save_steps = 10
eval_max_batches = 2

[generate]
prompts = ["The function"]
max_new_tokens = 8
"""
    for name, body in tables.items():
        text += f"\n[{name}]\n{body}\n"
    return text


@pytest.fixture
def tiny_recipe(tmp_path, assets):
    """Write a tiny recipe file; returns its path. Keyword args add or replace TOML text."""

    def make(extra: str = "", name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(tiny_recipe_text(assets, tmp_path / "run") + extra)
        return path

    return make


def run_cli(args, capsys=None):
    """Run the llmctl CLI in-process; returns (exit code, stdout, stderr)."""
    from llmctl.cli import main

    old = sys.argv
    sys.argv = ["llmctl", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def manifest(stage_dir) -> dict:
    return json.loads((Path(stage_dir) / "manifest.json").read_text())


@pytest.fixture(scope="session")
def pretrained_model(assets, tmp_path_factory):
    """A tiny OPT model pretrained for a few steps on the demo corpus (built once per session)."""
    from llmctl.pipeline import run_stage
    from llmctl.recipe import load_recipe

    root = tmp_path_factory.mktemp("pretrained")
    path = root / "recipe.toml"
    path.write_text(tiny_recipe_text(assets, root / "run"))
    run_stage(load_recipe(path), "pretrain")
    return root / "run" / "pretrain" / "model"


TINY_TEXTS = [
    "The function returns the value of the key.", "Shares of the bank rose after strong results.",
    "Profit fell as costs climbed.", "The company cut its outlook for the year.",
    "Question: What is 2 plus 3? Answer: 5.", "The quick brown fox jumps over the lazy dog.",
] * 4


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A purpose-built tiny causal LM (random 2-layer OPT, tied head) and a small BPE tokenizer,
    in well under a second: for unit tests that need a model but not a trained one."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from llmctl.demo.assets import train_tokenizer
    from llmctl.models import load_tokenizer, save_model

    folder = tmp_path_factory.mktemp("tiny_lm")
    train_tokenizer(folder, TINY_TEXTS)
    tokenizer = load_tokenizer(str(folder))
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tokenizer), num_hidden_layers=2, hidden_size=32, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, init_std=0.05)
    save_model(OPTForCausalLM(config).eval(), tokenizer, folder)
    return folder


REPO = Path(__file__).parents[1]


def kill_when(args: list[str], ready, timeout: float = 180) -> None:
    """Start `python -m llmctl ARGS`, SIGKILL it once ready() is true (it must still be running),
    with every process it started (torchrun and its ranks): as when the machine dies."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "llmctl", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the stage finished before it could be killed"
    kill_tree(proc.pid)
    proc.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun starts each rank in a
    session of its own, so a process group does not cover them)."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_llmctl(args: list[str]):
    """`python -m llmctl ARGS` in a subprocess (a fresh process, as a user's rerun is)."""

    return subprocess.run([sys.executable, "-m", "llmctl", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


# Tiers. `make test-fast` (the edit-test loop) runs `-m "not slow and not assets"`. A test is
# marked `assets` here when it requests the demo assets, even through another fixture, and a
# test not marked `slow` cannot start a process: the tiers cannot drift from what tests do.
#
# Under `make test`'s workers (whole files per worker, in this order) the two longest files start
# first, one on each worker, so that neither is left running alone at the end.
LONGEST_FILES = ("test_demo.py", "test_real.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "assets" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.assets)
    items.sort(key=lambda item: item.path.name not in LONGEST_FILES)  # stable: the rest keep order


@pytest.fixture(autouse=True)
def _no_llmctl_process_unless_slow(request, monkeypatch):
    """A test not marked slow may not start llmctl (or lm_eval, torchrun) in a new process.
    Libraries' own quick probes (cpuinfo runs `file`, `python -c`) are left alone."""
    if request.node.get_closest_marker("slow"):
        return
    start = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        words = [str(a) for a in ([args] if isinstance(args, (str, os.PathLike)) else args)]
        if any(w in ("llmctl", "lm_eval", "torchrun") or w.endswith(("/llmctl", "/torchrun"))
               for w in words):
            raise AssertionError(f"{request.node.nodeid} starts `{' '.join(words)[:80]}`: "
                                 f"mark it @pytest.mark.slow")
        start(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
