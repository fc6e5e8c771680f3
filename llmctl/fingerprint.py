"""Content fingerprints: what a stage read, and which base model an adapter was trained on.

Two kinds, both plain JSON so they live in manifests:

* :func:`path_fingerprint` of anything a stage reads (a dataset, a tokenizer, an upstream
  model): a cheap ``stat`` digest (names, sizes, modification times) plus a content digest.
  :func:`changed` trusts an equal ``stat`` and only re-reads the content when it differs, as
  git's index does, so a moved or copied run directory (new mtimes, same bytes) stays
  up to date without hashing big inputs on every ``llmctl run``.
* :func:`model_fingerprint` of a model directory: its ``config.json`` and the digest of its
  safetensors weights. Adapters carry their base's, and loading an adapter on a base that does
  not match is an error (``models.check_adapter_base``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
BASE_FINGERPRINT = "base_fingerprint.json"  # next to an adapter's adapter_config.json
WEIGHT_PATTERNS = ("*.safetensors",)


_SHA256: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """A file's sha256, read once per process for each state of the file (inode, size,
    modification time): a base model's weights are digested for a stage's input fingerprint,
    the adapter's base fingerprint and every adapter load, but read once."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        found += [Path(root) / name for name in sorted(files)]
    return found


def _rel(file: Path, root: Path) -> str:
    return file.name if file == root else file.relative_to(root).as_posix()


def stat_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in _files(path):
        st = file.stat()
        digest.update(f"{_rel(file, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def content_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in _files(path):
        digest.update(f"{_rel(file, path)}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()[:32]


def path_fingerprint(path: str | Path) -> dict[str, str] | None:
    """Fingerprint of a local file or directory; None for what has no local copy (hub ids,
    hub:// datasets), whose identity is its name (and revision) in the stage's config."""
    path = Path(path)
    if not path.exists():
        return None
    return {"stat": stat_digest(path), "content": content_digest(path)}


def changed(path: str | Path, recorded: dict[str, str] | None) -> bool:
    """Whether ``path`` differs from what ``recorded`` (a :func:`path_fingerprint`) saw."""
    if recorded is None:
        return False  # nothing local was read then: nothing to compare
    path = Path(path)
    if not path.exists():
        return True
    if stat_digest(path) == recorded.get("stat"):
        return False
    return content_digest(path) != recorded.get("content")


def model_fingerprint(model_dir: str | Path) -> dict[str, Any] | None:
    """``config.json`` digest and safetensors weights digest of a local model directory."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        return None
    weights = hashlib.sha256()
    for file in sorted(p for pattern in WEIGHT_PATTERNS for p in model_dir.glob(pattern)):
        weights.update(f"{file.name}\0{file_sha256(file)}\n".encode())
    canonical = json.dumps(json.loads(config.read_text()), sort_keys=True).encode()
    return {"config_sha256": hashlib.sha256(canonical).hexdigest()[:32],
            "weights_sha256": weights.hexdigest()[:32]}


# -- a stage's resolved config: its hash, and what changed between two --------------------------


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"sft": {"lr": 1}} -> {"sft.lr": 1}: the dotted keys --set uses."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe_changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """``sft.lr: 0.002 -> 0.001, data.sentiment.path changed``: what differs between two
    ``hashed_config`` results, at most ``limit`` items."""
    before, after = flatten(old), flatten(new)
    items = []
    for key in [*before, *(k for k in after if k not in before)]:
        if before.get(key, _MISSING) == after.get(key, _MISSING):
            continue
        if key not in before:
            items.append(f"{key} added ({after[key]!r})")
        elif key not in after:
            items.append(f"{key} removed")
        elif key.endswith(("path", "eval_path")) or key.startswith("inputs."):
            items.append(f"{key} changed ({before[key]} -> {after[key]})")
        else:
            items.append(f"{key}: {before[key]!r} -> {after[key]!r}")
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


_MISSING = object()
