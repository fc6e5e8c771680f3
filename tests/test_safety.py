"""Safety guarantees (issue: "Safety first"): bad input is exit 2 with one line and a run
directory left exactly as it was; no code runs through a path; llmctl deletes only what it
wrote; run directories move; one process per run directory; interrupted work survives a bad
rerun; only what changed reruns."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, manifest, run_cli, tiny_recipe_text


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its content digest (symlinks by target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


# -- the bad-input table -------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory, assets, pretrained_model):
    """A project directory: a recipe with several stages, a run whose pretrain finished, a
    user's own `bench/` folder inside the run directory, and some bad files to point at."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("project")
    recipe = root / "recipe.toml"
    text = tiny_recipe_text(assets, root / "run").replace(
        "[generate]\n", f'[generate]\nmodel = "{root / "run" / "pretrain" / "model"}"\n')
    recipe.write_text(text + f"""
[data.sentiment]
path = "{assets['sentiment_train']}"
eval_path = "{assets['sentiment_eval']}"
template = "sentiment"

[sft]
data = "sentiment"
seq_len = 64
max_steps = 2

[merge]

[bench]
models = ["{root / 'run' / 'pretrain' / 'model'}"]
tasks = ["demo_sentiment"]
task_path = "{assets['lm_tasks']}"
latency = {{ runs = 0 }}

[quantize]
model = "{root / 'run' / 'pretrain' / 'model'}"
backend = "torch"
method = "dynamic"
bits = 8
data = "corpus"
""")
    code, _, err = run_cli(["pretrain", recipe])
    assert code == 0, err
    (root / "run" / "bench").mkdir()
    (root / "run" / "bench" / "notes.txt").write_text("a user's own folder, named like a stage")
    bad = root / "bad"
    bad.mkdir()
    (bad / "latin1.toml").write_bytes("[run]\nname = \"caf\xe9\"\n".encode("latin-1"))
    (bad / "syntax.toml").write_text("[run\nname = 1\n")
    (bad / "prompts_no_key.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    (bad / "prompts_bad_json.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n')
    (bad / "prompts_latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (bad / "rows_latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    (bad / "rows_bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (bad / "rows.jsonl").write_text('{"text": "a"}\n')
    (bad / "loop").symlink_to(bad / "loop")
    (bad / "empty_tokenizer").mkdir()
    truncated = bad / "truncated_model"
    shutil.copytree(pretrained_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    pickled = bad / "pickled_model"
    shutil.copytree(pretrained_model, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"pickle bytes that must never be loaded")
    classifier = bad / "classifier"
    shutil.copytree(pretrained_model, classifier)
    (classifier / "model.safetensors").unlink()
    BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=1)).save_pretrained(classifier)
    shutil.copytree(pretrained_model, bad / "model_dir")
    return root


def _cases():
    """(id, argv with {root} and {recipe} placeholders, text the error line must contain)."""
    r = "{recipe}"
    gen = ["generate", r, "-p", "The function"]
    return [
        ("recipe-not-utf8", ["pretrain", "{root}/bad/latin1.toml"], "latin1.toml: not UTF-8"),
        ("recipe-syntax", ["pretrain", "{root}/bad/syntax.toml"], "syntax.toml: invalid TOML"),
        ("recipe-missing", ["pretrain", "{root}/nope.toml"], "nope.toml: recipe file not found"),
        ("unknown-key", ["pretrain", r, "--set", "pretrain.lrr=1"], "pretrain.lrr: unknown key"),
        ("mistyped-key", ["pretrain", r, "--set", "pretrain.lr=\"fast\""], "pretrain.lr:"),
        ("negative-lr", ["pretrain", r, "--set", "pretrain.lr=-1"], "pretrain.lr:"),
        ("lora-r-zero", ["sft", r, "--set", "sft.lora.r=0"], "sft.lora.r:"),
        ("batch-size-zero", ["pretrain", r, "--set", "pretrain.batch_size=0"],
         "pretrain.batch_size:"),
        ("scheduler", ["pretrain", r, "--set", "pretrain.scheduler=\"foo\""], "pretrain.scheduler:"),
        ("data-no-table", ["pretrain", r, "--set", "pretrain.data=\"nope\""],
         "pretrain.data: no [data.nope] table"),
        ("config-unknown-field", ["pretrain", r, "--set", "pretrain.config.n_layerz=2"],
         "pretrain.config.n_layerz: not a field of OPTConfig"),
        ("dataset-missing", ["pretrain", r, "--set", "data.corpus.path=\"{root}/no-dataset\""],
         "data.corpus.path: dataset {root}/no-dataset does not exist"),
        ("tokenizer-missing", ["pretrain", r, "--set", "model.tokenizer=\"{root}/no-tok\""],
         "model.tokenizer: {root}/no-tok does not exist"),
        ("tokenizer-empty-dir", ["pretrain", r, "--set", "model.tokenizer=\"{root}/bad/empty_tokenizer\""],
         "tokenizer {root}/bad/empty_tokenizer"),
        ("run-name-dotdot", ["pretrain", r, "--set", "run.name=\"../escape\"", "--set", "run.dir=\"\""],
         "run.name:"),
        ("run-name-absolute", ["pretrain", r, "--set", "run.name=\"/tmp/x\""], "run.name:"),
        ("seq-len-beyond-positions", ["sft", r, "--set", "sft.seq_len=512"],
         "sft.seq_len: 512 exceeds the model's 128 positions"),
        ("safetensors-truncated", gen + ["--set", "generate.model=\"{root}/bad/truncated_model\""],
         "truncated_model/model.safetensors: truncated or corrupt"),
        ("pickle-only", gen + ["--set", "generate.model=\"{root}/bad/pickled_model\""],
         "model.allow_pickle"),
        ("prompts-no-key", ["generate", r, "--prompts-file", "{root}/bad/prompts_no_key.jsonl"],
         "prompts_no_key.jsonl:2: no \"prompt\" key"),
        ("prompts-bad-json", ["generate", r, "--prompts-file", "{root}/bad/prompts_bad_json.jsonl"],
         "prompts_bad_json.jsonl:3: invalid JSON"),
        ("prompts-not-utf8", ["generate", r, "--prompts-file", "{root}/bad/prompts_latin1.txt"],
         "prompts_latin1.txt: not UTF-8"),
        ("prompt-too-long", ["generate", r, "-p", "the function returns " * 60],
         "generate.prompts[0]:"),
        ("max-new-tokens-beyond", gen + ["--set", "generate.max_new_tokens=127"],
         "generate.max_new_tokens: 127 new tokens"),
        ("max-new-tokens-zero", gen + ["--set", "generate.max_new_tokens=0"],
         "generate.max_new_tokens:"),
        ("generate-classifier", gen + ["--set", "generate.model=\"{root}/bad/classifier\""],
         "not a causal language model"),
        ("local-path-missing", gen + ["--set", "generate.model=\"{root}/no/such/model\""],
         "{root}/no/such/model does not exist"),
        ("hub-like-path-offline", gen + ["--set", "generate.model=\"no-such-dir/model\""],
         "no-such-dir/model"),
        ("bench-unknown-task", ["bench", r, "--set", "bench.tasks=[\"no_such_task\"]",
                                "--run-dir", "{root}/run2"],
         "bench.tasks: lm-eval task 'no_such_task'"),
        ("bench-pickle-model", ["bench", r, "--set", "bench.models=[\"{root}/bad/pickled_model\"]",
                                "--run-dir", "{root}/run2"], "model.allow_pickle"),
        ("stage-dir-not-ours", ["bench", r], "run/bench: a directory llmctl did not write"),
        ("quantize-method", ["quantize", r, "--set", "quantize.method=\"rtn\""],
         "quantize.method: 'rtn' is not a method of backend \"torch\""),
        ("quantize-bnb-cpu", ["quantize", r, "--set", "quantize.backend=\"bnb\"",
                              "--set", "quantize.method=\"weight\""], "quantize.backend:"),
        ("upstream-not-run", ["merge", r], "sft/adapter does not exist (run the upstream"),
        ("upstream-nobody-makes", ["ppo", r, "--set", "ppo.data=\"sentiment\"", "--set",
                                   "ppo.model=\"{root}/bad/model_dir\""],
         "ppo.reward_model: {root}/run/reward/model does not exist and no stage of this recipe "
         "produces it"),
        ("ppo-reward-text-field", ["ppo", r, "--set", "ppo.data=\"sentiment\"", "--set",
                                   "ppo.reward_text=\"{{response}}: {{tweet}}\""],
         "ppo.reward_text: {{tweet}} is not a field of the prompts (fields: instruction, input, "
         "response)"),
        ("ppo-reward-text-no-response", ["ppo", r, "--set", "ppo.reward_text=\"{{input}}\""],
         "ppo.reward_text: must contain {{response}}"),
        ("set-without-value", ["pretrain", r, "--set", "pretrain.lr"], "--set 'pretrain.lr'"),
        ("ingest-not-utf8", ["data", "ingest", "{root}/bad/rows_latin1.jsonl", "--to", "{root}/ds1"],
         "rows_latin1.jsonl: not UTF-8"),
        ("ingest-bad-json", ["data", "ingest", "{root}/bad/rows_bad.jsonl", "--to", "{root}/ds2"],
         "rows_bad.jsonl:2: invalid JSON"),
        ("ingest-overwrite-model", ["data", "ingest", "{root}/bad/rows.jsonl", "--to",
                                    "{root}/bad/model_dir", "--overwrite"],
         "model_dir: exists and is not a Deep Lake dataset"),
        ("show-missing", ["data", "show", "{root}/no-dataset"], "{root}/no-dataset does not exist"),
        # Found by tests/test_fuzz.py (each was exit 1):
        ("run-dir-is-a-file", ["pretrain", r, "--set", "run.dir=\"{root}/bad/rows.jsonl\""],
         "run.dir: {root}/bad/rows.jsonl exists and is not a directory"),
        ("run-dir-symlink-loop", ["pretrain", r, "--set", "run.dir=\"{root}/bad/loop\""],
         "run.dir: {root}/bad/loop is a broken or looping symlink"),
        ("model-symlink-loop", gen + ["--set", "generate.model=\"{root}/bad/loop\""],
         "generate.model: {root}/bad/loop does not exist"),
        ("path-name-too-long", ["pretrain", r, "--set",
                                f"data.corpus.eval_path=\"{{root}}/{'x' * 300}\""],
         "data.corpus.eval_path: dataset {root}/xxx"),
        ("task-path-name-too-long", ["bench", r, "--set", f"bench.task_path=\"{'x' * 300}\"",
                                     "--run-dir", "{root}/run2"], "bench.task_path: xxx"),
        ("bench-models-empty-name", ["bench", r, "--set", "bench.models=[\"\"]", "--run-dir",
                                     "{root}/run2"], "bench.models.0:"),
        ("template-not-a-format", ["pretrain", r, "--set", "data.corpus.template=\"{{\""],
         "data.corpus.template: not a format string"),
        # an existing, empty run directory: the lock file it took goes too (found by the fuzz)
        ("empty-run-dir-no-upstream", ["generate", r, "-p", "x", "--set", "generate.model=\"sft\"",
                                       "--run-dir", "{root}/bad/empty_tokenizer"],
         "generate.model: {root}/bad/empty_tokenizer/"),
        ("sft-prompts-fill-seq-len", ["sft", r, "--set", "sft.seq_len=2", "--set",
                                      "sft.packing=false", "--set", "sft.completion_only_loss=true"],
         "sft.seq_len: every data.sentiment training row's prompt fills 2 tokens"),
    ]


# Checked again with --dry-run: it must refuse what the run refuses.
DRY_RUN = {"data-no-table", "scheduler", "config-unknown-field", "dataset-missing",
           "tokenizer-missing", "quantize-method", "quantize-bnb-cpu", "upstream-nobody-makes",
           "upstream-not-run", "ppo-reward-text-field", "ppo-reward-text-no-response",
           "stage-dir-not-ours", "bench-unknown-task", "negative-lr", "run-dir-is-a-file",
           "run-dir-symlink-loop", "path-name-too-long", "task-path-name-too-long",
           "bench-models-empty-name", "template-not-a-format"}


@pytest.mark.parametrize("case", _cases(), ids=[c[0] for c in _cases()])
def test_bad_input_is_exit_2_and_changes_nothing(project, case, capsys):
    name, argv, needle = case
    fill = {"root": str(project), "recipe": str(project / "recipe.toml")}
    argv = [a.format(**fill) for a in argv]
    needle = needle.format(**fill)
    before = snapshot(project)
    runs = [argv] + ([argv + ["--dry-run"]] if name in DRY_RUN else [])
    for args in runs:
        code, out, err = run_cli(args, capsys)
        lines = err.strip().splitlines()
        assert code == 2, (args, err)
        assert lines and lines[-1].startswith("error: ") and needle in lines[-1], (args, err)
        assert sum(line.startswith("error:") for line in lines) == 1, err
        assert "Traceback" not in err
        assert snapshot(project) == before, args


def test_the_table_is_big_enough():
    assert len(_cases()) >= 30


# -- 1. no code runs through a path ----------------------------------------------------------


EVIL = """from pathlib import Path
Path(__file__).with_name("EXECUTED").write_text("remote code ran")
"""


def test_comma_paths_reach_no_argument_string(tmp_path, assets, capsys):
    """A run directory named like a sweep (commas, '=') and a model whose config asks for its
    own code: bench scores it with the harness, runs none of its code, and reads the path
    whole."""
    run_dir = tmp_path / "lr=2e-3,bs=16,trust_remote_code=True"
    recipe = tmp_path / "r.toml"
    recipe.write_text(tiny_recipe_text(assets, run_dir) + f"""
[bench]
tasks = ["demo_sentiment"]
task_path = "{assets['lm_tasks']}"
limit = 8
latency = {{ runs = 0 }}
""")
    code, _, err = run_cli(["pretrain", recipe], capsys)
    assert code == 0, err
    model = run_dir / "pretrain" / "model"
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "evil.py").write_text(EVIL)
    code, _, err = run_cli(["bench", recipe], capsys)
    assert code == 0, err
    assert not (model / "EXECUTED").exists()
    assert 0 <= manifest(run_dir / "bench")["metrics"]["demo_sentiment.acc"] <= 1
    # A path spliced with an option is just a path that does not exist.
    code, _, err = run_cli(["bench", recipe, "--set",
                            f'bench.models=["{model},trust_remote_code=True"]'], capsys)
    assert code == 2 and "does not exist" in err
    assert not (model / "EXECUTED").exists()


def test_allow_pickle_is_the_only_way_to_load_pickles(tmp_path, pretrained_model, capsys):
    import torch
    from safetensors.torch import load_file

    from llmctl.errors import UserError
    from llmctl.models import load_causal_lm
    from llmctl.schema import ModelConfig

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(Path(pretrained_model) / "config.json", pickled)
    torch.save(load_file(Path(pretrained_model) / "model.safetensors"), pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="model.allow_pickle = true"):
        load_causal_lm(str(pickled))
    assert load_causal_lm(str(pickled), ModelConfig(allow_pickle=True)) is not None


# -- 2. llmctl deletes only what it wrote ----------------------------------------------------


def test_a_user_folder_named_like_a_stage_survives(tmp_path, tiny_recipe, capsys):
    project = tmp_path / "project"
    (project / "generate").mkdir(parents=True)
    (project / "generate" / "mine.txt").write_text("keep me")
    code, _, err = run_cli(["run", tiny_recipe(), "--run-dir", project], capsys)
    assert code == 2 and f"{project / 'generate'}: a directory llmctl did not write" in err
    assert (project / "generate" / "mine.txt").read_text() == "keep me"
    assert not (project / "pretrain").exists()  # refused before any stage ran


def test_ingest_overwrite_replaces_datasets_only(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n')
    dest = tmp_path / "ds"
    assert run_cli(["data", "ingest", rows, "--to", dest], capsys)[0] == 0
    rows.write_text('{"text": "b"}\n{"text": "c"}\n')
    code, out, _ = run_cli(["data", "ingest", rows, "--to", dest, "--overwrite"], capsys)
    assert code == 0 and "ingested 2 rows" in out
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "weights.safetensors").write_text("precious")
    code, _, err = run_cli(["data", "ingest", rows, "--to", folder, "--overwrite"], capsys)
    assert code == 2 and "not a Deep Lake dataset" in err
    assert (folder / "weights.safetensors").read_text() == "precious"


# -- 3. a run directory can move ---------------------------------------------------------------


def lora_recipe(path: Path, assets, run_dir: Path) -> Path:
    path.write_text(tiny_recipe_text(assets, run_dir) + f"""
[data.sentiment]
path = "{assets['sentiment_train']}"
eval_path = "{assets['sentiment_eval']}"
template = "sentiment"
limit = 64

[sft]
data = "sentiment"
lora = {{ r = 4, alpha = 8, dropout = 0.0 }}
seq_len = 64
max_steps = 3
save_steps = 3
eval_task = false
eval_max_batches = 1

[merge]
""")
    return path


def perturbed_copy(model_dir: Path, dest: Path) -> Path:
    """The same architecture and config with other weights."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dest)
    weights = load_file(dest / "model.safetensors")
    save_file({k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
               for k, v in weights.items()}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_moved_and_copied_run_directories_keep_working(tmp_path, assets, pretrained_model, capsys):
    recipe = lora_recipe(tmp_path / "r.toml", assets, tmp_path / "a")
    other = perturbed_copy(Path(pretrained_model), tmp_path / "other")
    code, _, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    adapter_config = json.loads((tmp_path / "a/sft/adapter/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "../../pretrain/model"
    assert manifest(tmp_path / "a/sft")["base_fingerprint"]["weights_sha256"]
    os.rename(tmp_path / "a", tmp_path / "b")
    shutil.copytree(tmp_path / "b", tmp_path / "c")  # new mtimes, same contents
    for moved in ("b", "c"):
        code, _, err = run_cli(["run", recipe, "--run-dir", tmp_path / moved], capsys)
        assert code == 0 and err.count("up to date, skipped") == 4, err
        code, _, err = run_cli(["merge", recipe, "--run-dir", tmp_path / moved], capsys)
        assert code == 0, err
        assert manifest(tmp_path / moved / "merge")["inputs"]["base"] == "$RUN/pretrain/model"
    # Another model where the base was: the adapter refuses it.
    base = tmp_path / "c" / "pretrain" / "model"
    shutil.copy(other / "model.safetensors", base / "model.safetensors")
    for stage in ("merge", "generate"):
        code, _, err = run_cli([stage, recipe, "--run-dir", tmp_path / "c", "--set",
                                f"generate.model=\"{tmp_path / 'c' / 'sft' / 'adapter'}\""], capsys)
        assert code == 2 and "is not the base adapter" in err and "weights differ" in err, err
    # An explicit merge.base that does not match: refused unless allowed.
    args = ["merge", recipe, "--run-dir", tmp_path / "b", "--set", f"merge.base=\"{other}\""]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "merge.base:" in err and "merge.allow_other_base" in err
    code, _, err = run_cli(args + ["--set", "merge.allow_other_base=true"], capsys)
    assert code == 0, err


# -- 4. one process per run directory -----------------------------------------------------------


@pytest.mark.slow
def test_second_process_on_a_run_directory_is_refused(tmp_path, tiny_recipe, capsys):
    recipe = tiny_recipe()
    lock = tmp_path / "run" / ".llmctl.lock"
    first = subprocess.Popen([sys.executable, "-m", "llmctl", "run", recipe, "--set",
                              "pretrain.max_steps=100000", "--set", "pretrain.save_steps=100000"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.exists() and lock.read_text()):
            time.sleep(0.05)
        assert first.poll() is None
        code, _, err = run_cli(["run", recipe], capsys)
        assert code == 2 and f"in use by pid {first.pid}" in err, err
    finally:
        first.kill()  # SIGKILL: no cleanup at all, the lock file stays behind
        first.wait()
    assert lock.exists()
    code, _, err = run_cli(["run", recipe], capsys)  # a dead holder's lock does not block
    assert code == 0, err


# -- 5. a failed rerun keeps the interrupted run's checkpoints ---------------------------------


@pytest.mark.slow
def test_bad_rerun_keeps_checkpoints_and_a_new_config_discards_them_late(tmp_path, tiny_recipe,
                                                                          capsys):
    from tests.conftest import kill_when

    recipe = tiny_recipe()
    partial = tmp_path / "run" / ".partial" / "pretrain"
    ckpts = partial / "checkpoints"
    kill_when(["pretrain", recipe, "--set", "pretrain.max_steps=100000"],
              lambda: (ckpts / "checkpoint-10" / "trainer_state.json").exists())
    kept = snapshot(partial)
    for bad in (["--set", "pretrain.lr=-1"], ["--set", "pretrain.seq_len=1000"],
                ["--set", "pretrain.data=\"other\""]):
        code, _, err = run_cli(["pretrain", recipe, "--set", "pretrain.max_steps=100000", *bad],
                               capsys)
        assert code == 2, err
        assert snapshot(partial) == kept
    # A valid new config: the old checkpoints stay aside until the new run saves one.
    code, _, err = run_cli(["pretrain", recipe, "--set", "pretrain.lr=1e-3"], capsys)
    assert code == 0, err
    assert "config changed since the interrupted run (" in err
    assert "pretrain.lr: 0.003 -> 0.001" in err and "pretrain.max_steps: 100000 -> 30" in err
    assert "discarded the interrupted run's checkpoint-" in err
    assert not (tmp_path / "run" / ".partial").exists()


def test_superseded_work_is_restored_when_its_config_returns(tmp_path):
    from llmctl.rundir import StageRun

    def begin(config_hash):
        return StageRun(tmp_path, "sft", config_hash, 0, {}, {}, {"sft": {"h": config_hash}}).begin()

    first = begin("h1")
    (first.checkpoint_dir / "checkpoint-5").mkdir(parents=True)
    (first.checkpoint_dir / "checkpoint-5" / "trainer_state.json").write_text("{}")
    second = begin("h2")
    assert second.last_checkpoint() is None and second.superseded_dir.exists()
    assert begin("h1").last_checkpoint().endswith("checkpoint-5")  # restored
    third = begin("h3")
    third.discard_superseded()
    assert not third.superseded_dir.exists()


# -- 6. only what changed reruns ------------------------------------------------------------------


def test_unused_tables_and_other_spellings_of_the_run_dir_rerun_nothing(tmp_path, tiny_recipe,
                                                                         monkeypatch, capsys):
    recipe = tiny_recipe()
    code, _, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    for extra in (["--set", "data.unused.path=\"nowhere\""],
                  ["--run-dir", "run"], ["--run-dir", "./run/../run"],
                  ["--set", "model.name_or_path=\"gpt2\""]):  # no stage loads it
        code, _, err = run_cli(["run", recipe, *extra], capsys)
        assert code == 0 and err.count("up to date, skipped") == 2, (extra, err)
    code, _, err = run_cli(["run", recipe, "--set", "data.corpus.limit=300"], capsys)
    assert code == 0 and "pretrain: running (config changed: data.corpus.limit: 400 -> 300)" in err


def test_run_dry_run_prints_the_plan(tmp_path, tiny_recipe, capsys):
    recipe = tiny_recipe()
    assert run_cli(["pretrain", recipe], capsys)[0] == 0
    code, out, err = run_cli(["run", recipe, "--dry-run", "--set", "generate.max_new_tokens=3"],
                             capsys)
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert plan == {"pretrain": "skip (up to date)", "generate": "run (not finished yet)"}
    assert "pretrain: skip: up to date" in err and "generate: run: not finished yet" in err


# -- 9. interrupts --------------------------------------------------------------------------------


def _as_a_background_job():
    """Start llmctl as a script's background job may be started: SIGINT ignored and both
    signals blocked by the parent. The interrupt contract must hold anyway."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_says_what_was_kept(tmp_path, tiny_recipe, signum, code):
    recipe = tiny_recipe()
    ckpt = tmp_path / "run" / ".partial" / "pretrain" / "checkpoints" / "checkpoint-10"
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "pretrain", recipe, "--set",
                             "pretrain.max_steps=100000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=_as_a_background_job)
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt / "trainer_state.json").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted; pretrain: checkpoint-") and \
        last.endswith("kept, rerun to resume"), err
    assert "Traceback" not in err


# -- 10. published stages hold what their manifest lists -----------------------------------------


def test_published_stage_holds_only_its_outputs(tmp_path, assets, capsys):
    recipe = lora_recipe(tmp_path / "r.toml", assets, tmp_path / "run")
    code, _, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    for stage in ("pretrain", "sft", "merge", "generate"):
        m = manifest(tmp_path / "run" / stage)
        listed = {Path(p).parts[0] for p in m["outputs"].values()} | {"manifest.json"}
        assert {p.name for p in (tmp_path / "run" / stage).iterdir()} == listed, stage
    assert not (tmp_path / "run" / ".partial").exists()
