"""The `llmctl` command line: parses arguments and dispatches, nothing else.

Every stage command has the same shape:
``llmctl STAGE RECIPE.toml [--run-dir DIR] [--set KEY=VALUE ...] [--dry-run] [--debug]``.
Exit codes: 0 success, 2 invalid input (one ``error:`` line), 1 any other failure.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import click
import typer
import typer.core

from llmctl.env import quiet_libraries
from llmctl.errors import UserError
from llmctl.stages import REGISTRY, STAGES

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Pretrain, fine-tune, align, merge, quantize, benchmark, run and serve "
                       "language models from TOML recipes.")
data_app = typer.Typer(no_args_is_help=True, help="Manage Deep Lake datasets.")
app.add_typer(data_app, name="data")

def flag(name: str, help: str, **kwargs):
    """A boolean option, off unless given."""
    return typer.Option(False, name, help=help, **kwargs)


def _version(show: bool) -> None:
    if show:
        from llmctl import __version__

        print(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = flag("--version", "Print llmctl's version and exit.",
                                  is_eager=True, callback=_version)) -> None:
    pass


RecipeArg = typer.Argument(..., help="Recipe TOML file.", show_default=False,
                           metavar="RECIPE.toml")
RunDirOpt = typer.Option(None, "--run-dir", help="Run directory (default: runs/<run.name>).")
SetOpt = typer.Option([], "--set", help="Override a recipe key: --set sft.lora.r=8 (repeatable).")
DryRunOpt = flag("--dry-run", "Validate and print the resolved recipe only.")
_debug = False


def _debug_mode(value: bool) -> bool:
    """--debug: tracebacks, and the libraries' own warnings and notices. Without it they are
    quieted here, before the command imports any library (click runs this before the command)."""
    global _debug
    _debug = value
    if not value:
        quiet_libraries()
    return value


DebugOpt = flag("--debug", "Show tracebacks and the libraries' warnings.", callback=_debug_mode)


def _load(recipe_path: Path, run_dir: Optional[Path], overrides: list[str]):
    from llmctl.recipe import load_recipe

    if run_dir is not None:
        overrides = [*overrides, f"run.dir={json.dumps(str(run_dir))}"]
    return load_recipe(recipe_path, overrides)


def _dry_run(recipe, stages: list[str], distributed: dict | None = None,
             force: bool = False, whole_recipe: bool = False) -> None:
    """Check what the run would check before its first step, then print the resolved recipe,
    each stage's inputs and (for `llmctl run`, ``whole_recipe``) whether each stage would run,
    and why; a stage command always runs its stage."""
    from rich.console import Console

    from llmctl.pipeline import plan, preflight
    from llmctl.recipe import dump_resolved

    steps = plan(recipe, force, stages) if whole_recipe else [(s, "asked for") for s in stages]
    preflight(recipe, [s for s, reason in steps if reason is not None])
    resolved = dump_resolved(recipe)
    inputs = {s: recipe.upstream_inputs(s) for s in stages}
    out = {"recipe": resolved, "stages": stages, "inputs": inputs,
           "plan": {s: f"run ({reason})" if reason else "skip (up to date)" for s, reason in steps}}
    if distributed:
        out["distributed"] = distributed
    Console().print_json(json.dumps(out, default=str))
    if whole_recipe:
        for stage, reason in steps:
            print(f"{stage}: {'run: ' + reason if reason else 'skip: up to date'}",
                  file=sys.stderr)


def _stage_command(stage: str):
    def command(recipe: Path = RecipeArg, run_dir: Optional[Path] = RunDirOpt,
                set_: list[str] = SetOpt, dry_run: bool = DryRunOpt, debug: bool = DebugOpt):
        from llmctl.pipeline import run_stage

        from llmctl import distributed

        loaded = _load(recipe, run_dir, set_)
        loaded.stage_config(stage)
        if dry_run:
            _dry_run(loaded, [stage], distributed.describe(loaded, stage)
                     if STAGES[stage].trains else None)
            return
        run_stage(loaded, stage)

    command.__doc__ = STAGES[stage].help
    return command


for _spec in REGISTRY:
    if not _spec.own_command:  # generate's is below: prompts and output options
        app.command(_spec.name, help=_spec.help)(_stage_command(_spec.name))


@app.command("generate", help=STAGES["generate"].help + " Without a recipe, `--model` "
             "generates ad hoc (to stdout or --out; the run's generate/ is left alone).")
def generate_command(
    recipe: Optional[Path] = typer.Argument(None, help="Recipe TOML file (optional with "
                                            "--model).", show_default=False,
                                            metavar="[RECIPE.toml]"),
    model: Optional[str] = typer.Option(None, "--model", help="A stage of the run (sft, merge, "
                                        "quantize, ...), a model directory or a hub id."),
    run_dir: Optional[Path] = RunDirOpt, set_: list[str] = SetOpt,
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt (repeatable); "
                                     "replaces the recipe's prompts."),
    prompts_file: Optional[str] = typer.Option(
        None, "--prompts-file", help="One prompt per line, or JSONL with 'prompt'; '-' reads "
        "lines from stdin. Replaces the recipe's prompts (with --prompt: both are used)."),
    as_json: bool = flag("--json", "Print results as JSON lines."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="Also write the results as "
                                            "JSONL to this new file."),
    dry_run: bool = DryRunOpt, debug: bool = DebugOpt,
):
    from llmctl.pipeline import run_stage
    from llmctl.stages.generate import run_adhoc

    if out_file is not None and out_file.exists():
        raise UserError(f"--out: {out_file} already exists (llmctl does not overwrite it)")
    overrides = list(set_)
    if prompts_file == "-":
        prompt = [*prompt, *(line for line in sys.stdin.read().splitlines() if line.strip())]
        prompts_file = None
    if prompt or prompts_file:  # the command line's prompts replace the recipe's
        overrides.append(f"generate.prompts={json.dumps(prompt)}")
        overrides.append(f"generate.prompts_file={json.dumps(prompts_file or '')}")
    if model is not None:
        overrides.append(f"generate.model={json.dumps(model)}")
    if recipe is None:
        if model is None:
            raise UserError("generate: give a recipe, or --model for ad-hoc generation")
        loaded = _adhoc_recipe(run_dir, overrides)
    else:
        loaded = _load(recipe, run_dir, overrides)
    loaded.stage_config("generate")
    if dry_run:
        _dry_run(loaded, ["generate"])
        return
    if recipe is None:
        out = run_adhoc(loaded, loaded.upstream_inputs("generate")["model"])
    else:
        out = run_stage(loaded, "generate")
    if out_file is not None:
        out_file.write_text("".join(json.dumps(r) + "\n" for r in out["results"]))
    print_generations(out["results"], as_json)


def print_generations(results: list[dict], as_json: bool = False) -> None:
    for r in results:
        if as_json:
            print(json.dumps({"prompt": r["prompt"], "completions": r["completions"]}))
        else:
            for i, text in enumerate(r["completions"]):
                tag = f" [{i + 1}]" if len(r["completions"]) > 1 else ""
                print(f"\033[1m{r['input']}\033[0m{tag}{text}" if sys.stdout.isatty()
                      else f"{r['input']}{tag}{text}")
                print()


def _adhoc_recipe(run_dir: Optional[Path], overrides: list[str]):
    """The recipe of `llmctl generate --model ...` without one: defaults, the run directory
    (where stage names are looked up) and the command line's settings."""
    from llmctl.recipe import apply_overrides, validate

    raw = {"run": {"name": "adhoc"}, "generate": {}}
    if run_dir is not None:
        raw["run"]["dir"] = str(run_dir)
    return validate(apply_overrides(raw, overrides), "generate")


@app.command("run")
def run_command(recipe: Path = RecipeArg, run_dir: Optional[Path] = RunDirOpt,
                set_: list[str] = SetOpt,
                force: bool = flag("--force", "Rerun finished stages too."),
                dry_run: bool = DryRunOpt, debug: bool = DebugOpt):
    """Run every stage the recipe defines, in pipeline order, skipping up-to-date ones."""
    from llmctl.pipeline import run_all

    loaded = _load(recipe, run_dir, set_)
    if dry_run:
        _dry_run(loaded, loaded.stages(), force=force, whole_recipe=True)
        return
    import time

    from llmctl.progress import console

    t0 = time.perf_counter()
    outcome = run_all(loaded, force=force)
    if outcome.get("generate") == "ran":  # the run's last word: what its model now answers
        print_generations([json.loads(line) for line in
                           (loaded.run_dir / "generate" / "generations.jsonl").open()])
    ran = [stage for stage, what in outcome.items() if what == "ran"]
    console.print(f"llmctl run: {len(ran)} stage(s) ran, {len(outcome) - len(ran)} up to date, "
                  f"in {(time.perf_counter() - t0) / 60:.1f} min; `llmctl status {recipe}"
                  f"{f' --run-dir {run_dir}' if run_dir else ''}` lists each stage's metrics",
                  soft_wrap=True, highlight=False, markup=False)


@app.command("status")
def status_command(
    target: Path = typer.Argument(..., help="Recipe TOML file, or a run directory that holds "
                                  "its recipe.toml (as `llmctl demo` leaves one).",
                                  show_default=False, metavar="RECIPE.toml|RUN_DIR"),
    run_dir: Optional[Path] = RunDirOpt, set_: list[str] = SetOpt,
    as_json: bool = flag("--json", "Print the rows as JSON."),
    debug: bool = DebugOpt,
):
    """Each stage of a run: finished (when, wall time, key metrics), interrupted (at which
    checkpoint) or not run, and whether `llmctl run` would run it now, and why."""
    from llmctl.status import print_table, recipe_path, stage_status

    recipe = _load(*recipe_path(target, run_dir), set_)
    rows = stage_status(recipe)
    if as_json:
        print(json.dumps({"run_dir": str(recipe.run_dir), "stages": rows}, indent=2))
    else:
        print_table(recipe, rows)


@app.command("serve")
def serve_command(
    recipe: Path = RecipeArg, run_dir: Optional[Path] = RunDirOpt, set_: list[str] = SetOpt,
    model: Optional[str] = typer.Option(
        None, "--model", help="A stage of the recipe (sft, merge, quantize, ...), a model "
        "directory or a hub id (default: the model `llmctl generate` uses)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but "
                             "loopback reaches the network: set LLMCTL_API_KEY."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port (0: any free one)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Sequences decoded together "
                                  "at most (concurrent requests share a forward pass)."),
    max_queue: int = typer.Option(64, "--max-queue", min=0, help="Requests that may wait for "
                                  "the model beyond --max-batch; past them a request gets 429 "
                                  "with Retry-After."),
    max_body: int = typer.Option(1 << 20, "--max-body", min=1, help="Largest request body in "
                                 "bytes (a larger one gets 413)."),
    debug: bool = DebugOpt,
):
    """Serve a model over an OpenAI-compatible HTTP API until Ctrl-C or SIGTERM (the first
    drains: the requests held are answered, new ones get 503; a second stops at once)."""
    from llmctl.serve import serve

    loaded = _load(recipe, run_dir, set_)
    try:
        serve(loaded, model, host, port, max_batch, max_queue, max_body)
    except (KeyboardInterrupt, Terminated):  # a second Ctrl-C or SIGTERM during the drain
        print("serve: stopped", file=_stderr())


@app.command("demo")
def demo_command(run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir",
                                              help="Where the assets and the run go."),
                 force: bool = flag("--force", "Rerun finished stages too."),
                 debug: bool = DebugOpt):
    """Build the embedded demo assets (no downloads) and run the demo pipeline on them."""
    from llmctl.demo.pipeline import run_demo

    run_demo(run_dir, force=force)


@data_app.command("ingest")
def data_ingest(files: list[Path] = typer.Argument(..., help="JSONL, CSV, TSV, Parquet or text.",
                                                  metavar="FILE"),
                to: str = typer.Option(..., "--to", help="Dataset path (dir, mem://, hub://...)."),
                message: str = typer.Option("ingest", "--message", "-m", help="Commit message."),
                text_column: str = typer.Option("text", help="Column name for plain-text files."),
                overwrite: bool = flag("--overwrite", "Replace an existing Deep Lake dataset at "
                                       "--to (only a Deep Lake dataset is ever replaced)."),
                append: bool = flag("--append", "Add the rows to the existing dataset at --to "
                                    "(same columns) as a new commit."),
                debug: bool = DebugOpt):
    """Create a Deep Lake dataset from files and commit it (or append to one)."""
    from llmctl.data import append_records, read_records, write_dataset

    if overwrite and append:
        raise UserError("--overwrite and --append: choose one")
    if to.startswith("mem://"):
        print(f"warning: {to} lives in this process's memory and is gone when it exits; use a "
              f"directory to keep it", file=_stderr())
    records = [r for f in files for r in read_records(f, text_column)]
    if append:
        n = append_records(to, records, message)
        print(f"appended {n} rows to {to}")
        return
    n = write_dataset(to, records, message, overwrite=overwrite)
    print(f"ingested {n} rows into {to}")


@data_app.command("log")
def data_log(path: str = typer.Argument(..., metavar="DATASET"),
             as_json: bool = flag("--json", "Print the commits as JSON."),
             debug: bool = DebugOpt):
    """A dataset's commit history: version, time and message of each commit."""
    from llmctl.data import dataset_log

    commits = dataset_log(path)
    if as_json:
        print(json.dumps(commits, indent=2))
        return
    for c in commits:
        print(f"{c['version']}  {c['time']}  {c['message']}")


@data_app.command("show")
def data_show(path: str = typer.Argument(..., metavar="DATASET"),
              limit: int = typer.Option(10, "--limit", "-n", help="Rows to print."),
              columns: Optional[str] = typer.Option(None, help="Comma-separated columns."),
              debug: bool = DebugOpt):
    """Print the first rows of a dataset as a table."""
    from llmctl.data import open_dataset

    ds = open_dataset(path, "path")
    _print_rows(ds, limit, columns.split(",") if columns else None, f"{path} ({len(ds)} rows)")


@data_app.command("query")
def data_query(path: str = typer.Argument(..., metavar="DATASET"), tql: str = typer.Argument(..., help="TQL query."),
               limit: int = typer.Option(10, "--limit", "-n", help="Rows to print."),
               debug: bool = DebugOpt):
    """Run a TQL query, e.g. \"SELECT * WHERE contains(text, 'tax')\", and print matching rows."""
    from llmctl.data import open_dataset, run_query

    view = run_query(open_dataset(path, "path"), tql, "query")
    _print_rows(view, limit, None, f"{len(view)} matching rows")


def _print_rows(view, limit: int, columns: Optional[list[str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmctl.data import column_names, preview

    if columns:
        missing = [c for c in columns if c not in column_names(view)]
        if missing:
            raise UserError(f"--columns: no column {missing[0]!r} "
                            f"(columns: {', '.join(column_names(view))})")
    names, rows = preview(view, limit, columns)
    table = Table(title=title, show_lines=True)
    for name in names:
        table.add_column(name, overflow="fold", max_width=60)
    for row in rows:
        table.add_row(*[cell if len(cell) <= 300 else cell[:297] + "..." for cell in row])
    Console().print(table)


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so cleanup and the exit message happen as for
    Ctrl-C (a BaseException: no ``except Exception`` in a library swallows it)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def interrupted_message() -> str:
    """What an interrupt leaves behind: the running stage's last checkpoint, if any."""
    from llmctl import rundir

    stage = rundir.ACTIVE
    if stage is None:
        return "error: interrupted"
    checkpoint = stage.last_checkpoint()
    if checkpoint:
        return (f"error: interrupted; {stage.stage}: {Path(checkpoint).name} kept, "
                f"rerun to resume")
    return f"error: interrupted; {stage.stage}: no checkpoint yet, a rerun starts it over"


def failure_message(err: Exception) -> str:
    """Exit 1 from an exception llmctl did not expect: it says llmctl failed, and where the
    traceback went (the running stage's work directory, else a temporary file)."""
    import tempfile

    from llmctl import rundir

    log = None
    stage = rundir.ACTIVE
    try:
        if stage is not None and stage.work_dir.is_dir():
            log = stage.work_dir / "error.log"
        else:
            fd, name = tempfile.mkstemp(prefix="llmctl-error-", suffix=".log")
            os.close(fd)
            log = Path(name)
        log.write_text("".join(traceback.format_exception(err)))
    except OSError:
        log = None
    where = f"traceback in {log}" if log else "rerun with --debug for the traceback"
    return f"llmctl failed ({type(err).__name__}: {err}); {where}"


def _stderr():
    """The real stderr: a progress bar interrupted mid-run still holds sys.stderr in rich's
    line-buffering proxy, which would swallow the last line."""
    stream = sys.stderr
    while hasattr(stream, "rich_proxied_file"):
        stream = stream.rich_proxied_file
    return stream


def main() -> None:
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The interrupt contract (130 / 143 and what was kept) holds whatever the parent handed
    # down: a background job of a non-interactive shell starts with SIGINT ignored, and a
    # parent's blocked signals stay blocked across exec.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _main()
    finally:  # as they were, for a caller that runs the CLI inside its own process (tests)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _main() -> None:
    try:
        rc = app(standalone_mode=False)
    except click.exceptions.ClickException as err:  # usage errors: exit 2 like argparse
        err.show()
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print(interrupted_message(), file=_stderr())
        sys.exit(130)
    except Terminated:
        print(interrupted_message(), file=_stderr())
        sys.exit(143)
    except Exception as err:  # noqa: BLE001 - the CLI boundary turns every failure into an exit code
        if _debug:
            traceback.print_exc(file=_stderr())
        # Our own exceptions carry an exit code and a message written for users; any other is
        # llmctl's failure, never a verdict on the input (bad input is caught as a UserError).
        code = getattr(err, "exit_code", 1)
        message = str(err) if hasattr(err, "exit_code") else failure_message(err)
        if message:  # (empty when launched processes have already said what went wrong)
            print(f"error: {' '.join(message.split())}", file=_stderr())
        sys.exit(code)
    if rc == 130:  # typer turns KeyboardInterrupt into exit code 130 itself
        print(interrupted_message(), file=_stderr())
    sys.exit(rc if isinstance(rc, int) else 0)
