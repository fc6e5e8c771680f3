"""What a path-like string in a recipe is (a local path, a hub id or a remote dataset URL), what
kind of model directory a local path is, reading the small files llmctl reads, and putting a
finished directory in place of an old one."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
from pathlib import Path

from llmctl.errors import UserError

REMOTE_SCHEMES = ("hub://", "al://", "s3://", "gcs://", "gs://", "azure://")


def is_remote(path: str) -> bool:
    return path.startswith(REMOTE_SCHEMES)


def exists(path: str | Path) -> bool:
    """Whether a path exists; one the system cannot even look up (a name longer than the file
    system allows) does not."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def looks_local(path: str) -> bool:
    """Hub ids look like 'gpt2' or 'org/name'; a path with more parts or a leading ./ is local.
    An 'org/name' whose first part is a local directory is a local path too."""
    if is_remote(path) or path.startswith("mem://"):
        return False
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or path.lower().endswith(".gguf"):
        return True
    return "/" in path and exists(path.split("/", 1)[0]) and Path(path.split("/", 1)[0]).is_dir()


def is_local(path: str) -> bool:
    """A path on this machine (existing, or written as one): not a hub id or remote URL."""
    if is_remote(path) or path.startswith("mem://"):
        return False
    return looks_local(path) or exists(path)


def demo_hint(path: str) -> str:
    """For a missing path the demo makes (recipes/demo*.toml read runs/demo/...): how to make it."""
    return "; `llmctl demo` builds runs/demo first" if "runs/demo/" in f"{path}/" else ""


# -- what kind of model directory ------------------------------------------------------------

QUANTIZED_MARKER = "quantization.json"  # a quantize stage's output: backend and settings


def is_quantized_dir(path: str | Path) -> bool:
    return (Path(path) / QUANTIZED_MARKER).is_file()


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The base an adapter names; a relative name is relative to the adapter directory (llmctl
    writes bases inside a run directory so), else to the working directory, else a hub id."""
    config = read_json(Path(path) / "adapter_config.json")
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path}/adapter_config.json: names no base_model_name_or_path")
    beside = Path(path) / base
    if not Path(base).is_absolute() and beside.exists():
        return str(beside.resolve())
    return base


# -- reading ---------------------------------------------------------------------------------


def read_text(path: Path, what: str = "") -> str:
    """A text file's content; not UTF-8 is a user error naming the file and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: {what + ' ' if what else ''}not UTF-8 text (byte "
                        f"0x{err.object[err.start]:02x} at offset {err.start})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None


def read_json(path: Path) -> dict:
    """A JSON object from a file; unreadable, not JSON or not an object is a user error."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(found, dict):
        raise UserError(f"{path}: not a JSON object")
    return found


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory ``new`` where ``target`` is, then delete the old ``target``.

    Where a directory already stands at ``target``, a reader (or a crash) sees the old one or the
    new one, never neither: on Linux the two are exchanged in one ``renameat2`` call; elsewhere
    the old one is moved aside first and moved back if the second rename fails."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # it holds the old directory now
        return
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux's ``renameat2(RENAME_EXCHANGE)``); False where the
    kernel, C library or file system cannot, so that the caller takes the two-rename way."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, or another C library
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
