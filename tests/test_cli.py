"""The CLI's contract: exit codes 0/1/2, one-line errors, --dry-run, run skipping, data."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO, manifest, run_cli


def test_every_stage_command_exists(capsys):
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "merge", "quantize", "bench",
                  "generate", "run", "demo", "data", "serve"):
        code, out, _ = run_cli([stage, "--help"], capsys)
        assert code == 0 and "Usage" in out, stage


def test_version(capsys):
    from llmctl import __version__

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"llmctl {__version__}"


def test_the_cli_in_process_leaves_the_callers_signal_handlers(capsys):
    """main() installs its SIGTERM handler and unblocks SIGINT/SIGTERM for its own run only: a
    caller that runs the CLI in its process (a test worker, a notebook) gets its own back."""
    import signal

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        code, _, _ = run_cli(["--version"], capsys)
        assert code == 0
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        signal.signal(signal.SIGTERM, before)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pretrain]\nlr = \"fast\"\n")
    code, out, err = run_cli(["pretrain", bad], capsys)
    assert code == 2
    assert err.strip() == f"error: {bad}: pretrain.lr: Input should be a valid number (got 'fast')"
    assert "Traceback" not in err
    code, _, err = run_cli(["pretrain", tmp_path / "missing.toml"], capsys)
    assert code == 2 and err.startswith("error: ") and "missing.toml" in err
    code, _, err = run_cli(["sft", bad], capsys)  # table missing for the stage asked for
    assert code == 2


def test_debug_shows_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nseed = \"x\"\n[pretrain]\n")
    code, _, err = run_cli(["pretrain", bad, "--debug"], capsys)
    assert code == 2 and "Traceback" in err and err.strip().endswith("(got 'x')")


def test_usage_error_exits_2(capsys):
    code, _, _ = run_cli(["pretrain"], capsys)
    assert code == 2


def test_missing_dataset_is_exit_2(tiny_recipe, tmp_path, capsys):
    code, _, err = run_cli(["pretrain", tiny_recipe(), "--set", f"data.corpus.path=\"{tmp_path}/nope\""], capsys)
    assert code == 2 and f"data.corpus.path: dataset {tmp_path}/nope does not exist" in err


def test_missing_column_is_exit_2(tiny_recipe, capsys):
    code, _, err = run_cli(["pretrain", tiny_recipe(), "--set", "data.corpus.columns={text = \"body\"}"], capsys)
    assert code == 2
    assert "data.corpus.columns.text: dataset" in err and "no column 'body'" in err and "columns: text" in err


def test_dry_run_prints_resolved_and_touches_nothing(tiny_recipe, tmp_path, capsys):
    code, out, err = run_cli(["pretrain", tiny_recipe(), "--dry-run", "--set", "pretrain.lr=0.1"], capsys)
    assert code == 0, err
    resolved = json.loads(out)
    assert resolved["recipe"]["pretrain"]["lr"] == 0.1
    assert resolved["recipe"]["pretrain"]["weight_decay"] == 0.0  # defaults filled in
    assert resolved["recipe"]["run"]["dir"] == str(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_run_dir_option(tiny_recipe, tmp_path, capsys):
    code, out, _ = run_cli(["run", tiny_recipe(), "--dry-run", "--run-dir", tmp_path / "elsewhere"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["recipe"]["run"]["dir"] == str(tmp_path / "elsewhere")
    assert data["stages"] == ["pretrain", "generate"]
    assert data["inputs"]["generate"]["model"] == str(tmp_path / "elsewhere" / "pretrain" / "model")


def test_run_skips_up_to_date_stages(tiny_recipe, tmp_path, capsys):
    recipe = tiny_recipe()
    code, out, err = run_cli(["run", recipe], capsys)
    assert code == 0, err
    # the run ends on what its model now answers, and a count
    generations = (tmp_path / "run" / "generate" / "generations.jsonl").read_text().splitlines()
    first_answer = json.loads(generations[0])
    assert f"{first_answer['input']}{first_answer['completions'][0]}" in out
    assert "llmctl run: 2 stage(s) ran, 0 up to date" in err
    first = manifest(tmp_path / "run" / "pretrain")["finished_at"]
    code, out, err = run_cli(["run", recipe], capsys)
    assert code == 0 and err.count("up to date, skipped") == 2
    assert out == "" and "llmctl run: 0 stage(s) ran, 2 up to date" in err
    assert manifest(tmp_path / "run" / "pretrain")["finished_at"] == first
    # a changed generate setting reruns generate only
    code, _, err = run_cli(["run", recipe, "--set", "generate.max_new_tokens=4"], capsys)
    assert code == 0 and "pretrain: up to date" in err
    assert "generate: running (config changed: generate.max_new_tokens: 8 -> 4)" in err
    # a stage rerun by hand makes the stages that read its output stale
    time.sleep(1)  # manifests stamp whole seconds
    code, _, err = run_cli(["pretrain", recipe], capsys)
    assert code == 0, err
    code, _, err = run_cli(["run", recipe, "--set", "generate.max_new_tokens=4"], capsys)
    assert code == 0 and "pretrain: up to date" in err
    assert f"generate: running (pretrain ran again after it " \
           f"({tmp_path / 'run' / 'pretrain' / 'model'}))" in err


def test_run_reruns_stages_whose_data_or_tokenizer_changed_in_place(tiny_recipe, assets, tmp_path,
                                                                       capsys):
    """Stage hashes see paths; a dataset or tokenizer rewritten at the same path must not be
    'up to date'."""
    import deeplake

    corpus, tokenizer = tmp_path / "corpus", tmp_path / "tokenizer"
    shutil.copytree(assets["corpus"], corpus)
    shutil.copytree(assets["tokenizer"], tokenizer)
    args = ["run", tiny_recipe(), "--set", f"data.corpus.path={corpus}",
            "--set", f"model.tokenizer={tokenizer}", "--set", "pretrain.max_steps=4"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    code, _, err = run_cli(args, capsys)
    assert code == 0 and err.count("up to date, skipped") == 2
    time.sleep(1)  # manifests stamp whole seconds
    ds = deeplake.open(str(corpus))
    ds.append({"text": ["a row added in place"]})
    ds.commit("one more row")
    code, _, err = run_cli(args, capsys)
    assert code == 0 and f"pretrain: running ({corpus} changed after it ran)" in err
    assert "generate: running" in err  # it reads pretrain's model
    (tokenizer / "tokenizer_config.json").touch()  # same content: nothing to redo
    code, _, err = run_cli(args, capsys)
    assert code == 0 and err.count("up to date, skipped") == 2
    with open(tokenizer / "tokenizer_config.json", "a") as f:
        f.write("\n")
    code, _, err = run_cli(args, capsys)
    assert code == 0 and f"pretrain: running ({tokenizer} changed after it ran)" in err
    assert "generate: running" in err


def test_data_ingest_show_query(tmp_path, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"tax news {i}" if i % 2 else f"sports {i}",
                                         "id": i}) for i in range(6)))
    dest = tmp_path / "ds"
    code, out, err = run_cli(["data", "ingest", src, "--to", dest, "-m", "first import"], capsys)
    assert code == 0 and "ingested 6 rows" in out, err
    import deeplake

    ds = deeplake.open_read_only(str(dest))
    assert [v.message for v in ds.history][-1] == "first import"
    code, out, _ = run_cli(["data", "show", dest, "-n", "2"], capsys)
    assert code == 0 and "sports 0" in out and "tax news 1" in out and "sports 2" not in out
    code, out, _ = run_cli(["data", "query", dest, "SELECT * WHERE contains(text, 'tax')"], capsys)
    assert code == 0 and "3 matching rows" in out and "sports" not in out
    code, _, err = run_cli(["data", "show", dest, "--columns", "label"], capsys)
    assert code == 2 and "no column 'label'" in err
    code, _, err = run_cli(["data", "ingest", src, "--to", dest], capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(["data", "show", tmp_path / "nope"], capsys)
    assert code == 2


@pytest.mark.slow
def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "llmctl", "sft", "nope.toml"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == "error: nope.toml: recipe file not found"


def test_missing_tracker_package_is_exit_2(tiny_recipe, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    code, _, err = run_cli(["pretrain", tiny_recipe(), "--set", "pretrain.report_to=\"wandb\""], capsys)
    assert code == 2 and "pip install 'llmctl[wandb]'" in err


def test_every_option_is_described_and_flags_look_like_flags():
    import typer

    from llmctl.cli import app

    def commands(group, prefix=""):  # (typer 0.29 vendors its own click: no isinstance checks)
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    root = typer.main.get_command(app)
    checked = 0
    for name, command in commands(root):
        for param in command.params:
            if param.param_type_name != "option" or param.name == "help":
                continue
            assert param.help, f"llmctl {name} {param.opts[0]}: no help text"
            checked += 1
    assert checked > 50
    from typer.testing import CliRunner

    for args in ([], *(name.split() for name, _ in commands(root))):
        shown = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "200"}).output
        assert "--help" in shown and "<bool>" not in shown, (args, shown)


def test_data_append_log_and_mem_warning(tmp_path, capsys):
    from llmctl.data import open_dataset

    first, more, wrong = (tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    first.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 2}\n')
    more.write_text('{"text": "c", "label": 3}\n')
    wrong.write_text('{"text": "d"}\n')
    dest = tmp_path / "ds"
    assert run_cli(["data", "ingest", first, "--to", dest], capsys)[0] == 0
    code, out, err = run_cli(["data", "ingest", more, "--to", dest, "--append", "-m", "more"],
                             capsys)
    assert code == 0 and "appended 1 rows" in out, err
    ds = open_dataset(str(dest))
    assert len(ds) == 3 and ds["text"][2] == "c" and int(ds["label"][2]) == 3
    # refusals leave the dataset as it was
    code, _, err = run_cli(["data", "ingest", wrong, "--to", dest, "--append"], capsys)
    assert code == 2 and "differ from the dataset's ['label', 'text']" in err
    code, _, err = run_cli(["data", "ingest", more, "--to", tmp_path / "nope", "--append"], capsys)
    assert code == 2 and "does not exist (ingest without --append" in err
    code, _, err = run_cli(["data", "ingest", more, "--to", dest, "--append", "--overwrite"],
                           capsys)
    assert code == 2 and "choose one" in err
    assert len(open_dataset(str(dest))) == 3

    code, out, _ = run_cli(["data", "log", dest, "--json"], capsys)
    assert code == 0
    assert [c["message"] for c in json.loads(out)] == ["Dataset created", "ingest", "more"]
    code, _, err = run_cli(["data", "ingest", more, "--to", "mem://scratch"], capsys)
    assert code == 0 and "gone when it exits" in err


@pytest.mark.parametrize("stage, recipe", [("pretrain", "demo.toml"), ("run", "demo-grpo.toml"),
                                           ("dpo", "demo-dpo.toml")])
def test_demo_recipes_before_the_demo_say_how_to_make_it(tmp_path, monkeypatch, capsys, stage,
                                                         recipe):
    """A newcomer's first try: a demo recipe before `llmctl demo` built runs/demo."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([stage, REPO / "recipes" / recipe], capsys)
    assert code == 2 and "runs/demo/" in err and "`llmctl demo` builds runs/demo first" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("started", [True, False])
def test_an_unexpected_exception_is_llmctl_failed_with_its_traceback_saved(
        tmp_path, capsys, monkeypatch, started):
    """Exit 1 means llmctl failed, and says so: the exception's class only after "llmctl
    failed", and the traceback in the stage's work directory (or a temporary file before one
    exists)."""
    import llmctl.pipeline
    from llmctl import rundir

    def fail(recipe, stage):
        if started:  # what StageRun.begin leaves: the stage's work directory, as ACTIVE
            work_dir = recipe.run_dir / ".partial" / stage
            work_dir.mkdir(parents=True)
            monkeypatch.setattr(rundir, "ACTIVE", SimpleNamespace(work_dir=work_dir))
        raise ValueError("a library's own complaint")

    monkeypatch.setattr(llmctl.pipeline, "run_stage", fail)
    monkeypatch.setattr(rundir, "ACTIVE", None)
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[run]\nname = "x"\ndir = "{tmp_path / "run"}"\n[generate]\n'
                      f'model = "{tmp_path}"\n')
    code, _, err = run_cli(["generate", recipe], capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: llmctl failed (ValueError: a library's own complaint); "
                               "traceback in "), err
    log = Path(lines[0].rsplit("traceback in ", 1)[1])
    assert "Traceback" in log.read_text() and "a library's own complaint" in log.read_text()
    if started:
        assert log == tmp_path / "run" / ".partial" / "generate" / "error.log"
    else:
        assert tmp_path not in log.parents
        log.unlink()


def test_no_exception_class_reaches_the_user_as_an_input_error():
    """What the CLI prints comes from a UserError's message or from `failure_message`; no
    UserError message is built from an exception's class name (`type(err).__name__`), and the
    CLI names a class only after "llmctl failed"."""
    import ast
    import inspect

    import llmctl.cli

    def names_a_class(node) -> bool:  # type(err).__name__ of a caught exception or a parameter
        return any(isinstance(n, ast.Attribute) and n.attr == "__name__"
                   and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", "") == "type"
                   and n.value.args and getattr(n.value.args[0], "id", "") in caught
                   for n in ast.walk(node))

    package = Path(llmctl.cli.__file__).parent
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        caught = {h.name for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.name}
        caught |= {a.arg for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   for a in f.args.args if a.annotation is not None
                   and "Exception" in ast.unparse(a.annotation)}
        helpers = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                   and any(isinstance(r, ast.Return) and r.value is not None
                           and names_a_class(r.value) for r in ast.walk(f))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "UserError":
                called = {getattr(n.func, "id", "") for n in ast.walk(node)
                          if isinstance(n, ast.Call)}
                assert not names_a_class(node) and not called & helpers, \
                    f"{path.name}:{node.lineno}: a UserError message names an exception class"
    cli_tree = ast.parse(inspect.getsource(llmctl.cli))
    caught = {"err"}
    where = [f.name for f in ast.walk(cli_tree) if isinstance(f, ast.FunctionDef)
             and f.name != "main" and names_a_class(f)]
    assert where == ["failure_message"], where
    assert 'f"llmctl failed ({type(err).__name__}' in inspect.getsource(llmctl.cli.failure_message)
