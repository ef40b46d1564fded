"""Reading the small files a command is pointed at (keys, signatures, config files).

``Path.read_bytes`` on a FIFO waits for a writer that never comes, and on ``/dev/zero`` fills
memory: a start-up that hangs or dies of ``MemoryError`` instead of one line saying which file is
wrong. ``read_small`` refuses anything but a regular file of a plausible size, with an ``OSError``
whose ``strerror`` says why, which every caller already turns into its own one-line message.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

MAX_SMALL_FILE = 16 << 20  # keys, signatures and config files are kilobytes


def read_small(path: str | Path, limit: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of regular file ``path``, at most ``limit`` of them, or ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "it is not a regular file (a folder, FIFO or device)")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"it is {st.st_size} bytes, more than {limit}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        if len(data) > limit:  # it grew since
            raise OSError(errno.EFBIG, f"it is more than {limit} bytes")
        return data
    finally:
        os.close(fd)
