"""Run directory lifecycle (GUIDE §2).

A stage works in ``<run_dir>/.partial/<stage>/`` and only when it has finished is that
directory given its ``manifest.json`` and moved to ``<run_dir>/<stage>/`` with one rename. So:

* a downstream stage never mistakes work in progress for a finished output;
* a killed stage leaves its checkpoints in ``.partial`` and the next identical command resumes;
* a failing rerun never damages the previous finished output.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from llmctl import distributed
from llmctl.errors import UserError

MANIFEST = "manifest.json"
TRACKED_PACKAGES = (
    "llmctl", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deeplake",
    "tokenizers", "lm-eval", "neural-compressor", "optimum-intel", "openvino", "bitsandbytes",
)


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


def read_manifest(stage_dir: str | Path) -> dict[str, Any] | None:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(stage_dir: str | Path) -> bool:
    manifest = read_manifest(stage_dir)
    return bool(manifest) and manifest.get("status") == "complete"


def require_input(path: str, key: str) -> None:
    """Check a stage input that should exist locally; hub ids are left to the loader."""
    p = Path(path)
    if p.exists():
        if (p.parent / MANIFEST).exists() and not is_complete(p.parent):
            raise UserError(f"{key}: {path} belongs to an unfinished stage")
        return
    if (p.parent.parent / ".partial" / p.parent.name).exists():
        raise UserError(f"{key}: {path} does not exist yet: stage '{p.parent.name}' did not "
                        f"finish (rerun it to resume)")
    if looks_local(path):
        raise UserError(f"{key}: {path} does not exist (run the upstream stage first?)")


def looks_local(path: str) -> bool:
    """Hub ids look like 'gpt2' or 'org/name'; a path with more parts or a leading ./ is local."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


@dataclass
class StageRun:
    """One execution of a stage: owns ``.partial/<stage>`` until :meth:`finish` publishes it."""

    run_dir: Path
    stage: str
    config_hash: str
    seed: int
    recipe: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    started_at: str = field(default_factory=now_iso)
    # Under torchrun / accelerate launch only rank 0 writes; the others train and return.
    is_main_process: bool = field(default_factory=distributed.is_main_process)

    def __post_init__(self) -> None:
        self.tracking: dict[str, str] = {}  # tracker and run name, when a Trainer logs to one
        self.run_dir = Path(self.run_dir)
        self.final_dir = self.run_dir / self.stage
        self.work_dir = self.run_dir / ".partial" / self.stage
        self._t0 = time.time()

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / "checkpoints"

    def begin(self) -> "StageRun":
        """Create (or reuse, when the config is unchanged) the work directory."""
        stamp = self.work_dir / "config_hash"
        if self.work_dir.exists():
            if not stamp.exists() or stamp.read_text() != self.config_hash:
                if self.is_main_process:
                    shutil.rmtree(self.work_dir)  # leftovers of a different config: start over
        if self.is_main_process:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            stamp.write_text(self.config_hash)
        distributed.barrier()  # from here every rank sees the same work dir and checkpoints
        return self

    def last_checkpoint(self) -> str | None:
        if not self.checkpoint_dir.is_dir():
            return None
        ckpts = [p for p in self.checkpoint_dir.glob("checkpoint-*")
                 if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
        if not ckpts:
            return None
        return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1])))

    def path(self, name: str) -> Path:
        return self.work_dir / name

    def finish(self, metrics: dict[str, float], outputs: dict[str, str],
               keep_checkpoints: bool = False, extra: dict[str, Any] | None = None) -> Path:
        """Write the manifest and publish the stage directory atomically."""
        if not self.is_main_process:
            return self.final_dir
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"metric {key} is not a number: {value!r}")
        if not keep_checkpoints and self.checkpoint_dir.exists():
            shutil.rmtree(self.checkpoint_dir)
        (self.work_dir / "config_hash").unlink(missing_ok=True)
        manifest = {
            "stage": self.stage,
            "status": "complete",
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
            **(extra or {}),
        }
        tmp = self.work_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        os.replace(tmp, self.work_dir / MANIFEST)
        # Swap in: the old output (if any) is moved aside first, then removed once the new one is
        # in place, so a crash between the two renames leaves either the old or the new stage.
        trash = None
        if self.final_dir.exists():
            trash = self.run_dir / ".partial" / f"{self.stage}.old-{int(time.time())}"
            os.replace(self.final_dir, trash)
        os.replace(self.work_dir, self.final_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.final_dir
