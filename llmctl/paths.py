"""What a path-like string in a recipe is: a local path, a hub id or a remote dataset URL."""

from __future__ import annotations

from pathlib import Path

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
