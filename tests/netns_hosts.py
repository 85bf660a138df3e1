"""Real hosts on this machine for tests: each a network namespace with its own address, its own OpenSSH server
and, optionally, its own HOME (as separate Macs have separate homes), joined by a bridge to this machine.

Every name (namespaces, bridge, links, subnet) carries a random tag, so several clusters (and the shared kit's)
can exist side by side. Everything the hosts need lives under the state folder the caller gives; `down` stops
the sshds it started, every process left in its namespaces, then deletes the namespaces and the bridge.
Needs root, iproute2 and openssh-server; `unavailable()` says why not, for a skip (a failure under CI=true).
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def unavailable() -> str | None:
    """Why namespaced hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "no `ip` (iproute2)"
    if not Path(SSHD).is_file() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        return "no OpenSSH server/client (apt-get install -y openssh-server)"
    probe = f"acprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces are not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@dataclass
class Node:
    name: str  # its ssh name
    ns: str
    address: str
    home: Path | None
    sshd: subprocess.Popen | None = None


@dataclass
class Hosts:
    """`n` hosts node-0.. under `state`; this machine is `.client` on their bridge."""

    state: Path
    n: int = 2
    homes: bool = True
    tag: str = field(default_factory=lambda: "".join(random.choices("abcdefghjkmnpqrstuvwxyz", k=4)))
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.subnet = f"10.{random.randint(200, 250)}.{random.randint(1, 250)}"
        self.client = f"{self.subnet}.1"
        self.bridge = f"act{self.tag}br"

    # --- what callers use ---

    @property
    def ssh_config(self) -> Path:
        return self.state / "ssh_config"

    def ssh_command(self) -> str:
        """The ssh command line that reaches the nodes by name (what ARTHUR_CLUSTER_SSH is set to)."""
        return f"ssh -F {shlex.quote(str(self.ssh_config))} -o BatchMode=yes -o ConnectTimeout=5"

    def ssh(self, node: int, command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*shlex.split(self.ssh_command()), self.nodes[node].name, command],
                              capture_output=True, text=True, timeout=timeout)

    def in_ns(self, node: int, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run argv inside a node's namespace directly (no ssh)."""
        return subprocess.run(["ip", "netns", "exec", self.nodes[node].ns, *argv], capture_output=True,
                              text=True, timeout=timeout)

    # --- up / down ---

    def up(self) -> "Hosts":
        self.state.mkdir(parents=True, exist_ok=True)
        keys = self.state / "keys"
        keys.mkdir(mode=0o700, exist_ok=True)
        for k in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / k)], check=True)
        shutil.copy(keys / "client.pub", keys / "authorized_keys")
        (keys / "authorized_keys").chmod(0o600)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        sshd_config = self.state / "sshd_config"
        sshd_config.write_text("\n".join([
            "Port 22", f"HostKey {keys / 'host'}", f"AuthorizedKeysFile {keys / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "PidFile none", ""]))
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.client}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        client_lines = []
        for i in range(self.n):
            node = Node(name=f"node-{i}", ns=f"act{self.tag}-{i}", address=f"{self.subnet}.{11 + i}",
                        home=self.state / "homes" / f"node-{i}" if self.homes else None)
            self.nodes.append(node)
            self._make_node(i, node, sshd_config)
            client_lines += [f"Host {node.name}", f"  HostName {node.address}", "  User root",
                             f"  IdentityFile {keys / 'client'}", "  IdentitiesOnly yes",
                             "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", ""]
        self.ssh_config.write_text("\n".join(client_lines))
        for i, node in enumerate(self.nodes):
            self._wait_ssh(i)
        return self

    def _make_node(self, i: int, node: Node, sshd_config: Path) -> None:
        outer, inner = f"act{self.tag}v{i}", f"act{self.tag}p{i}"
        subprocess.run(["ip", "netns", "add", node.ns], check=True, capture_output=True)
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", node.ns)
        _ip("link", "set", outer, "master", self.bridge, "up")
        _ip("link", "set", "lo", "up", ns=node.ns)
        _ip("addr", "add", f"{node.address}/24", "dev", inner, ns=node.ns)
        _ip("link", "set", inner, "up", ns=node.ns)
        _ip("route", "add", "default", "via", self.client, ns=node.ns)
        extra = []
        if node.home is not None:
            node.home.mkdir(parents=True, exist_ok=True)
            extra = ["-o", f"SetEnv=HOME={node.home}"]
        log = open(self.state / f"sshd-{i}.log", "ab")
        # -D: sshd stays in the foreground, so this Popen is the sshd itself (`ip netns exec` execs it)
        node.sshd = subprocess.Popen(["ip", "netns", "exec", node.ns, SSHD, "-D", "-e", "-f", str(sshd_config),
                                      "-o", f"ListenAddress={node.address}", *extra],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def _wait_ssh(self, i: int) -> None:
        end = time.monotonic() + 30
        while True:
            try:
                if self.ssh(i, "true", timeout=10).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > end:
                log = (self.state / f"sshd-{i}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"node-{i} does not answer ssh within 30 s; its sshd log: {log}")
            time.sleep(0.2)

    def down(self) -> None:
        """Stop everything in the namespaces (ours: made by up), then remove them and the bridge."""
        for node in self.nodes:
            if node.sshd is not None and node.sshd.poll() is None:
                node.sshd.terminate()
                try:
                    node.sshd.wait(5)
                except subprocess.TimeoutExpired:
                    node.sshd.kill()
                    node.sshd.wait(5)
            left = subprocess.run(["ip", "netns", "pids", node.ns], capture_output=True, text=True).stdout.split()
            for pid in left:  # processes still in a namespace of ours (a rank a failed test left behind)
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", node.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
