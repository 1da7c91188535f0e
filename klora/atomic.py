"""Atomic output files: written under a temporary name beside the target, then renamed over it, so that
a reader never sees half a file and an interrupted write leaves nothing behind."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path, suffix: str = ".tmp"):
    """Yields a temporary file name beside ``path`` (ending in ``suffix``: some writers pick the format from
    it); when the block ends it is renamed over ``path``, and on any error it is removed. The file gets the
    permissions a plain ``open`` would give (``mkstemp`` makes it private, and the rename would keep that)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask)  # after the writer: some (safetensors) write a new file of their own
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
