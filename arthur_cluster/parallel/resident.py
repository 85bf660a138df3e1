"""Start, check and stop the resident ranks of a deployment (the server in parallel/server.py).

The ranks are started detached (their own session), so they outlive the command that started them. Right after
they are spawned, where they run is written to paths.state_dir()/resident.json, before anything is waited for:
a start killed at any point leaves a file `down` reads to stop them, and `doctor`/`up` read to say they are gone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import requests
from pydantic import BaseModel, Field, ValidationError

from .. import paths
from ..errors import ArthurError
from ..hostfile import Host, free_ports, loopback_ring, rank_env, write_hostfile

_children: dict[int, subprocess.Popen] = {}  # ranks this process started: reaped when stopped


class ResidentError(ArthurError, RuntimeError):
    """The resident ranks could not start, or are gone; the message says which rank and why."""


class Resident(BaseModel):
    """Where a deployment's ranks listen and run (what `down` stops and `doctor` checks)."""

    url: str  # rank 0's HTTP base, e.g. http://127.0.0.1:8765
    model: str
    model_path: str
    mode: str
    backend: str
    n: int
    hosts: list[str] = Field(default_factory=list)  # ssh names in rank order; empty: all ranks on this machine
    pids: list[int] = Field(default_factory=list)  # local processes (each leads its process group): the
    # ranks, or the mlx.launch launcher
    control: str = ""
    token: str = ""
    logdir: str = ""
    started_at: str = ""

    @property
    def endpoint(self) -> str:
        return self.url + "/v1"


def state_file() -> Path:
    return paths.state_dir() / "resident.json"


def read_state() -> Resident | None:
    try:
        return Resident.model_validate_json(state_file().read_text(encoding="utf-8"))
    except (FileNotFoundError, ValidationError, ValueError):
        return None


# --- starting ---------------------------------------------------------------------------------------------


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in a session of its own (it outlives us; its group, led by it, is what gets signalled)."""
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    _children[p.pid] = p
    return p


def start(path: Path, model_id: str, *, mode: str, n: int, hosts: list[Host] | None = None, backend: str = "ring",
          bind: str = "127.0.0.1", port: int | None = None, python: str | None = None, prefill_step: int = 2048,
          timeout: float = 600.0, entry: list[str] | None = None, extra: list[str] | None = None,
          say: Callable[[str], None] = lambda s: None) -> Resident:
    """Start the ranks, wait until rank 0 answers /health, and return where they are."""
    python = python or sys.executable
    logdir = paths.state_dir() / "resident" / (datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3))
    logdir.mkdir(parents=True, exist_ok=True)
    port = port or free_ports(1, bind if bind not in ("0.0.0.0", "::") else "127.0.0.1")[0]
    # The other ranks reach rank 0 (this machine, hosts[0]) at its first IP, else at its ssh name.
    ctrl_host = (hosts[0].ips[0] if hosts[0].ips else hosts[0].ssh) if hosts else "127.0.0.1"
    ctrl_port = free_ports(1)[0]
    entry = entry or ["-m", "arthur_cluster.parallel.server"]
    args = [*entry, "--model", str(path), "--model-id", model_id, "--mode", mode, "--backend", backend,
            "--bind", bind, "--port", str(port), "--control", f"{ctrl_host}:{ctrl_port}",
            "--control-bind", "0.0.0.0" if hosts else "127.0.0.1", "--control-port", str(ctrl_port),
            "--prefill-step", str(prefill_step), *(extra or [])]
    token = secrets.token_hex(16)
    env = {"ARTHUR_RESIDENT_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    url = f"http://{'127.0.0.1' if bind in ('0.0.0.0', '::') else bind}:{port}"
    res = Resident(url=url, model=model_id, model_path=str(path), mode=mode, backend=backend, n=n,
                   hosts=[h.ssh for h in hosts] if hosts else [], control=f"{ctrl_host}:{ctrl_port}", token=token,
                   logdir=str(logdir), started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    procs: list[subprocess.Popen] = []
    try:
        if hosts:  # mlx.launch reaches the nodes over ssh; rank 0 is this machine (hosts[0])
            own = Path(python).parent / "mlx.launch"
            launcher = str(own) if own.is_file() else shutil.which("mlx.launch") or str(own)
            hostfile = write_hostfile(logdir / "hosts.json", backend, hosts)
            cmd = [launcher, "--backend", backend, "--hostfile", str(hostfile), "--python", python, "--",
                   *args, "--repo-id", model_id]
            procs.append(_spawn(cmd, env, logdir / "launcher.log"))
            res.pids = [procs[0].pid]
        else:
            ring = loopback_ring(n) if backend == "ring" and n > 1 else None
            nccl = free_ports(1)[0] if backend == "nccl" else None
            for r in range(n):
                renv = rank_env(backend, r, n, files=logdir, ring=ring, nccl_port=nccl) if n > 1 else {}
                procs.append(_spawn([python, *args], {**env, **renv}, logdir / f"rank{r}.log"))
                res.pids = [p.pid for p in procs]
        paths.write_atomic(state_file(), res.model_dump_json(indent=2) + "\n")
        _wait_ready(res, procs, timeout, say)
    except BaseException:
        stop(res)
        raise
    return res


def _log_tail(res: Resident, lines: int = 6) -> str:
    out = []
    for f in sorted(Path(res.logdir).glob("*.log")):
        text = [t for t in f.read_text(errors="replace").splitlines() if t.strip()]
        if text:
            out.append(f"{f.stem}: " + " | ".join(text[-lines:]))
    return "; ".join(out)


def _wait_ready(res: Resident, procs: list[subprocess.Popen], timeout: float, say) -> None:
    deadline = time.monotonic() + timeout
    said = False
    while True:
        h = health(res)
        if h is not None and h.get("status") == "ok":
            return
        if h is not None and h.get("status") == "failed":
            raise ResidentError(f"the {res.mode} ranks of {res.model} failed: {h.get('reason')}")
        for i, p in enumerate(procs):
            if p.poll() is not None:
                what = "the launcher" if res.hosts else f"rank {i}"
                raise ResidentError(f"{what} of {res.model} exited with code {p.returncode} while loading: "
                                    f"{_log_tail(res) or 'no output'} (logs in {res.logdir})")
        if time.monotonic() > deadline:
            raise ResidentError(f"the ranks of {res.model} were not ready within {timeout:.0f} s; they were "
                                f"stopped (logs in {res.logdir})")
        if not said and h is not None:
            say(f"ranks started; loading {res.model} on {res.n} rank(s)")
            said = True
        time.sleep(0.2)


# --- checking ---------------------------------------------------------------------------------------------


def health(res: Resident, timeout: float = 2.0) -> dict | None:
    """Rank 0's /health body (also when it answers 503), or None when nothing answers at the port."""
    try:
        r = requests.get(res.url + "/health", timeout=timeout)
        return r.json()
    except (requests.RequestException, ValueError):
        return None


def _alive(pid: int) -> bool:
    if pid in _children:
        return _children[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited (Linux; elsewhere the parent that is gone no longer holds one)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def problem(res: Resident) -> str | None:
    """None when rank 0 answers healthy; else one line saying what is wrong with the recorded ranks."""
    h = health(res)
    if h is not None and h.get("status") == "ok":
        return None
    alive = [p for p in res.pids if _alive(p)]
    if h is not None and h.get("status") == "failed":
        return f"the resident ranks of {res.model} at {res.url} have failed: {h.get('reason')}"
    if h is not None:
        return f"the resident ranks of {res.model} at {res.url} are still loading"
    gone = "all its processes are gone" if not alive else f"processes {alive} still run"
    return (f"stale record: nothing answers at {res.url} (ranks of {res.model}, started {res.started_at}) and "
            f"{gone}; `arthur-cluster down` cleans it up")


# --- stopping ---------------------------------------------------------------------------------------------


def _signal_group(pid: int, sig: int) -> None:
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(res: Resident, grace: float = 10.0) -> list[str]:
    """Ask rank 0 to stop the group; then SIGTERM, SIGKILL what is left; remove the state file."""
    actions = []
    try:
        r = requests.post(res.url + "/admin/shutdown", headers={"Authorization": f"Bearer {res.token}"}, timeout=3)
        if r.status_code == 200:
            actions.append(f"asked rank 0 at {res.url} to stop")
    except requests.RequestException:
        pass
    end = time.monotonic() + grace
    while time.monotonic() < end and any(_alive(p) for p in res.pids):
        time.sleep(0.1)
    left = [p for p in res.pids if _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not left:
            break
        for p in left:
            _signal_group(p, sig)
        end = time.monotonic() + 3
        while time.monotonic() < end and any(_alive(p) for p in left):
            time.sleep(0.05)
        actions.append(f"sent {signal.Signals(sig).name} to {left}")
        left = [p for p in left if _alive(p)]
    for p in res.pids:  # a group may hold more (a launcher's children)
        _signal_group(p, signal.SIGKILL)
    for p in res.pids:
        child = _children.pop(p, None)
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
    actions.append(f"stopped the resident ranks of {res.model} ({', '.join(map(str, res.pids)) or 'none'})"
                   if not left else f"could not stop processes {left}")
    cur = read_state()
    if cur is None or cur.url == res.url:
        state_file().unlink(missing_ok=True)
    return actions


__all__ = ["Resident", "ResidentError", "start", "stop", "health", "problem", "read_state", "state_file"]
