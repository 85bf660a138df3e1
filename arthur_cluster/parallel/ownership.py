"""Which processes are the ranks of a deployment: proved before any signal, found even without a record.

A PID alone proves nothing (it is reused, and a record can be stale, forged or corrupt). A process counts as a
rank of deployment D only when all of these hold: its PID is above 1 and not this process; it runs as this
user; it started when the record says (Linux: /proc/<pid>/stat's start time; elsewhere `ps`'s); and its command
line carries `--deployment D`, the random id `resident.start` gave that deployment.

Every local rank (or the launcher, across hosts) also holds a lock file, locks_dir()/<D>.<name>.lock, with
flock. The starting process creates it under a temporary name, locks it, writes what it describes and only
then renames it into place, and hands the locked descriptor to the rank: from before the rank exists until
its last process ends, the lock is held and the file is visible. A lock file nobody holds is stale and is
removed by whoever scans. The folder is the state folder's, 0700: nobody else can create or hold one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import paths

ENV_LOCK = "ARTHUR_RANK_LOCK"  # path of the rank's lock file (the rank rewrites it with its own pid)
ENV_LOCK_FD = "ARTHUR_RANK_LOCK_FD"  # the descriptor, inherited, that holds it
LOCK_MAX = 4096  # bytes of one lock file
MAX_LOCKS = 256  # lock files looked at in one scan
_ID = re.compile(r"[0-9a-f]{16,64}")


def locks_dir() -> Path:
    return paths.state_dir() / "ranks"


def new_id() -> str:
    return secrets.token_hex(8)


def valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


# --- what a process is --------------------------------------------------------------------------------------


@dataclass
class Proc:
    pid: int
    uid: int
    start: str
    command: str  # the arguments joined by spaces


def _linux(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096).decode(errors="replace")
        uid = os.stat(f"/proc/{pid}").st_uid
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(256 * 1024)
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None  # gone, or a zombie (it has exited)
    return Proc(pid, uid, fields[19], argv.replace(b"\0", b" ").decode(errors="replace").strip())


def _ps(pid: int) -> Proc | None:
    try:
        out = subprocess.run(["ps", "-ww", "-o", "uid=,state=,lstart=,command=", "-p", str(pid)],  # -ww: whole
                             capture_output=True, text=True, timeout=10).stdout.strip()  # command lines
    except (OSError, subprocess.SubprocessError):
        return None
    parts = out.split()
    if len(parts) < 8 or not parts[0].isdigit() or parts[1].startswith("Z"):
        return None
    return Proc(pid, int(parts[0]), " ".join(parts[2:7]), " ".join(parts[7:]))


def identity(pid: int) -> Proc | None:
    """The process with this PID (None when there is none, or it has exited)."""
    if type(pid) is not int or pid <= 0:
        return None
    return _linux(pid) if sys.platform.startswith("linux") else _ps(pid)


def start_of(pid: int) -> str:
    p = identity(pid)
    return p.start if p else ""


def check(pid: object, deployment: str, start: str = "") -> str | None:
    """None when `pid` is provably a process of `deployment`; else why it is not (said to the user)."""
    if type(pid) is not int or pid <= 1:
        return f"{pid!r} is not a process id a rank can have"
    if pid == os.getpid():
        return "that is this very process"
    p = identity(pid)
    if p is None:
        return "no such process (already gone)"
    if p.uid != os.getuid():
        return f"it belongs to another user (uid {p.uid})"
    if not valid_id(deployment):
        return "the record names no deployment id, so no process can be proved to be its rank"
    if start and p.start != start:
        return "it started at another time than the recorded rank (its PID was reused)"
    if f"--deployment {deployment}" not in p.command:
        return "it is not a rank of this deployment (its command line lacks the deployment's id)"
    return None


def gone(why: str | None) -> bool:
    return why is not None and why.startswith("no such process")


# --- lock files -----------------------------------------------------------------------------------------------


@dataclass
class Held:
    """A lock file this process created and holds until it hands the descriptor to the rank."""

    path: Path
    fd: int
    info: dict


def hold(deployment: str, name: str, info: dict) -> Held:
    folder = paths.private_dir(locks_dir())
    final = folder / f"{deployment}.{name}.lock"
    tmp = folder / f".{final.name}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = Held(final, fd, {"deployment": deployment, "name": name, **info})
        _write(fd, held.info)
        os.rename(tmp, final)  # visible only once locked: a scan never takes it for a stale one
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return held


def _write(fd: int, info: dict) -> None:
    data = json.dumps(info).encode()[:LOCK_MAX]
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def note_pid(held: Held, pid: int) -> str:
    """Write the spawned process's pid and start time into its lock file; returns the start time."""
    start = start_of(pid)
    held.info.update(pid=pid, start=start)
    _write(held.fd, held.info)
    return start


def release(held: Held) -> None:
    """This process lets go of its descriptor (the rank keeps its own)."""
    try:
        os.close(held.fd)
    except OSError:
        pass


def claim() -> None:
    """In a rank: put its own pid in the lock file it inherited (covers a start killed right after the spawn)."""
    path, fd = os.environ.get(ENV_LOCK), os.environ.get(ENV_LOCK_FD, "")
    if not path or not fd.isdigit():
        return
    try:
        st, mine = os.stat(path, follow_symlinks=False), os.fstat(int(fd))
        if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            return  # not the descriptor the starter handed over
        info = json.loads(os.pread(int(fd), LOCK_MAX, 0) or b"{}")
        if isinstance(info, dict):
            info.update(pid=os.getpid(), start=start_of(os.getpid()))
            _write(int(fd), info)
    except (OSError, ValueError):
        pass  # the starter's copy of the pid still describes it


@dataclass
class Live:
    """A held lock file: a process of a deployment (pid 0 while it is being spawned)."""

    path: Path
    deployment: str
    name: str
    pid: int
    start: str
    model: str
    url: str


def _read(fd: int, path: Path) -> Live | None:
    try:
        info = json.loads(os.pread(fd, LOCK_MAX, 0) or b"{}")
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    pid = info.get("pid", 0)
    dep = info.get("deployment")
    if not valid_id(dep) or not path.name.startswith(dep + ".") or type(pid) is not int:
        return None
    text = {k: str(info.get(k, ""))[:512] for k in ("name", "start", "model", "url")}
    return Live(path, dep, text["name"], pid, text["start"], text["model"], text["url"])


def _young(path: Path, age: float = 60.0) -> bool:
    import time

    try:
        return time.time() - path.lstat().st_mtime < age
    except OSError:
        return True


def live(clean: bool = False) -> list[Live]:
    """Every held lock file under locks_dir(); with `clean`, lock files nobody holds are removed on the way
    (`doctor` changes nothing, so it does not clean)."""
    folder = locks_dir()
    try:
        names = sorted(os.listdir(folder))[:MAX_LOCKS]
    except OSError:
        return []
    out = []
    for name in names:
        path = folder / name
        if name.startswith(".") and _young(path):
            continue  # a lock file being created right now (it is locked before it gets its name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                found = _read(fd, path) if name.endswith(".lock") and not name.startswith(".") else None
                if found is not None:
                    out.append(found)
                continue
            if clean:
                path.unlink(missing_ok=True)  # nobody holds it: what it described has ended
        except OSError:
            continue
        finally:
            os.close(fd)
    return out


__all__ = ["check", "claim", "hold", "identity", "live", "locks_dir", "new_id", "note_pid", "release"]
