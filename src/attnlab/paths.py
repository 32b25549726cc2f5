"""Where attnlab keeps files it builds once and reuses (assembled GGUF files, derived tokenizers, prepared models,
compiled decode steps), and how it keeps their number bounded."""

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """``$ATTNLAB_CACHE``, else ``$XDG_CACHE_HOME/attnlab``, else ``~/.cache/attnlab``; created on demand."""
    root = os.environ.get("ATTNLAB_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "attnlab") if xdg else str(Path.home() / ".cache" / "attnlab")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# Builds of one model and mode kept side by side: more than one, so that two installs sharing a cache (two virtual
# environments, machines with a shared home folder) do not delete each other's at every start.
KEPT_BUILDS = 2


def prune_older_builds(directory: Path, prefix: str, suffix: str, keep: int = KEPT_BUILDS) -> None:
    """Delete all but the ``keep`` most recently used files ``{prefix}*{suffix}`` in ``directory``.

    Why: a prepared model or a compiled decode step is named after what it depends on (attnlab's source, torch,
    the CPU), so every upgrade builds a new one (100-300 MB for SmolLM2) that no later version reads, and that
    nothing else would ever delete. "Used" is the file's mtime, which a load refreshes (:func:`mark_used`).
    """
    def last_used(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # deleted meanwhile by another process pruning the same builds
            return float("-inf")

    for old in sorted(directory.glob(f"{prefix}*{suffix}"), key=last_used, reverse=True)[keep:]:
        old.unlink(missing_ok=True)


def mark_used(path: Path) -> None:
    """Refresh a cached build's mtime, so that :func:`prune_older_builds` keeps what is in use."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache: nothing is pruned there either
        pass


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Text flavour of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))
