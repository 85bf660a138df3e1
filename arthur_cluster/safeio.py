"""Bounded reads of files a user (or anybody) may have put in our way.

Only regular files are opened (a FIFO named config.json would otherwise block forever), sizes are capped
before reading, and JSON is refused past a nesting depth instead of failing deep inside the parser.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import ArthurError

MAX_JSON_DEPTH = 64  # real configs and headers nest a handful of levels
MAX_SMALL_FILE = 64 * 1024 * 1024  # config, index, tokenizer_config, records: far below this


class UnsafeFileError(ArthurError, OSError):
    """Not a regular file, or over a size cap: refused before reading. Also an OSError, so callers that
    treat an unreadable file as missing keep doing so."""


def open_regular(path: Path | str) -> BinaryIO:
    """Open for reading only if it is a regular file; O_NONBLOCK so opening a FIFO cannot block."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{path}: not a regular file (a FIFO, socket, device or folder); "
                                  "replace it with the real file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: Path | str, cap: int = MAX_SMALL_FILE) -> bytes:
    with open_regular(path) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise UnsafeFileError(f"{path}: larger than the {cap}-byte cap for this kind of file; it is not what "
                              "its name says (replace it with the real file)")
    return data


def too_deep(obj: object, cap: int = MAX_JSON_DEPTH) -> bool:
    """Iterative, so checking a hostile document cannot itself hit the recursion limit."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > cap:
                return True
            values = item.values() if isinstance(item, dict) else item
            stack.extend((v, depth + 1) for v in values if isinstance(v, (dict, list)))
    return False


def loads_json(raw: bytes | str, cap: int = MAX_JSON_DEPTH) -> object:
    """json.loads that raises ValueError (never RecursionError) and refuses nesting deeper than cap."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError(f"nested deeper than the parser allows (cap {cap} levels)") from None
    if too_deep(data, cap):
        raise ValueError(f"nested deeper than {cap} levels (the cap)")
    return data


def read_json(path: Path | str, cap: int = MAX_SMALL_FILE) -> object:
    """Parsed JSON of a small regular file. Raises OSError (incl. UnsafeFileError) or ValueError
    (incl. UnicodeDecodeError and too deep)."""
    return loads_json(read_regular(path, cap).decode("utf-8"))
