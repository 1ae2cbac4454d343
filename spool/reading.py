"""Reading a prompt file without trusting it: the file named on a command line
(``daemon.py FILE``, ``--dry-run``, ``submit.py submit``) and, for its refusals, the spool.

Only a regular file is read, and only when its size is within the limit: the size is
checked on the opened descriptor before a byte is read, and the read stops at the limit
anyway (the file may grow). The open never blocks: a FIFO, a device or a directory is
opened non-blocking and refused by its type, so ``/dev/zero`` or a pipe nobody writes to
costs nothing.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from statemachine.admission import admit
from statemachine.errors import BadInput
from statemachine.plan import BatchPlan
from statemachine.planner import PlanDefaults

_SPECIAL = {stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFSOCK: "socket",
            stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}


def kind_refusal(mode: int) -> str | None:
    """Why an entry of this type is not a prompt file, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory, not a prompt file: drop the files themselves"
    if stat.S_ISLNK(mode):
        return "a symbolic link (links are not followed): drop the file itself"
    kind = _SPECIAL.get(stat.S_IFMT(mode), "special file")
    return f"a {kind}, not a regular file: drop a regular file"


def size_refusal(size: int, max_bytes: int) -> str | None:
    if size <= max_bytes:
        return None
    return f"{size:,} bytes: larger than the limit of {max_bytes:,} bytes (MAX_FILE_BYTES)"


def read_prompt_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file at ``path`` (links followed: the user named it), at
    most ``max_bytes`` of them; BadInput says why not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BadInput(f"cannot open it: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        why = kind_refusal(st.st_mode) or size_refusal(st.st_size, max_bytes)
        if why is not None:
            raise BadInput(why)
        data = read_at_most(fd, max_bytes + 1)
    except OSError as exc:
        raise BadInput(f"cannot read it: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BadInput(f"grew past the limit of {max_bytes:,} bytes (MAX_FILE_BYTES) while "
                       "being read")
    return data


def plan_file(path: Path, settings: PlanDefaults, batch_id: str = "b0000"
              ) -> tuple[bytes, BatchPlan]:
    """Read and plan the prompt file at ``path`` exactly as the daemon will: its bytes and
    its plan; BadInput says what is wrong with it."""
    data = read_prompt_file(path, settings.max_file_bytes)
    return data, admit(data, path.name, batch_id=batch_id, settings=settings)


def read_at_most(fd: int, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0 and (chunk := os.read(fd, left)):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
