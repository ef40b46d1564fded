"""Reading the files a command is pointed at (models, keys, signatures, config files).

``Path.read_bytes`` on a FIFO waits for a writer that never comes, and on ``/dev/zero`` fills
memory: a start-up that hangs or dies of ``MemoryError`` instead of one line saying which file is
wrong, and a hot reload that stalls the filter's loop for good. ``open_regular`` and
``read_small`` refuse anything but a regular file (``read_small`` also one of implausible size),
with an ``OSError`` whose ``strerror`` says why, which every caller already turns into its own
one-line message.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

MAX_SMALL_FILE = 16 << 20  # keys, signatures and config files are kilobytes


def _open_regular_fd(path: str | Path) -> tuple[int, os.stat_result]:
    """A descriptor on regular file ``path`` and its stat, or ``OSError``. The type is checked
    on the opened descriptor, so a FIFO or device swapped in after a ``stat`` is caught too."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file (a folder, FIFO or device)")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_regular(path: str | Path) -> BinaryIO:
    """``open(path, "rb")`` for a regular file only: ``OSError`` for a FIFO, a device, a folder."""
    fd, _ = _open_regular_fd(path)
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: str | Path) -> bytes:
    """All the bytes of regular file ``path`` (a model: no size limit but the file's), or
    ``OSError``."""
    with open_regular(path) as f:
        return f.read()


def read_small(path: str | Path, limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of regular file ``path``, at most ``limit`` of them, or ``OSError``."""
    fd, st = _open_regular_fd(path)
    try:
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"it is {st.st_size} bytes, more than {limit}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:  # it grew since
            raise OSError(errno.EFBIG, f"it is more than {limit} bytes")
        return data
    finally:
        os.close(fd)
