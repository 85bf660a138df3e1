"""Hostfiles for `mlx.launch` and the environment each rank needs, per backend (ring, jaccl, nccl).

- ring:  [{"ssh": host, "ips": [ip, ...]}, ...]; a rank started by hand gets MLX_RANK and MLX_HOSTFILE
         (the path of a JSON list with one list of "ip:port" per rank).
- jaccl: the same hosts with "rdma": host i's RDMA device towards host j (null for itself); ranks get
         MLX_JACCL_COORDINATOR (rank 0's ip:port) and MLX_IBV_DEVICES (the path of the device matrix). macOS 26.2+ only.
- nccl:  rank 0's ip as NCCL_HOST_IP with NCCL_PORT, MLX_WORLD_SIZE, and one GPU per rank.

Pure values: nothing here imports mlx except `check_backend`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArthurError

BACKENDS = ("ring", "jaccl", "nccl")
SSH_ENV = "ARTHUR_CLUSTER_SSH"  # the command that reaches a node by its ssh name
SSH_DEFAULT = "ssh -o BatchMode=yes -o ConnectTimeout=5"


class HostfileError(ArthurError, ValueError):
    pass


class BackendUnavailable(ArthurError, RuntimeError):
    """The mlx build on this machine cannot run the asked backend; the message says what it needs."""


@dataclass
class Host:
    ssh: str
    ips: list[str] = field(default_factory=list)
    rdma: list[str | None] = field(default_factory=list)
    program: list[str] = field(default_factory=list)  # arthur-cluster on that node (empty: ours)
    local: bool = False  # this machine: its rank starts here, not over ssh
    model: str | None = None  # the model folder on that node (None: the one given for all)

    def as_json(self, with_rdma: bool = False) -> dict:
        d: dict = {"ssh": self.ssh, "ips": list(self.ips)}
        if with_rdma:
            d["rdma"] = list(self.rdma)
        return d


def ssh_command() -> list[str]:
    return shlex.split(os.environ.get(SSH_ENV) or SSH_DEFAULT)


class RemoteError(ArthurError, RuntimeError):
    """A command over ssh could not start (ran False) or failed there; the message is its own error."""

    def __init__(self, message: str, ran: bool):
        super().__init__(message)
        self.ran = ran


class NodeError(RemoteError):
    """A command on a node failed: the message names the node, the command and the command's own error.
    missing: the program itself was not found (or not executable) there."""

    def __init__(self, node: str, command: list[str], error: str, ran: bool, missing: bool = False):
        self.node, self.command, self.error, self.missing = node, list(command), error, missing
        super().__init__(f"node {node}: `{shlex.join(command)}` {'failed' if ran else 'could not run'}: {error}",
                         ran=ran)


# Printed on stderr right before the command: what the node's login profile prints comes before it, so the
# command's own error is what follows (a profile's last line is never taken for the error).
MARK = "-- arthur-cluster: the command starts here --"


def remote_script(argv: list[str], env: dict[str, str] | None = None, files: dict[str, str] | None = None,
                  taken: dict[str, str] | None = None) -> str:
    """The shell line a node runs for `argv`: the marker, `env` exported, each of `files` (variable -> content)
    written to a fresh temporary file named by its variable, each of `taken` (variable -> a file on the node)
    read into its variable and the file removed (secrets stay off command lines), then `argv` exec'd."""
    parts = [f"printf '%s\\n' {shlex.quote(MARK)} >&2"]
    parts += [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    for name, where in (taken or {}).items():
        parts.append(f"export {name}=\"$(cat {shlex.quote(where)})\" && rm -f {shlex.quote(where)}")
    for name, content in (files or {}).items():
        parts.append(f"f=$(mktemp) && printf '%s' {shlex.quote(content)} > \"$f\" && export {name}=\"$f\"")
    parts.append(f"exec {shlex.join(argv)}")
    return "; ".join(parts)


def _last_line(text: str) -> str:
    lines = [t.strip() for t in text.splitlines() if t.strip()]
    return lines[-1] if lines else ""


def _own_error(stdout: str, stderr: str, code: int) -> str:
    """The command's error: arthur-cluster's --json {"error"}/{"errors"}, else its last stderr line."""
    try:
        data = json.loads(stdout)
    except ValueError:
        data = None
    if isinstance(data, dict):
        if isinstance(data.get("error"), str):
            return data["error"]
        if isinstance(data.get("errors"), list) and data["errors"]:
            return "; ".join(str(e) for e in data["errors"][:3])
    return _last_line(stderr) or _last_line(stdout) or f"exit code {code}, no output"


def run_on(node: str, host: str, argv: list[str], *, timeout: float, input: bytes | None = None) -> str:
    """Run `argv` on a node over ssh within `timeout` seconds (connecting included): its standard output, or
    NodeError with the node, the command and the command's own error."""
    cmd = [*ssh_command(), host, remote_script(argv)]
    try:
        done = subprocess.run(cmd, input=input, capture_output=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NodeError(node, argv, f"no answer within {timeout:g} s over ssh ({host})", ran=False) from None
    except OSError as e:
        raise NodeError(node, argv, f"cannot start ssh ({cmd[0]}): {e.strerror or e}", ran=False) from None
    out, err = (b.decode(errors="replace") for b in (done.stdout, done.stderr))
    if MARK not in err:  # the command never started: ssh itself (or the login) failed
        if done.returncode == 0:
            return out
        raise NodeError(node, argv, f"{_last_line(err) or f'ssh exited with code {done.returncode}'} "
                                    f"(ssh {host})", ran=False)
    own = err.split(MARK, 1)[1]
    if done.returncode == 0:
        return out
    if done.returncode in (126, 127):
        raise NodeError(node, argv, f"{argv[0]} is not there or not executable ({_last_line(own)})", ran=True,
                        missing=True)
    raise NodeError(node, argv, _own_error(out, own, done.returncode), ran=True)


def over_ssh(host: str, command: list[str], *, input: bytes | None = None, timeout: float = 120.0) -> str:
    """Run a shell `command` (words joined by spaces) on `host` with the configured ssh; its standard output,
    or RemoteError with the command's own last error line."""
    script = f"printf '%s\\n' {shlex.quote(MARK)} >&2; " + " ".join(command)
    try:
        done = subprocess.run([*ssh_command(), host, script], input=input, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RemoteError(str(e), ran=False) from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")
        ran = MARK in err
        own = err.split(MARK, 1)[1] if ran else err
        raise RemoteError(_last_line(own) or _last_line(done.stdout.decode(errors="replace")) or "no output",
                          ran=ran)
    return done.stdout.decode(errors="replace")


def own_program() -> list[str]:
    """This machine's arthur-cluster by absolute path: what a node set up the same way runs by default."""
    beside = Path(sys.executable).parent / "arthur-cluster"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("arthur-cluster")
    return [os.path.abspath(found)] if found else [sys.executable, "-m", "arthur_cluster.cli"]


def node_program(setting: str | None, node: str) -> list[str]:
    """A node's arthur-cluster command: its models.toml `program` (a path or a command line), else ours."""
    if not setting:
        return own_program()
    try:
        argv = shlex.split(setting)
    except ValueError as e:
        raise HostfileError(f"node {node}: program {setting!r} is not a command line ({e}); write the absolute "
                            "path of arthur-cluster on that node") from None
    if not argv:
        raise HostfileError(f"node {node}: program is empty; write the absolute path of arthur-cluster there")
    return argv


def is_this_machine(name: str | None) -> bool:
    """Whether an ssh name or node name means this machine (its host name, short or full, or loopback)."""
    if not name:
        return False
    host = socket.gethostname()
    return name in ("localhost", "127.0.0.1", "::1", host, host.split(".")[0])


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def hosts_from(spec: list[str | dict | Host]) -> list[Host]:
    """Hosts from strings ("10.0.0.2" or "mac1=10.0.0.2"), dicts ({"ssh", "ips", "rdma"}) or Host values."""
    out = []
    for i, h in enumerate(spec):
        if isinstance(h, Host):
            out.append(h)
        elif isinstance(h, dict):
            if "ssh" not in h:
                raise HostfileError(f"host {i} ({h}) has no 'ssh' name")
            out.append(Host(str(h["ssh"]), [str(x) for x in h.get("ips", [])], list(h.get("rdma", [])),
                            [str(x) for x in h.get("program") or []], bool(h.get("local", False)),
                            str(h["model"]) if h.get("model") else None))
        elif isinstance(h, str) and h:
            name, _, ip = h.partition("=")
            ip = ip or (name if _is_ip(name) else "")
            out.append(Host(name, [ip] if ip else []))
        else:
            raise HostfileError(f"host {i}: {h!r} is not a host name, 'name=ip', or a mapping")
    return out


def ring_hostfile(hosts: list[Host]) -> list[dict]:
    """mlx.launch's hostfile for the ring backend: every host needs an IP the others can reach."""
    missing = [h.ssh for h in hosts if not h.ips or not all(_is_ip(ip) for ip in h.ips)]
    if missing:
        raise HostfileError(f"the ring backend needs IP addresses; give them for {', '.join(missing)} "
                            "(as 'name=10.0.0.2' or {'ssh': name, 'ips': [...]})")
    return [h.as_json() for h in hosts]


def jaccl_hostfile(hosts: list[Host]) -> list[dict]:
    """mlx.launch's hostfile for jaccl: an RDMA device from every host to every other, null for itself."""
    n = len(hosts)
    if not hosts or not hosts[0].ips:
        raise HostfileError("jaccl needs rank 0's IP address (the coordinator)")
    for i, h in enumerate(hosts):
        if len(h.rdma) != n:
            raise HostfileError(f"host {h.ssh}: its rdma list has {len(h.rdma)} entries for {n} hosts "
                                "(one device per peer, null for itself; see `ibv_devices` on each Mac)")
        if h.rdma[i] is not None:
            raise HostfileError(f"host {h.ssh}: its own rdma entry (position {i}) must be null")
        gaps = [hosts[j].ssh for j in range(n) if j != i and not h.rdma[j]]
        if gaps:
            raise HostfileError(f"host {h.ssh} lists no RDMA device towards {', '.join(gaps)}")
    return [h.as_json(with_rdma=True) for h in hosts]


def write_hostfile(path: Path, backend: str, hosts: list[Host]) -> Path:
    if backend == "jaccl":
        data = jaccl_hostfile(hosts)
    elif backend == "ring":
        data = ring_hostfile(hosts)
    elif backend == "nccl":
        if not hosts or not hosts[0].ips:
            raise HostfileError("nccl needs rank 0's IP address")
        data = [h.as_json() for h in hosts]
    else:
        raise HostfileError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(path)
    path.write_text(json.dumps(data, indent=2))
    return path


# --- ranks started by hand (tests, one machine) --------------------------------------------------------


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def loopback_ring(n: int) -> list[list[str]]:
    """An MLX_HOSTFILE value for n ring ranks on this machine, on free loopback ports."""
    return [[f"127.0.0.1:{p}"] for p in free_ports(n)]


def rank_env(backend: str, rank: int, n: int, *, files: Path | None = None, ring: list[list[str]] | None = None,
             coordinator: str | None = None, rdma: list[list[str | None]] | None = None,
             nccl_host: str = "127.0.0.1", nccl_port: int | None = None, gpus_per_host: int | None = None) -> dict[str, str]:
    """The environment one rank needs to join the group without `mlx.launch`. MLX_HOSTFILE and MLX_IBV_DEVICES
    name files: they are written into `files` (a folder the rank can read)."""
    env = {"MLX_RANK": str(rank)}

    def put(name: str, data) -> str:
        if files is None:
            raise HostfileError(f"{backend} ranks read their peers from a file: pass a folder as `files`")
        path = Path(files) / name
        path.write_text(json.dumps(data))
        return str(path)

    if backend == "ring":
        if not ring or len(ring) != n:
            raise HostfileError(f"the ring backend needs {n} address lists, got {len(ring or [])}")
        env["MLX_HOSTFILE"] = put("ring-hosts.json", ring)
    elif backend == "jaccl":
        if not coordinator or not rdma:
            raise HostfileError("jaccl needs a coordinator ip:port and the RDMA device matrix")
        env["MLX_JACCL_COORDINATOR"] = coordinator
        env["MLX_IBV_DEVICES"] = put("ibv-devices.json", rdma)
    elif backend == "nccl":
        env.update({"NCCL_HOST_IP": nccl_host, "NCCL_PORT": str(nccl_port or free_ports(1)[0]),
                    "MLX_WORLD_SIZE": str(n), "CUDA_VISIBLE_DEVICES": str(rank % max(gpus_per_host or n, 1))})  # one GPU per rank
    else:
        raise HostfileError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return env


def check_backend(backend: str) -> None:
    """Refuse clearly when this machine's mlx cannot run `backend`."""
    import mlx.core as mx

    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if mx.distributed.is_available(backend):
        return
    if backend == "jaccl":
        where = "this Linux machine" if sys.platform.startswith("linux") else "this machine"
        raise BackendUnavailable(
            f"jaccl (RDMA over Thunderbolt) is not available on {where}: it needs macOS 26.2 or later on "
            "Macs joined by Thunderbolt 5, with RDMA enabled (`rdma_ctl enable` in recovery mode). Use the ring "
            "backend over TCP instead.")
    if backend == "nccl":
        raise BackendUnavailable("nccl is not available in this mlx build: it needs NVIDIA GPUs and the "
                                 "CUDA build of mlx (pip install 'mlx[cuda13]'). Use the ring backend instead.")
    raise BackendUnavailable(f"the {backend} backend is not available in this mlx build")
