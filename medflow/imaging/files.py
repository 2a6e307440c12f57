"""What makes one file unreadable as an image file, in words (:func:`file_problem`), and how a path that is not
valid UTF-8 is shown in a CSV (:func:`shown_path`): shared by the manifest, which lists such a file with a blank
sha256, and the filter, which gives it an ``unreadable`` reject row. Imports nothing of medflow (the filter's
worker processes import this package)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path


def file_problem(path: Path | str) -> str:
    """Why the file at ``path`` cannot be read as an image file, in words, or "" when it is a readable regular
    file: a broken symlink, a FIFO/device/socket (never opened for a blocking read), no read permission, or a
    name that is not valid UTF-8 (listed with ``\\x`` escapes, see :func:`shown_path`)."""
    return file_state(str(path))[0]


def file_state(path: str) -> tuple[str, int]:
    """:func:`file_problem` of ``path`` and its size in bytes (-1 where it has none): one ``stat`` for both."""
    if shown_path(path) != path or (_ESCAPED.search(path) and not os.path.lexists(path)):
        return "file name is not valid UTF-8 (shown with \\x escapes): rename the file", -1
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken symlink (points to {shown_path(os.readlink(path))}, which does not exist)", -1
        return "no such file", -1
    except OSError as e:
        return f"cannot read: {e.strerror or e}", -1
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file (a {_kind(st.st_mode)}); not read", -1
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)))
    except OSError as e:
        return f"cannot read: {e.strerror or e}", -1
    return "", st.st_size


_ESCAPED = re.compile(r"\\x[89a-f][0-9a-f]")  # a byte of a non-UTF-8 name, as shown_path writes it


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def shown_path(text: str) -> str:
    """``text`` (a path) as a CSV can hold it: a name that is not valid UTF-8 (lone surrogates after
    ``os.fsdecode``) gets each undecodable byte as ``\\xNN``; any other path is unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
