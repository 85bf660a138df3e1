"""Start, check and stop the resident ranks of a deployment (the server in parallel/server.py).

The ranks are started detached (their own session), so they outlive the command that started them. Right after
they are spawned, where they run is written to paths.state_dir()/resident.json, before anything is waited for:
a start killed at any point leaves a file `down` reads to stop them, and `doctor`/`up` read to say they are gone.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
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
from ..hostfile import (Host, free_ports, jaccl_hostfile, loopback_ring, own_program, rank_env, remote_script, run_on,
                        ssh_command)

REMOTE_CHECK = 30.0  # seconds for one short command on a node over ssh
READY = ("ok", "busy")  # /health's status when the ranks answer (busy: a request runs or waits)
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
    # ranks here, or the ssh sessions of ranks on other nodes
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


class BindError(ResidentError, ValueError):
    """--bind is not an address rank 0 can listen on (the message says which and what to use)."""


def check_bind(bind: str | None, across_hosts: bool = False) -> str | None:
    """A valid IP address to bind, or None (the default: loopback on one machine, else the cluster address)."""
    if bind is None:
        return None
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise BindError(f"--bind {bind!r} is not an IP address: give the address rank 0's HTTP server listens "
                        "on (127.0.0.1 for this machine, the node's cluster address for others)") from None
    if across_hosts and ipaddress.ip_address(bind).is_loopback:
        raise BindError(f"--bind {bind}: rank 0 runs on a node of the cluster, whose loopback no other machine "
                        "reaches; leave --bind out (rank 0's cluster address) or give that address")
    return bind


def _rank0_address(hosts: list[Host] | None) -> str:
    """Where the other ranks and the client reach rank 0: its cluster address, else loopback on one machine."""
    if not hosts:
        return "127.0.0.1"
    if not hosts[0].ips:
        raise ResidentError(f"rank 0's node {hosts[0].ssh} has no IP address in models.toml: the other ranks "
                            "reach it there; add ips to its [[cluster.nodes]]")
    return hosts[0].ips[0]


def start(path: Path, model_id: str, *, mode: str, n: int, hosts: list[Host] | None = None, backend: str = "ring",
          bind: str | None = None, port: int | None = None, python: str | None = None, prefill_step: int = 2048,
          timeout: float = 600.0, entry: list[str] | None = None, extra: list[str] | None = None,
          say: Callable[[str], None] = lambda s: None) -> Resident:
    """Start the ranks, wait until rank 0 answers /health, and return where they are.

    On one machine every address is loopback. Across hosts rank 0's HTTP server and control port listen on its
    cluster address (the first of hosts[0].ips), never on every interface unless `bind` asks for it."""
    python = python or sys.executable
    across = bool(hosts) and not all(h.local for h in hosts)
    bind = check_bind(bind, across) or _rank0_address(hosts if across else None)
    address = _rank0_address(hosts if across else None)
    logdir = paths.state_dir() / "resident" / (datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3))
    logdir.mkdir(parents=True, exist_ok=True)
    here = not across or hosts[0].local  # rank 0 on this machine: its port can be checked free here
    port = port or free_ports(1, bind if here and bind not in ("0.0.0.0", "::") else "127.0.0.1")[0]
    ctrl_port = free_ports(1, address if here else "127.0.0.1")[0]
    entry = entry or ["-m", "arthur_cluster.parallel.server"]
    args = ["--model-id", model_id, "--mode", mode, "--backend", backend, "--bind", bind, "--port", str(port),
            "--control", f"{address}:{ctrl_port}", "--control-bind", address, "--control-port", str(ctrl_port),
            "--prefill-step", str(prefill_step), *(extra or [])]
    token = secrets.token_hex(16)
    env = {"ARTHUR_RESIDENT_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    url = f"http://{address if bind in ('0.0.0.0', '::') else bind}:{port}"
    res = Resident(url=url, model=model_id, model_path=str(path), mode=mode, backend=backend, n=n,
                   hosts=[h.ssh for h in hosts] if across else [], control=f"{address}:{ctrl_port}", token=token,
                   logdir=str(logdir), started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    procs: list[subprocess.Popen] = []
    try:
        if across:  # one rank per node: here directly, elsewhere over ssh with the node's own program
            say(f"starting {n} ranks on {', '.join(h.ssh for h in hosts)}; rank 0 at {address}")
            for r, (renv, files) in enumerate(_ranks_env(backend, hosts)):
                model = ["--model", hosts[r].model or str(path), "--repo-id", model_id]
                if hosts[r].local:
                    for name, content in files.items():
                        renv[name] = str(logdir / f"{name.lower()}.json")
                        Path(renv[name]).write_text(content)
                    procs.append(_spawn([python, *entry, *model, *args], {**env, **renv}, logdir / f"rank{r}.log"))
                else:
                    procs.append(_spawn_remote(hosts[r], r, [*model, *args], {**env, **renv}, files,
                                               logdir / f"rank{r}.log"))
                res.pids = [p.pid for p in procs]
                paths.write_atomic(state_file(), res.model_dump_json(indent=2) + "\n")
        else:
            ring = loopback_ring(n) if backend == "ring" and n > 1 else None
            nccl = free_ports(1)[0] if backend == "nccl" else None
            for r in range(n):
                renv = rank_env(backend, r, n, files=logdir, ring=ring, nccl_port=nccl) if n > 1 else {}
                procs.append(_spawn([python, *entry, "--model", str(path), *args], {**env, **renv},
                                    logdir / f"rank{r}.log"))
                res.pids = [p.pid for p in procs]
        paths.write_atomic(state_file(), res.model_dump_json(indent=2) + "\n")
        _wait_ready(res, procs, timeout, say)
    except BaseException:
        stop(res)
        raise
    return res


def _ranks_env(backend: str, hosts: list[Host]) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(environment, files as variable -> content) of each rank across hosts, for the backend."""
    n = len(hosts)
    out = []
    if backend == "ring":
        ring = json.dumps([[f"{h.ips[0]}:{p}"] for h, p in zip(hosts, free_ports(n))])
        return [({"MLX_RANK": str(r)}, {"MLX_HOSTFILE": ring}) for r in range(n)]
    if backend == "jaccl":
        coordinator = f"{hosts[0].ips[0]}:{free_ports(1)[0]}"
        jaccl_hostfile(hosts)  # refuses a device matrix with gaps
        devices = json.dumps([h.rdma for h in hosts])
        return [({"MLX_RANK": str(r), "MLX_JACCL_COORDINATOR": coordinator}, {"MLX_IBV_DEVICES": devices})
                for r in range(n)]
    if backend == "nccl":
        port = str(free_ports(1)[0])
        for r in range(n):
            out.append(({"MLX_RANK": str(r), "NCCL_HOST_IP": hosts[0].ips[0], "NCCL_PORT": port,
                         "MLX_WORLD_SIZE": str(n), "CUDA_VISIBLE_DEVICES": "0"}, {}))
        return out
    raise ResidentError(f"unknown backend {backend!r}")


def _spawn_remote(host: Host, rank: int, args: list[str], env: dict[str, str], files: dict[str, str],
                  log: Path) -> subprocess.Popen:
    """A rank on another node through ssh, with that node's arthur-cluster (`rank` runs the server there).
    ssh gets a terminal (-tt): when this ssh process is stopped, the node hangs up on the rank too. The token
    reaches the node in a 0600 file, not on a command line other users could read."""
    secret = env.pop("ARTHUR_RESIDENT_TOKEN", "")
    program = host.program or own_program()
    holder = run_on(host.ssh, host.ssh, ["sh", "-c", "umask 077 && t=$(mktemp) && cat > \"$t\" && echo \"$t\""],
                    timeout=REMOTE_CHECK, input=secret.encode()).strip()
    script = remote_script([*program, "rank", *args], env, files, taken={"ARTHUR_RESIDENT_TOKEN": holder})
    return _spawn([*ssh_command(), "-tt", host.ssh, script], {}, log)


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
        if h is not None and h.get("status") in READY:
            return
        if h is not None and h.get("status") == "failed":
            raise ResidentError(f"the {res.mode} ranks of {res.model} failed: {h.get('reason')}")
        for i, p in enumerate(procs):
            if p.poll() is not None:
                what = f"rank {i}" + (f" on {res.hosts[i]}" if res.hosts else "")
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
    if h is not None and h.get("status") in READY:
        return None
    alive = [p for p in res.pids if _alive(p)]
    if h is not None and h.get("status") == "failed":
        return f"the resident ranks of {res.model} at {res.url} have failed: {h.get('reason')}"
    if h is not None and h.get("status") == "stuck":
        return f"the resident ranks of {res.model} at {res.url} are stuck: {h.get('reason')}"
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
