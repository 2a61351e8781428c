"""Writing files so that a reader never sees a partial one: the package's one way to do it.

`replacing(path)` yields a temporary path in the same folder; when the block ends without an
exception the temporary file is flushed to disk and renamed over `path` (os.replace, atomic on
POSIX within one file system), otherwise it is removed and `path` keeps its old content. Used by
the distillation checkpoints, the emulated CUDA build, the launched-kernel report and the
digits script.
"""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def replacing(path, suffix: str = ''):
    """Yield a temporary file name beside `path` (ending in `suffix`, for tools that read the
    format from the extension); on success it replaces `path`."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + '.',
                               suffix='.tmp' + suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
