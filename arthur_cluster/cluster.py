"""The cluster a model runs on: its nodes with memory and RDMA.

Three places say what the cluster is, tried in this order by `discover`: a reachable exo API (its /state),
the [cluster] section of models.toml (MLX run directly over ring/jaccl/nccl), and this machine alone.
Nothing here loads a model; exo is asked with short timeouts so that an absent exo costs about a second.
"""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import BaseModel, Field

from . import paths
from .catalog import Catalog
from .errors import ArthurError
from .hostfile import is_this_machine
from .types import Backend, NodeMemory
DISCOVERY_READ_TIMEOUT = 10.0  # exo answers /state in milliseconds; a silent port must not hold `up` for long


class ClusterError(ArthurError, RuntimeError):
    """The asked-for cluster cannot be used; the message says which endpoint/node and what to do."""


class ClusterNode(BaseModel):
    name: str  # exo node id, the [cluster] node name, or this machine's host name
    label: str | None = None  # exo's friendly name
    memory_bytes: int | None = None
    available_bytes: int | None = None
    rdma: bool = False  # exo: rdma_ctl enabled; models.toml: RDMA devices listed
    rdma_devices: list[str] = Field(default_factory=list)
    apple: bool | None = None  # Apple silicon running MLX on Metal (exo: its backends, else its chip); None: unknown
    ssh: str | None = None
    ips: list[str] = Field(default_factory=list)
    program: str | None = None  # models.toml: the command that runs arthur-cluster on the node
    local: bool = False  # this machine (the one running arthur-cluster)

    @property
    def display(self) -> str:
        return f"{self.label} ({self.name})" if self.label and self.label != self.name else self.name

    def memory(self) -> NodeMemory:
        return NodeMemory(name=self.name, memory_bytes=self.memory_bytes, available_bytes=self.available_bytes,
                          apple=self.apple)


class ClusterInfo(BaseModel):
    source: Literal["exo", "catalog", "local"]
    engine: Literal["exo", "mlx"]
    backend: Backend = "ring"  # MLX-direct: the [cluster] backend; exo: ring unless RDMA is ready everywhere
    endpoint: str | None = None  # exo's API
    api_node: str | None = None  # the exo node answering at `endpoint`
    nodes: list[ClusterNode] = Field(default_factory=list)
    exo_models: list[str] = Field(default_factory=list)  # ids exo has a card for (built-in or custom)
    exo_downloaded: list[str] = Field(default_factory=list)  # ids whose weights exo reports on disk
    problems: list[str] = Field(default_factory=list)
    deadline: float | None = Field(default=None, exclude=True)  # time.monotonic() instant exo's answers may not pass

    @property
    def rdma_ready(self) -> bool:
        """Every node has RDMA (exo: rdma_ctl enabled; MLX-direct: the jaccl backend with devices)."""
        if len(self.nodes) < 2:
            return False
        if self.engine == "mlx":
            return self.backend == "jaccl" and all(n.rdma for n in self.nodes)
        return all(n.rdma for n in self.nodes)

    def memory(self) -> list[NodeMemory]:
        return [n.memory() for n in self.nodes]

    @property
    def apple(self) -> bool:
        """Every node runs attention in Metal's fused kernel, which never holds the score matrix: models.toml's
        nodes are Macs; this machine when it is one; exo's nodes when each is Apple silicon (an exo that
        publishes no backends is judged by the chip)."""
        if self.source == "catalog":
            return True
        if self.source == "local":
            from .memory import machine_is_apple

            return machine_is_apple()
        return bool(self.nodes) and all(n.apple for n in self.nodes)

    def largest_first(self) -> list[ClusterNode]:
        """Nodes by memory budget, largest first (ties by name): the order placements fill them."""
        return sorted(self.nodes, key=lambda n: (-(n.memory().budget or 0), n.name))

    def describe(self) -> str:
        where = {"exo": f"exo at {self.endpoint}", "catalog": "models.toml [cluster]", "local": "this machine"}
        return f"{where[self.source]}: {len(self.nodes)} node(s)"


# --- this machine ---------------------------------------------------------------------------------


def _meminfo_available() -> int | None:
    """Linux's MemAvailable (page cache counts as available; sysconf's free pages would not)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def local_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of this machine. On macOS available stays None: the memory plan then uses
    the GPU's default share of the total."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None, None
    avail = _meminfo_available()
    if avail is None and os.path.exists("/proc"):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            avail = None
    return total, avail


def this_machine() -> ClusterInfo:
    total, avail = local_memory()
    node = ClusterNode(name=socket.gethostname() or "localhost", memory_bytes=total, available_bytes=avail,
                       ips=["127.0.0.1"], local=True)
    return ClusterInfo(source="local", engine="mlx", nodes=[node])


def local_node() -> NodeMemory:
    """This machine as the memory plans see it (the same node for probe, pick, up and doc)."""
    return this_machine().nodes[0].memory()


# --- models.toml [cluster] ----------------------------------------------------------------------------


def from_catalog(cat: Catalog) -> ClusterInfo | None:
    """The MLX-direct cluster of models.toml, or None when the section is absent or empty."""
    section = cat.cluster
    if section is None or not section.nodes:
        return None
    # A node is this machine by its host name or a loopback ssh name; any other node is reached over ssh.
    nodes = [ClusterNode(name=n.name, memory_bytes=n.memory_bytes, ssh=n.ssh, ips=list(n.ips),
                         rdma=any(d for d in n.rdma), rdma_devices=list(n.rdma), program=n.program,
                         local=is_this_machine(n.name) or is_this_machine(n.ssh))
             for n in section.nodes]
    info = ClusterInfo(source="catalog", engine="mlx", backend=section.backend, nodes=nodes)
    unknown = [n.name for n in nodes if n.memory_bytes is None]
    if unknown:
        info.problems.append(f"{cat.source}: memory_bytes missing for node(s) {', '.join(unknown)}: memory fit "
                             "cannot be judged there; add memory_bytes to each [[cluster.nodes]]")
    if section.backend == "jaccl":
        bad = [n.name for n in section.nodes if len(n.rdma) != len(section.nodes)]
        if bad:
            info.problems.append(f"{cat.source}: jaccl needs one rdma entry per node (\"\" for itself) on "
                                 f"{', '.join(bad)}")
    return info


# --- exo ------------------------------------------------------------------------------------------------


def exo_client(url: str | None = None, deadline: float | None = None, read_timeout: float = DISCOVERY_READ_TIMEOUT):
    """A client with discovery's short timeouts (the module is imported lazily: `requests` costs time);
    deadline: a time.monotonic() instant no call may pass (the caller's whole budget)."""
    from .exo_client import ExoClient

    return ExoClient(url or paths.exo_api(), read_timeout=read_timeout, retries=1, deadline=deadline)


def from_exo(client) -> ClusterInfo:
    """The cluster exo sees. Raises the exo client's precise errors (ExoUnreachable, ExoProtocolError, ...)
    when exo cannot be used. exo's API reports no version: nodes of another version never join the cluster,
    so they are simply absent from its state."""
    api_node = client.node_id()
    state = client.state()
    host = client.url.split("//", 1)[-1].rsplit(":", 1)[0].strip("[]")
    is_local = is_this_machine(host)
    nodes = [ClusterNode(**n.memory().model_dump(include={"name", "memory_bytes", "available_bytes", "apple"}),
                         label=n.friendly_name,
                         rdma=n.rdma_enabled and n.apple is not False,  # JACCL is RDMA between Macs
                         local=is_local and n.node_id == api_node)
             for n in sorted(state.nodes.values(), key=lambda n: n.node_id)]
    if not nodes:
        raise ClusterError(f"exo at {client.url} reports no nodes in its state; wait for it to start, or check "
                           "its log")
    info = ClusterInfo(source="exo", engine="exo", endpoint=client.url, api_node=api_node, nodes=nodes,
                       deadline=client.deadline)
    info.backend = "jaccl" if info.rdma_ready else "ring"
    info.exo_models = sorted(m.id for m in client.models())
    info.exo_downloaded = sorted(m.id for m in client.models(downloaded=True))
    unknown = [n.display for n in nodes if n.available_bytes is None and n.memory_bytes is None]
    if unknown:
        info.problems.append(f"exo publishes no memory for {', '.join(unknown)}: memory fit cannot be judged there")
    return info


class Discovery(BaseModel):
    """The clusters to try, in order, and why any other was left out."""

    clusters: list[ClusterInfo] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


def discover(cat: Catalog | None = None, *, engine: Literal["exo", "mlx"] | None = None,
             exo_url: str | None = None, deadline: float | None = None) -> Discovery:
    """exo first (when reachable), then MLX on the [cluster] section or this machine.

    engine="exo": exo must answer, else ClusterError with exo's own message. engine="mlx": exo is not asked.
    deadline: a time.monotonic() instant exo's answers may not pass.
    """
    from .exo_client import ExoError

    out = Discovery()
    if engine in (None, "exo"):
        url = exo_url or paths.exo_api()
        try:
            out.clusters.append(from_exo(exo_client(url, deadline)))
        except (ExoError, ClusterError) as exc:
            if engine == "exo":
                raise ClusterError(str(exc)) from None
            out.notes.append(f"exo not used: {exc}")
    if engine in (None, "mlx"):
        direct = from_catalog(cat) if cat is not None else None
        out.clusters.append(direct or this_machine())
    return out
