"""Run directory lifecycle.

A stage works in ``<run_dir>/.partial/<stage>/`` and only when it has finished is that
directory given its ``manifest.json`` and moved to ``<run_dir>/<stage>/`` with one rename. So:

* a downstream stage never mistakes work in progress for a finished output;
* a killed stage leaves its checkpoints in ``.partial`` and the next identical command resumes;
* a rerun with a changed config keeps the interrupted run's checkpoints aside
  (``.partial/<stage>.superseded``) until it has saved a checkpoint of its own;
* a failing rerun never damages the previous finished output;
* llmctl only ever replaces a ``<run_dir>/<stage>/`` that holds an llmctl manifest of that stage;
* one llmctl process at a time works in a run directory (:func:`run_dir_lock`);
* paths inside the run directory are recorded relative to it, so it can be moved or copied.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from llmctl import distributed
from llmctl.errors import UserError
from llmctl.fingerprint import BASE_FINGERPRINT, config_hash, describe_changes, model_fingerprint, \
    path_fingerprint
from llmctl.paths import exists, is_local, looks_local, replace_dir

MANIFEST = "manifest.json"
LOCK = ".llmctl.lock"
TRACKED_PACKAGES = (
    "llmctl", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deeplake",
    "tokenizers", "lm-eval", "neural-compressor", "optimum-intel", "openvino", "bitsandbytes",
)
# The stage that is running in this process: what an interrupt reports on.
ACTIVE: "StageRun | None" = None


def _say(message: str) -> None:
    from llmctl.progress import console

    console.print(message, soft_wrap=True)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from a file llmctl wrote; None when missing, unreadable or not an object."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    return read_json(Path(stage_dir) / MANIFEST)


def is_complete(stage_dir: str | Path) -> bool:
    manifest = read_manifest(stage_dir)
    return bool(manifest) and manifest.get("status") == "complete"


def require_input(path: str, key: str) -> None:
    """Check a stage input that should exist locally; hub ids are left to the loader."""
    p = Path(path)
    if exists(p):
        if (p.parent / MANIFEST).exists() and not is_complete(p.parent):
            raise UserError(f"{key}: {path} belongs to an unfinished stage")
        return
    if (p.parent.parent / ".partial" / p.parent.name).exists():
        raise UserError(f"{key}: {path} does not exist yet: stage '{p.parent.name}' did not "
                        f"finish (rerun it to resume)")
    if looks_local(path):
        raise UserError(f"{key}: {path} does not exist (run the upstream stage first?)")


def stage_dir_owner(path: Path) -> str | None:
    """The stage whose llmctl manifest a directory holds, or None for anything else."""
    return (read_manifest(path) or {}).get("stage")


def check_replaceable(final_dir: Path, stage: str) -> None:
    """llmctl replaces ``<run_dir>/<stage>/`` only when it wrote it: exit 2 for anything else
    (a user's own ``bench/`` folder in a project used as ``--run-dir .``)."""
    if final_dir.exists() and stage_dir_owner(final_dir) != stage:
        what = "a file" if not final_dir.is_dir() else "a directory llmctl did not write"
        raise UserError(f"{final_dir}: {what} (no llmctl manifest of stage '{stage}'); "
                        f"llmctl will not replace it: move it away or use another --run-dir")


def check_run_dir(run_dir: Path) -> None:
    """The run directory is a directory or can be made one (its nearest existing ancestor is a
    directory): exit 2 naming run.dir before anything is written."""
    try:
        for path in (Path(run_dir), *Path(run_dir).parents):
            if path.is_symlink() and not path.exists():
                raise UserError(f"run.dir: {path} is a broken or looping symlink")
            if path.exists():
                if not path.is_dir():
                    raise UserError(f"run.dir: {path} exists and is not a directory")
                return
    except OSError as err:  # a name too long for the file system, say
        raise UserError(f"run.dir: {run_dir}: {err.strerror}") from None


# -- one process per run directory --------------------------------------------------------

_HELD: dict[str, tuple[int, int]] = {}  # resolved run dir -> (fd, depth)
LOCK_ENV = "LLMCTL_RUN_DIR_LOCKED"  # set for processes we launch (torchrun ranks): ours


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, held_elsewhere: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on a run directory for the whole command.

    ``flock`` on ``<run_dir>/.llmctl.lock``: the kernel releases it when the process ends, however
    it ends, so a killed run never leaves a lock that blocks the next one. Re-entrant within a
    process; processes this one launches (``LLMCTL_RUN_DIR_LOCKED``) share its lock.
    ``held_elsewhere``: another machine's llmctl holds it for this job (node 0 of several);
    this one takes none, and the processes it launches (global rank 0 among them, wherever
    the rendezvous puts it) know the job holds it.
    """
    import fcntl

    check_run_dir(run_dir)
    key = str(Path(run_dir).resolve())
    if distributed.is_launched() and not distributed.is_main_process():
        yield  # under torchrun, rank 0 holds the lock for the job
        return
    if held_elsewhere:
        with _env_set(LOCK_ENV, key):
            yield
        return
    if key in _HELD or os.environ.get(LOCK_ENV) == key:
        fd, depth = _HELD.get(key, (-1, 0))
        _HELD[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _HELD[key]
            _HELD[key] = (fd, depth - 1)
        return
    # The run directory and any parents this command makes (runs/ on a first run).
    created = [d for d in (Path(run_dir), *Path(run_dir).parents) if not d.exists()]
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    lock_path = Path(run_dir) / LOCK
    had_lock = lock_path.exists()
    found = {p.name for p in Path(run_dir).iterdir()} - {LOCK}
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(f"{run_dir}: in use by {holder}; wait for it to finish or use "
                                f"another --run-dir") from None
            raise
        # The holder before us may have removed the file (see below): lock the one on disk.
        if lock_path.exists() and os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} (llmctl, since {now_iso()})\n".encode(), 0)
    _HELD[key] = (fd, 1)
    try:
        with _env_set(LOCK_ENV, key):
            yield
    finally:
        del _HELD[key]
        os.ftruncate(fd, 0)
        # A command that wrote nothing leaves the run directory as it found it: no lock file
        # it did not find, and no directory it made.
        if not had_lock and {p.name for p in Path(run_dir).iterdir()} - {LOCK} == found:
            lock_path.unlink()
            for made in created:  # innermost first; each is empty once the one inside is gone
                made.rmdir()
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _env_set(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (and the processes it starts)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# -- one stage execution -------------------------------------------------------------------


def stage_of_path(path: str | Path, run_dir: Path) -> str | None:
    """``sft`` for ``<run_dir>/sft/adapter``: the stage whose output a path is, if any."""
    try:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve())
    except (ValueError, RuntimeError, OSError):  # outside it; a symlink loop (RuntimeError)
        return None
    return rel.parts[0] if len(rel.parts) > 1 and not rel.parts[0].startswith(".") else None


def input_fingerprints(recipe, stage: str) -> dict[str, dict[str, Any]]:
    """What each input looked like when a stage started: an upstream stage by its manifest
    (when it finished, with which config), anything else local by its content
    (``fingerprint.path_fingerprint``). Keyed by the path as stage hashes write it."""
    out = {}
    for path in recipe.input_paths(stage):
        if not is_local(path):
            continue
        upstream = stage_of_path(path, recipe.run_dir)
        manifest = read_manifest(recipe.run_dir / upstream) if upstream else None
        if manifest and manifest.get("status") == "complete":
            out[recipe.normalize_path(path)] = {"stage": upstream, **stage_identity(manifest)}
        elif (found := path_fingerprint(path)) is not None:
            out[recipe.normalize_path(path)] = found
    return out


def stage_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """Which execution of a stage produced an output (two runs can finish in one second)."""
    return {"run_id": manifest.get("run_id"), "finished_at": manifest.get("finished_at"),
            "config_hash": manifest.get("config_hash")}


@dataclass
class StageRun:
    """One execution of a stage: owns ``.partial/<stage>`` until :meth:`finish` publishes it."""

    run_dir: Path
    stage: str
    config_hash: str
    seed: int
    recipe: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # what config_hash is the hash of
    input_fingerprints: dict[str, Any] = field(default_factory=dict)
    started_at: str = field(default_factory=now_iso)
    # Under torchrun / accelerate launch only rank 0 writes; the others train and return.
    is_main_process: bool = field(default_factory=distributed.is_main_process)

    @classmethod
    def start(cls, recipe, stage: str, inputs: dict[str, str]) -> "StageRun":
        """Begin ``stage`` of ``recipe``: hash its config, fingerprint its inputs, take the
        work directory. Call it once every input is validated and loaded."""
        config = recipe.hashed_config(stage)

        return cls(recipe.run_dir, stage, config_hash(config), recipe.run.seed,
                   recipe.stage_config(stage).model_dump(),
                   {k: recipe.normalize_path(v) for k, v in inputs.items()}, config,
                   input_fingerprints(recipe, stage)).begin()

    def __post_init__(self) -> None:
        self.tracking: dict[str, str] = {}  # tracker and run name, when a Trainer logs to one
        self.run_dir = Path(self.run_dir)
        self.final_dir = self.run_dir / self.stage
        self.work_dir = self.run_dir / ".partial" / self.stage
        self.superseded_dir = self.run_dir / ".partial" / f"{self.stage}.superseded"
        self._t0 = time.time()

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        """Scratch space (a datasets Arrow cache): removed when the stage is published."""
        return self.run_dir / ".partial" / f"{self.stage}.cache"

    def begin(self) -> "StageRun":
        """Create (or reuse, when the config is unchanged) the work directory.

        Work left by an interrupted run with another config is moved aside, not deleted: it
        is discarded once this run has saved a checkpoint of its own (or finished), and
        restored if the old config comes back first.
        """
        global ACTIVE
        check_replaceable(self.final_dir, self.stage)
        # What this run found, so that abandon() can put it back.
        self._found = {"work": self.work_dir.exists(), "cache": self.cache_dir.exists(),
                       "partial": self.work_dir.parent.exists(), "set_aside": False}
        if self.is_main_process:
            found = _read_stamp(self.work_dir)
            if self.work_dir.exists() and found.get("config_hash") != self.config_hash:
                self._set_aside(found)
                self._found["set_aside"] = self.superseded_dir.exists()
            if not self.work_dir.exists() and \
                    _read_stamp(self.superseded_dir).get("config_hash") == self.config_hash:
                os.replace(self.superseded_dir, self.work_dir)
                self._found["work"] = True  # resumed: the interrupted run's work stays
                _say(f"  {self.stage}: the interrupted run kept aside has this config again: "
                     f"resuming it")
            self.work_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.work_dir / STAMP, {"config_hash": self.config_hash,
                                                "config": self.config})
        distributed.barrier()  # from here every rank sees the same work dir and checkpoints
        gpu_peak_memory(reset=True)  # each stage of `llmctl run` reports its own peak
        ACTIVE = self
        return self

    def abandon(self) -> None:
        """The stage refused its input after it began (a check that needs the loaded data or
        model): remove what this run made, put back what it set aside, as if it never began."""
        global ACTIVE
        ACTIVE = None
        found = getattr(self, "_found", None)
        if not self.is_main_process or found is None:
            return
        if not found["work"] or found["set_aside"]:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            if found["set_aside"]:
                os.replace(self.superseded_dir, self.work_dir)
        if not found["cache"]:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        if not found["partial"]:
            with contextlib.suppress(OSError):
                self.work_dir.parent.rmdir()  # only when empty

    def _set_aside(self, found: dict[str, Any]) -> None:
        if not self.last_checkpoint():
            shutil.rmtree(self.work_dir)  # nothing resumable in it
            return
        if self.superseded_dir.exists():
            shutil.rmtree(self.superseded_dir)  # older still than the one set aside now
        os.replace(self.work_dir, self.superseded_dir)

        change = describe_changes(found["config"], self.config) if "config" in found else ""
        _say(f"  {self.stage}: config changed since the interrupted run"
             f"{f' ({change})' if change else ''}; its "
             f"{Path(_last_checkpoint(self.superseded_dir / 'checkpoints')).name} is kept in "
             f"{self.superseded_dir} until this run saves its first checkpoint")

    def discard_superseded(self) -> None:
        """The interrupted run's checkpoints are no longer needed: this run has its own."""
        if self.is_main_process and self.superseded_dir.exists():
            ckpt = _last_checkpoint(self.superseded_dir / "checkpoints")
            shutil.rmtree(self.superseded_dir)
            _say(f"  {self.stage}: discarded the interrupted run's "
                 f"{Path(ckpt).name if ckpt else 'work'} (config had changed)")

    def last_checkpoint(self) -> str | None:
        return _last_checkpoint(self.checkpoint_dir)

    def path(self, name: str) -> Path:
        return self.work_dir / name

    def finish(self, metrics: dict[str, float], outputs: dict[str, str],
               keep_checkpoints: bool = False, extra: dict[str, Any] | None = None) -> Path:
        """Write the manifest and publish the stage directory atomically."""
        global ACTIVE
        if not self.is_main_process:
            ACTIVE = None
            return self.final_dir
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"metric {key} is not a number: {value!r}")
        metrics = {**metrics, **gpu_peak_memory()}
        check_replaceable(self.final_dir, self.stage)
        if self.tracking.get("dir") and self.path(self.tracking["dir"]).exists():
            outputs = {**outputs, "tracking": self.tracking["dir"]}
        if keep_checkpoints:
            outputs = {**outputs, "checkpoints": "checkpoints"}
        self._keep_only(outputs)
        extra = dict(extra or {})
        for name in outputs.values():
            if (self.path(name) / "adapter_config.json").is_file():
                extra.update(portable_adapter(self.path(name), self.final_dir / name,
                                              self.run_dir))
        manifest = {
            "stage": self.stage,
            "status": "complete",
            "run_id": uuid.uuid4().hex,
            "started_at": self.started_at,
            "finished_at": now_iso(),
            "wall_seconds": round(time.time() - self._t0, 3),
            "seed": self.seed,
            "config_hash": self.config_hash,
            "recipe": self.recipe,
            "inputs": self.inputs,
            "outputs": outputs,
            "versions": package_versions(),
            "metrics": metrics,
            **({"tracking": self.tracking} if self.tracking else {}),
            **extra,
            "fingerprint": {"config": self.config, "inputs": self.input_fingerprints},
        }
        _write_json(self.work_dir / MANIFEST, manifest)
        replace_dir(self.work_dir, self.final_dir)  # a crash leaves the old stage or the new
        self.discard_superseded()
        if self.cache_dir.exists():
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.run_dir / ".partial").rmdir()  # only when empty
        ACTIVE = None
        return self.final_dir

    def _keep_only(self, outputs: dict[str, str]) -> None:
        """A published stage holds its manifest and the outputs it lists, nothing else."""
        listed = {Path(rel).parts[0] for rel in outputs.values()}
        for entry in self.work_dir.iterdir():
            if entry.name in listed:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


STAMP = "stage_config.json"


def _read_stamp(work_dir: Path) -> dict[str, Any]:
    return read_json(work_dir / STAMP) or {}


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def gpu_peak_memory(reset: bool = False) -> dict[str, int]:
    """``peak_gpu_memory_bytes``: torch's CUDA allocator peak in this process (rank 0 under
    torchrun) since the stage began; nothing where no GPU was used."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return {}
    return {"peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated())}


def _last_checkpoint(checkpoint_dir: Path) -> str | None:
    if not checkpoint_dir.is_dir():
        return None
    ckpts = [p for p in checkpoint_dir.glob("checkpoint-*")
             if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    if not ckpts:
        return None
    return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1])))


def portable_adapter(adapter_dir: Path, final_dir: Path, run_dir: Path) -> dict[str, Any]:
    """Make a saved LoRA adapter independent of where its run directory lives, and say which
    base it fits.

    peft records the base as the path it was loaded from; a base inside the run directory is
    rewritten relative to the adapter's published location (``../../pretrain/model``), so
    ``mv runs/a runs/b`` keeps adapter and base together. ``base_fingerprint.json`` holds the
    base's config and weights digests; loading the adapter on another base is an error.
    """
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    base = config.get("base_model_name_or_path") or ""
    found = None
    if is_local(base) and Path(base).exists():
        found = model_fingerprint(base)
        resolved = Path(base).resolve()
        if resolved.is_relative_to(Path(run_dir).resolve()):
            config["base_model_name_or_path"] = os.path.relpath(resolved,
                                                                Path(final_dir).resolve())
            _write_json(config_path, config)
    record = {"base_model_name_or_path": config.get("base_model_name_or_path"),
              "fingerprint": found}
    _write_json(adapter_dir / BASE_FINGERPRINT, record)
    return {"base_model": record["base_model_name_or_path"], "base_fingerprint": found}
