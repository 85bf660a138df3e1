"""Start, check and stop the resident ranks of a deployment (the server in parallel/server.py).

The ranks are started detached (their own session), so they outlive the command that started them. Right after
they are spawned, where they run is written to paths.state_dir()/resident.json (0600, in the 0700 state folder),
before anything is waited for. Before each is spawned, a lock file it then holds names it (ownership.py): a
start killed at any point, or a record gone corrupt, still leaves what `doctor` lists and `down` stops.
Nothing is signalled unless it is proved to be a rank of the deployment (ownership.check); what is not is
skipped, and said.
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

from .. import paths, safeio
from ..errors import ArthurError
from ..hostfile import (Host, free_ports, jaccl_hostfile, loopback_ring, own_program, rank_env, remote_script, run_on,
                        ssh_command)
from . import ownership
from .control import ENV_SECRET

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
    deployment: str = ""  # the random id on every rank's command line (`--deployment`) and lock file
    starts: list[str] = Field(default_factory=list)  # each pid's process start time, as ownership reads it

    @property
    def endpoint(self) -> str:
        return self.url + "/v1"


def state_file() -> Path:
    return paths.state_dir() / "resident.json"


RECORD_MAX = 1024 * 1024  # bytes of resident.json
HEALTH_MAX = 64 * 1024  # bytes of a /health answer read


def load_state() -> tuple[Resident | None, str | None]:
    """(the record, None), (None, None) when there is none, or (None, what is wrong with it)."""
    path = state_file()
    try:
        return Resident.model_validate_json(safeio.read_regular(path, RECORD_MAX)), None
    except FileNotFoundError:
        return None, None
    except OSError as e:
        why = str(e) if isinstance(e, safeio.UnsafeFileError) else f"{path}: cannot be read ({e.strerror})"
        return None, why
    except (ValidationError, ValueError) as e:
        first = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        return None, f"{path}: the resident ranks' record is corrupt ({first})"


def read_state() -> Resident | None:
    return load_state()[0]


def write_state(res: Resident) -> None:
    paths.private_dir(paths.state_dir())
    paths.write_atomic(state_file(), res.model_dump_json(indent=2) + "\n", mode=0o600)


# --- starting ---------------------------------------------------------------------------------------------


def _spawn(cmd: list[str], env: dict[str, str], log: Path, lock: ownership.Held | None = None) -> subprocess.Popen:
    """A process in a session of its own (it outlives us; its group, led by it, is what gets signalled). It
    inherits the descriptor holding its lock file (ownership.py)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    extra = {ownership.ENV_LOCK: str(lock.path), ownership.ENV_LOCK_FD: str(lock.fd)} if lock else {}
    try:
        p = subprocess.Popen(cmd, env={**os.environ, **env, **extra}, stdout=fd, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(lock.fd,) if lock else ())
    finally:
        os.close(fd)
    _children[p.pid] = p
    return p


def _held(res: Resident, name: str, run: Callable[[ownership.Held], subprocess.Popen]) -> subprocess.Popen:
    """run(lock): a process that holds a fresh lock file of the deployment from before it exists; its pid and
    start time go into the record and the lock file at once."""
    lock = ownership.hold(res.deployment, name, {"model": res.model, "url": res.url})
    try:
        p = run(lock)
        res.pids.append(p.pid)
        res.starts.append(ownership.note_pid(lock, p.pid))
    finally:
        ownership.release(lock)  # the process holds it from here on
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
    state = paths.private_dir(paths.state_dir())
    logdir = state / "resident" / (datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3))
    logdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    here = not across or hosts[0].local  # rank 0 on this machine: its port can be checked free here
    port = port or free_ports(1, bind if here and bind not in ("0.0.0.0", "::") else "127.0.0.1")[0]
    ctrl_port = free_ports(1, address if here else "127.0.0.1")[0]
    entry = entry or ["-m", "arthur_cluster.parallel.server"]
    deployment, secret = ownership.new_id(), secrets.token_hex(32)
    args = ["--model-id", model_id, "--mode", mode, "--backend", backend, "--bind", bind, "--port", str(port),
            "--control", f"{address}:{ctrl_port}", "--control-bind", address, "--control-port", str(ctrl_port),
            "--prefill-step", str(prefill_step), *(extra or []), "--deployment", deployment]
    token = secrets.token_hex(16)
    env = {"ARTHUR_RESIDENT_TOKEN": token, ENV_SECRET: secret, "PYTHONUNBUFFERED": "1"}
    url = f"http://{address if bind in ('0.0.0.0', '::') else bind}:{port}"
    res = Resident(url=url, model=model_id, model_path=str(path), mode=mode, backend=backend, n=n,
                   hosts=[h.ssh for h in hosts] if across else [], control=f"{address}:{ctrl_port}", token=token,
                   logdir=str(logdir), started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   deployment=deployment)
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
                    log = logdir / f"rank{r}.log"
                    procs.append(_held(res, f"rank{r}",
                                       lambda lk: _spawn([python, *entry, *model, *args], {**env, **renv}, log, lk)))
                else:
                    procs.append(_held(res, f"rank{r}", lambda lk: _spawn_remote(
                        hosts[r], r, [*model, *args], {**env, **renv}, files, logdir / f"rank{r}.log", lk)))
                write_state(res)
        else:
            ring = loopback_ring(n) if backend == "ring" and n > 1 else None
            nccl = free_ports(1)[0] if backend == "nccl" else None
            for r in range(n):
                renv = rank_env(backend, r, n, files=logdir, ring=ring, nccl_port=nccl) if n > 1 else {}
                renv.update({} if r == 0 else {"ARTHUR_RESIDENT_TOKEN": ""})  # rank 0 answers /admin/shutdown
                procs.append(_held(res, f"rank{r}", lambda lk: _spawn([python, *entry, "--model", str(path), *args],
                                                                      {**env, **renv}, logdir / f"rank{r}.log", lk)))
        write_state(res)
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
                  log: Path, lock: ownership.Held | None = None) -> subprocess.Popen:
    """A rank on another node through ssh, with that node's arthur-cluster (`rank` runs the server there).
    ssh gets a terminal (-tt): when this ssh process is stopped, the node hangs up on the rank too. The token
    reaches the node in a 0600 file, not on a command line other users could read; so does the control secret.
    The local ssh session holds the rank's lock file and carries `--deployment` on its command line."""
    program = host.program or own_program()
    taken = {}
    keep = ["sh", "-c", "umask 077 && t=$(mktemp) && cat > \"$t\" && echo \"$t\""]
    for name in ("ARTHUR_RESIDENT_TOKEN", ENV_SECRET):
        taken[name] = run_on(host.ssh, host.ssh, keep, timeout=REMOTE_CHECK,
                             input=env.pop(name, "").encode()).strip()
    script = remote_script([*program, "rank", *args], env, files, taken=taken)
    return _spawn([*ssh_command(), "-tt", host.ssh, script], {}, log, lock)


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
        with requests.get(res.url + "/health", timeout=timeout, stream=True) as r:
            body = json.loads(r.raw.read(HEALTH_MAX, decode_content=True) or b"null")
    except (requests.RequestException, ValueError, OSError):
        return None
    return body if isinstance(body, dict) else None  # whatever else listens on a reused port is not our rank 0


def _pairs(res: Resident) -> list[tuple[object, str]]:
    """(pid, start time) of each recorded process, plus any its lock files name that the record lacks."""
    starts = [*res.starts, *[""] * max(0, len(res.pids) - len(res.starts))]
    pairs: list[tuple[object, str]] = list(zip(res.pids, starts))
    if ownership.valid_id(res.deployment):
        known = {p for p, _ in pairs}
        pairs += [(lk.pid, lk.start) for lk in ownership.live()
                  if lk.deployment == res.deployment and lk.pid and lk.pid not in known]
    return pairs


def _ours(pid: object, res: Resident, start: str) -> bool:
    if pid in _children and _children[pid].poll() is not None:
        return False  # ours, and already exited
    return ownership.check(pid, res.deployment, start) is None


def _alive(pid: int) -> bool:
    """Whether a process with this PID runs (that alone proves nothing about what it is)."""
    if pid in _children:
        return _children[pid].poll() is None
    return ownership.identity(pid) is not None


def running(res: Resident) -> list[int]:
    """The recorded ranks (or launcher) still running, each proved to be one (a reused PID is not)."""
    return [p for p, s in _pairs(res) if _ours(p, res, s)]


def problem(res: Resident) -> str | None:
    """None when rank 0 answers healthy; else one line saying what is wrong with the recorded ranks."""
    h = health(res)
    if h is not None and h.get("status") in READY:
        return None
    alive = running(res)
    if h is not None and h.get("status") == "failed":
        return f"the resident ranks of {res.model} at {res.url} have failed: {h.get('reason')}"
    if h is not None and h.get("status") == "stuck":
        return f"the resident ranks of {res.model} at {res.url} are stuck: {h.get('reason')}"
    if h is not None:
        return f"the resident ranks of {res.model} at {res.url} are still loading (processes {alive})"
    unproved = [p for p, st in _pairs(res)
                if p not in alive and not ownership.gone(ownership.check(p, res.deployment, st))]
    gone = (f"processes {alive} still run" if alive else "all its processes are gone" if not unproved else
            f"the processes it names ({unproved}) are not provably its ranks, so `down` will not signal them")
    return (f"stale record: nothing answers at {res.url} (ranks of {res.model}, started {res.started_at}) and "
            f"{gone}; `arthur-cluster down` cleans it up")


# --- stopping ---------------------------------------------------------------------------------------------


def _signal(pid: int, sig: int) -> None:
    """The process's group when it leads one (the ranks do: their own session), else the process alone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pids: list[object]) -> None:
    for p in pids:
        child = _children.pop(p, None)  # type: ignore[arg-type]
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def stop(res: Resident, grace: float = 10.0) -> list[str]:
    """Ask rank 0 to stop the group; then SIGTERM, SIGKILL what is left, each process proved to be a rank of
    this deployment right before it is signalled; remove the state file. Returns what was done and skipped."""
    actions: list[str] = []
    pairs = _pairs(res)
    starts = dict((p, s) for p, s in pairs if type(p) is int)
    targets, skipped = [], []
    for p, s in pairs:
        why = None if _ours(p, res, s) else ownership.check(p, res.deployment, s)
        if why is None:
            targets.append(p)
        elif not ownership.gone(why):
            skipped.append(f"skipped pid {p}: {why}; it was not signalled")
    asked = False
    if targets:
        try:
            r = requests.post(res.url + "/admin/shutdown", headers={"Authorization": f"Bearer {res.token}"},
                              timeout=3)
            asked = r.status_code == 200
        except requests.RequestException:
            pass
    if asked:
        actions.append(f"asked rank 0 at {res.url} to stop")
    live = lambda ps: [p for p in ps if _ours(p, res, starts.get(p, ""))]  # noqa: E731 - proved again each time
    end = time.monotonic() + (grace if asked else 0)  # not answering (still loading): signals at once
    while time.monotonic() < end and live(targets):
        time.sleep(0.1)
    left = live(targets)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not left:
            break
        for p in left:
            _signal(p, sig)
        end = time.monotonic() + 3
        while time.monotonic() < end and live(left):
            time.sleep(0.05)
        actions.append(f"sent {signal.Signals(sig).name} to {left}")
        left = live(left)
    _reap(res.pids)
    if targets:
        actions.append(f"stopped the resident ranks of {res.model} ({', '.join(map(str, targets))})"
                       if not left else f"could not stop processes {left}")
    elif not skipped:
        actions.append(f"the resident ranks of {res.model} were already gone")
    actions += skipped
    ownership.live(clean=True)  # removes the lock files the stopped ranks held
    cur = read_state()
    if cur is None or (cur.url, cur.deployment) == (res.url, res.deployment):
        state_file().unlink(missing_ok=True)
    return actions


# --- ranks without a (readable) record ----------------------------------------------------------------------


def unrecorded(known: set[str], wait: float = 15.0, clean: bool = False) -> list[Resident]:
    """Deployments whose ranks hold lock files but that no record in `known` (deployment ids) describes: a start
    killed before it wrote its record, or a record gone corrupt. A lock whose rank is still being spawned (no
    pid yet) is waited for, up to `wait` seconds. `clean` removes lock files nobody holds any more."""
    end = time.monotonic() + wait
    while True:
        locks = [lk for lk in ownership.live(clean) if lk.deployment not in known]
        if all(lk.pid for lk in locks) or time.monotonic() > end:
            break
        time.sleep(0.2)
    found: dict[str, Resident] = {}
    for lk in locks:
        res = found.setdefault(lk.deployment, Resident(url=lk.url or "http://127.0.0.1:9", model=lk.model or "?",
                                                        model_path="", mode="?", backend="?", n=0,
                                                        deployment=lk.deployment))
        if lk.pid:
            res.pids.append(lk.pid)
            res.starts.append(lk.start)
            res.n += 1
    return list(found.values())


def describe(res: Resident) -> str:
    """One line naming a deployment's live processes (what `doctor` lists)."""
    return f"ranks of {res.model} (deployment {res.deployment}, {res.url}): pids {running(res) or 'being started'}"


__all__ = ["Resident", "ResidentError", "start", "stop", "health", "problem", "read_state", "load_state",
           "state_file", "running", "unrecorded", "describe"]
