"""Start rank processes in one process group, read rank 0's JSON lines, and end them all together.

Any rank's death, an error line, or a timeout kills the whole group (SIGTERM, then SIGKILL), so a blocked
collective never leaves processes behind. On Linux each rank is also told to die with its parent.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from ..errors import ArthurError


EXIT_GRACE = 30.0  # seconds the other ranks get to exit once rank 0 has finished


class RankFailed(ArthurError, RuntimeError):
    """A rank died, reported an error, or the job ran past its time."""


def _die_with_parent() -> None:  # runs in the child before exec (Linux only)
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class RankProcesses:
    """Processes of one job. `commands[0]` is rank 0 (or a launcher whose output carries rank 0's lines)."""

    def __init__(self, commands: list[list[str]], envs: list[dict[str, str]] | None = None,
                 cwd: str | Path | None = None, names: list[str] | None = None):
        self.names = names or [f"rank {i}" for i in range(len(commands))]
        self._logdir = Path(tempfile.mkdtemp(prefix="arthur-ranks-"))
        self.procs: list[subprocess.Popen] = []
        self._lines: queue.Queue = queue.Queue()
        pre = _die_with_parent if sys.platform.startswith("linux") else None
        try:
            for i, cmd in enumerate(commands):
                env = {**os.environ, **((envs or [{}] * len(commands))[i])}
                kw = {"process_group": 0 if i == 0 else self.procs[0].pid}
                with open(self._logdir / f"{i}.err", "wb") as err, \
                        open(self._logdir / f"{i}.out", "wb") if i else open(os.devnull, "wb") as log:
                    out = subprocess.PIPE if i == 0 else log
                    self.procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err,
                                                       stdin=subprocess.DEVNULL, preexec_fn=pre, **kw))
        except Exception:
            self.kill()
            raise
        self.pgid = self.procs[0].pid
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _read(self) -> None:
        for raw in self.procs[0].stdout:
            self._lines.put(raw.decode(errors="replace"))
        self._lines.put(None)

    def tail(self, i: int, kind: str = "err", lines: int = 6) -> str:
        p = self._logdir / f"{i}.{kind}"
        if not p.exists():
            return ""
        text = p.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def _dead(self) -> tuple[int, int] | None:
        for i, p in enumerate(self.procs[1:], start=1):
            rc = p.poll()
            if rc is not None and rc != 0:
                return i, rc
        return None

    def _explain(self, i: int, rc: int) -> str:
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        detail = self.tail(i) or self.tail(i, "out")
        return f"{self.names[i]} {how}" + (f": {detail}" if detail else "")

    def events(self, timeout: float = 600.0, idle: float | None = None) -> Iterator[dict]:
        """Rank 0's JSON events until it exits. Raises RankFailed (after killing the group) on an error."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        try:
            while True:
                try:
                    line = self._lines.get(timeout=0.1)
                except queue.Empty:
                    line = ""
                    now = time.monotonic()
                    if now > deadline:
                        raise RankFailed(f"the job ran past its {timeout:.0f} s limit; all ranks were stopped")
                    if idle and now - last > idle:
                        raise RankFailed(f"no output from rank 0 for {idle:.0f} s; all ranks were stopped")
                    if (dead := self._dead()) is not None:
                        raise RankFailed(self._explain(*dead) + "; all ranks were stopped")
                    continue
                if line is None:  # rank 0's stdout closed: it has exited
                    rc = self.procs[0].wait()
                    if rc != 0:
                        raise RankFailed(self._explain(0, rc) + "; all ranks were stopped")
                    for i, p in enumerate(self.procs[1:], start=1):  # they finish with rank 0, or hang
                        rc = p.wait(timeout=min(EXIT_GRACE, max(1.0, deadline - time.monotonic())))
                        if rc != 0:
                            raise RankFailed(self._explain(i, rc))
                    return
                last = time.monotonic()
                line = line.strip()
                if not line.startswith("{"):
                    continue  # launcher chatter, warnings
                try:
                    ev = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if ev.get("event") == "error":
                    where = f"rank {ev['rank']}" if ev.get("rank") not in (None, "") else "a rank"
                    msg = f"{where} failed: {ev.get('message')}"
                    end = time.monotonic() + 1.0  # a lost peer is usually the effect: name the cause
                    while (dead := self._dead()) is None and time.monotonic() < end:
                        time.sleep(0.05)
                    if dead is not None:
                        msg = f"{self._explain(*dead)} ({msg})"
                    raise RankFailed(msg + "; all ranks were stopped")
                yield ev
        except subprocess.TimeoutExpired as e:
            raise RankFailed(f"a rank did not exit after rank 0 finished ({e})") from None
        finally:
            self.kill()

    def kill(self, grace: float = 2.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left; reap every process."""
        if not self.procs:
            return
        alive = [p for p in self.procs if p.poll() is None]
        if alive:
            self._signal(signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end and any(p.poll() is None for p in alive):
                time.sleep(0.05)
        self._signal(signal.SIGKILL)  # also reaches grandchildren left in the group
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            if p.stdout:
                p.stdout.close()
        shutil.rmtree(self._logdir, ignore_errors=True)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.procs[0].pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in self.procs:  # in case a process left the group
            if p.poll() is None:
                try:
                    p.send_signal(sig)
                except ProcessLookupError:
                    pass
