"""Crash-safe file writes: write beside the target, then rename over it.

``os.replace`` is atomic on POSIX and Windows within one file system, so a reader (or a run
killed mid-write) sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moekit.errors import WriteError


@contextmanager
def cleaned_up(partial: Path, what: Path) -> Iterator[None]:
    """Remove ``partial`` (a temporary file or directory) if the block fails; an ``OSError``
    (a full disk, a read-only file system...) becomes a one-line :class:`WriteError` naming
    ``what``, the file that was not replaced."""
    try:
        yield
    except BaseException as exc:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            reason = exc.strerror or type(exc).__name__
            raise WriteError(
                f"{what}: cannot write ({reason}); the previous copy is intact"
            ) from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync before the rename). On failure the
    temporary file is removed and ``path`` keeps its previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with cleaned_up(tmp, path):
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    return path


def replace_dir(staging: str | Path, target: str | Path) -> Path:
    """Move a fully written ``staging`` directory to ``target``, replacing it.

    The old ``target`` is first renamed aside and deleted only after the new one is in place,
    so at every instant one complete directory exists under ``target`` or its ``.old`` name.
    """
    staging, target = Path(staging), Path(target)
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    if old.exists():
        shutil.rmtree(old)
    return target
