"""The exo HTTP API, typed: the only module that reads or writes exo's JSON (docs/exo.md). Checked against
exo's own code in the versions users run, main (b5375f8c) and the v1.0.71 release; what differs is read from
the fields an answer carries (an absent field is "not said"), never from a version, which exo does not report.

Every call has a total time limit over the whole answer (headers and body), not only per read: a server
that sends one byte every few seconds cannot hold a call past it. Answers are size-capped. Only idempotent
GETs are retried. Cluster state arrives camelCase and tagged by class name ({"MlxRingInstance": {...}},
{"RunnerReady": {}}, {"DownloadFailed": {...}}); it is parsed here into plain typed values, and an answer
of the wrong shape becomes one ExoProtocolError naming the URL. Model ids are always full Hugging Face ids:
current exo resolves no short names. exo's HTTP API reports no exo version, so nothing here checks one.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Callable, Iterator, Literal

import requests
from pydantic import BaseModel, Field
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from . import paths
from .errors import ArthurError
from .types import NodeMemory, Route

DEFAULT_URL = "http://localhost:52415"
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 30.0  # the total limit of one ordinary call
ADD_TIMEOUT = 15.0  # POST /models/add: exo asks Hugging Face (30 s per file when it hangs); we stop waiting first
CHAT_READ_TIMEOUT = 300.0  # a stream gets a keep-alive every 10 s; a non-streaming answer can take long
APPEAR_TIMEOUT = 5.0  # exo's master places at once; no instance after this means it rejected the placement
GET_RETRIES = 2
MAX_BODY = 32 << 20  # bytes of one JSON answer (a 16-node state is well under 1 MB)
MAX_LINE = 1 << 20  # bytes of one SSE line

ExoSharding = Literal["Pipeline", "Tensor"]  # exo's names; the project's are types.Sharding
InstanceMeta = Literal["MlxRing", "MlxJaccl"]
_META_BACKEND = {"MlxRing": "ring", "MlxJaccl": "jaccl"}


# --- errors -------------------------------------------------------------------------------------


class ExoError(ArthurError, RuntimeError):
    """Anything that went wrong talking to exo; the message names the URL/node and what to do."""


class ExoUnreachable(ExoError):
    pass


class ExoTimeout(ExoUnreachable):
    """The whole answer did not arrive within the call's total time limit."""


class ExoHTTPError(ExoError):
    def __init__(self, message: str, *, status: int, exo_message: str = "", url: str = ""):
        super().__init__(message)
        self.status = status
        self.exo_message = exo_message
        self.url = url


class ModelNotRunning(ExoHTTPError):
    """404 "No instance found for model": place an instance of exactly this model id first."""


class ExoProtocolError(ExoError):
    """The answer is not exo's JSON (HTML, another server on the port, wrong shape)."""


class PlacementFailed(ExoError):
    def __init__(self, message: str, *, model_id: str = "", reason: str = "", instance_id: str = ""):
        super().__init__(message)
        self.model_id = model_id
        self.reason = reason
        self.instance_id = instance_id


class RunnerFailed(ExoError):
    def __init__(self, message: str, *, node_id: str, runner_id: str, error_message: str, instance_id: str = ""):
        super().__init__(message)
        self.node_id = node_id
        self.runner_id = runner_id
        self.error_message = error_message
        self.instance_id = instance_id


class DownloadFailed(ExoError):
    """A node of the instance recorded DownloadFailed in state.downloads (weights missing, offline, ...)."""

    def __init__(self, message: str, *, node_id: str, error_message: str, instance_id: str = ""):
        super().__init__(message)
        self.node_id = node_id
        self.error_message = error_message
        self.instance_id = instance_id


class InstanceNotReady(ExoError, TimeoutError):
    """The bounded wait for RunnerReady ran out; `statuses` says where each runner stood."""

    def __init__(self, message: str, *, instance_id: str = "", statuses: dict[str, str] | None = None):
        super().__init__(message)
        self.instance_id = instance_id
        self.statuses = statuses or {}


InstanceTimeout = InstanceNotReady


class StreamError(ExoError):
    """Generation failed after exo answered 200: a mid-stream error chunk, a broken body, a lost connection."""


# --- a total deadline per call ------------------------------------------------------------------------

_current = threading.local()


class _Deadline:
    """Shuts the call's socket down when its total time is up, which wakes a read blocked on a slow server
    (requests' own timeout restarts with every byte that arrives)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.fired = False
        self.conn: HTTPConnection | None = None
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def start(self) -> "_Deadline":
        _current.deadline = self
        self._timer.start()
        return self

    def attach(self) -> None:
        """Called in the calling thread once the request has been sent: later requests get their own."""
        if getattr(_current, "deadline", None) is self:
            _current.deadline = None

    def cancel(self) -> None:
        self._timer.cancel()
        self.attach()

    def _fire(self) -> None:
        self.fired = True
        sock = getattr(self.conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _track(conn: HTTPConnection) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.conn = conn


class _TrackedHTTP(HTTPConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _track(self)
        return super().request(*args, **kwargs)


class _TrackedHTTPS(HTTPSConnection):
    def request(self, *args: Any, **kwargs: Any) -> None:
        _track(self)
        return super().request(*args, **kwargs)


class _Pool(HTTPConnectionPool):
    ConnectionCls = _TrackedHTTP


class _SPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPS


class _Adapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _SPool}


def new_session() -> requests.Session:
    """A session whose connections the per-call deadline can shut."""
    s = requests.Session()
    adapter = _Adapter()
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


# --- typed values ---------------------------------------------------------------------------------


class Node(BaseModel):
    """One exo node. What an exo release does not publish stays None ("not said"), never "none": exo v1.0.71
    has no node backends, so `backends` is None there and Apple silicon is judged from the chip."""

    node_id: str
    friendly_name: str | None = None
    ram_total: int | None = None  # bytes
    ram_available: int | None = None
    rdma_ctl: bool | None = None  # rdma_ctl status; None: not published
    rdma_peers: list[str] = Field(default_factory=list)  # nodes it has an RDMA (Thunderbolt 5) link to
    backends: list[str] | None = None  # exo's engine backends (MlxMetal, MlxCpu, ...); None: not published
    chip: str | None = None  # e.g. "Apple M4 Pro"
    last_seen: str | None = None

    @property
    def name(self) -> str:
        return self.friendly_name or self.node_id

    @property
    def apple(self) -> bool | None:
        """Apple silicon running MLX on Metal: from the backends when exo publishes them, else the chip."""
        if self.backends is not None:
            return "MlxMetal" in self.backends
        if self.chip:
            return self.chip.startswith("Apple")
        return None

    @property
    def rdma_enabled(self) -> bool:
        """RDMA usable by JACCL: rdma_ctl not reported off, and an RDMA link to some other node."""
        return self.rdma_ctl is not False and bool(self.rdma_peers)

    def memory(self) -> NodeMemory:
        """The node as the memory plans see it (named by its id, as exo's instances name it)."""
        return NodeMemory(name=self.node_id, memory_bytes=self.ram_total, available_bytes=self.ram_available,
                          apple=self.apple)


class Shard(BaseModel):
    runner_id: str
    node_id: str
    kind: str  # "Pipeline" | "Tensor" | "Cfg"
    device_rank: int = 0
    world_size: int = 1
    start_layer: int = 0
    end_layer: int = 0
    n_layers: int = 0


class Card(BaseModel):
    """The numbers of the model card an instance carries (every shard holds it)."""

    model_id: str
    n_layers: int | None = None
    hidden_size: int | None = None
    storage_bytes: int | None = None
    quantization: str | None = None


class Instance(BaseModel):
    instance_id: str
    meta: str  # "MlxRing" | "MlxJaccl" | ...
    model_id: str
    sharding: str  # kind of its shards
    shards: list[Shard] = Field(default_factory=list)
    card: Card | None = None
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)  # the tagged object, as exo sent it

    @property
    def node_ids(self) -> list[str]:
        return [s.node_id for s in self.shards]

    @property
    def route(self) -> Route:
        """The project's route for this instance (one shard: a single node, whatever exo calls it)."""
        if len(self.shards) <= 1:
            return Route.single("exo")
        return Route(engine="exo", sharding="tensor" if self.sharding == "Tensor" else "pipeline",
                     backend=_META_BACKEND.get(self.meta, "ring"), nodes=len(self.shards))

    @property
    def runner_ids(self) -> list[str]:
        return [s.runner_id for s in self.shards]


class RunnerStatus(BaseModel):
    status: str  # the tag without "Runner": "Ready", "Loading", "Failed", ...
    layers_loaded: int | None = None
    total_layers: int | None = None
    error_message: str | None = None

    @property
    def ready(self) -> bool:
        return self.status in ("Ready", "Running")

    @property
    def failed(self) -> bool:
        return self.status == "Failed"

    def describe(self) -> str:
        if self.status == "Loading" and self.total_layers:
            return f"Loading {self.layers_loaded or 0}/{self.total_layers} layers"
        if self.failed:
            return f"Failed: {self.error_message or 'no message'}"
        return self.status


class Download(BaseModel):
    """One entry of state.downloads[node]: Pending | Ongoing | Completed | Failed."""

    node_id: str
    model_id: str
    status: str
    downloaded: int = 0  # bytes
    total: int = 0
    error_message: str | None = None
    read_only: bool = False


class Topology(BaseModel):
    nodes: list[str] = Field(default_factory=list)
    connections: list[tuple[str, str]] = Field(default_factory=list)
    rdma: list[tuple[str, str]] = Field(default_factory=list)  # the connections that are RDMA links


class ClusterState(BaseModel):
    nodes: dict[str, Node] = Field(default_factory=dict)
    instances: dict[str, Instance] = Field(default_factory=dict)
    runners: dict[str, RunnerStatus] = Field(default_factory=dict)
    downloads: dict[str, list[Download]] = Field(default_factory=dict)
    topology: Topology = Field(default_factory=Topology)
    custom_model_cards: dict[str, Any] = Field(default_factory=dict)
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)

    def instances_of(self, model_id: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.model_id == model_id]

    def runner_statuses(self, instance: Instance) -> dict[str, RunnerStatus]:
        """node id -> runner status (Unknown when exo has not published one yet)."""
        return {s.node_id: self.runners.get(s.runner_id, RunnerStatus(status="Unknown")) for s in instance.shards}

    def is_ready(self, instance: Instance) -> bool:
        return bool(instance.shards) and all(r.ready for r in self.runner_statuses(instance).values())

    def download(self, node_id: str, model_id: str) -> Download | None:
        return next((d for d in self.downloads.get(node_id, []) if d.model_id == model_id), None)

    def memory(self) -> list[NodeMemory]:
        """Every node's memory, largest free first (ties by id): the order exo's placement fills them."""
        nodes = sorted(self.nodes.values(), key=lambda n: (-(n.ram_available or 0), n.node_id))
        return [n.memory() for n in nodes]


class ModelEntry(BaseModel):
    id: str
    hugging_face_id: str | None = None
    name: str | None = None
    storage_size_megabytes: int | None = None  # MiB, as exo counts them
    supports_tensor: bool | None = None
    tasks: list[str] = Field(default_factory=list)
    is_custom: bool = False
    family: str | None = None
    quantization: str | None = None
    base_model: str | None = None
    capabilities: list[str] = Field(default_factory=list)
    reasoning_dialect: str | None = None
    context_length: int | None = None


class Preview(BaseModel):
    """One row of /instance/previews: exo sends one per (sharding, meta, node count) that it can place and
    one error row per (sharding, meta) it cannot; there is no min_nodes."""

    model_id: str
    sharding: str
    instance_meta: str
    instance: Instance | None = None
    memory_delta_by_node: dict[str, int] = Field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.instance is not None and not self.error

    @property
    def nodes(self) -> int | None:
        return len(self.instance.shards) if self.instance else None

    @property
    def route(self) -> Route | None:
        """The route this row answers: what was asked (sharding, meta) at the node count of its instance. A
        1-node row is the single route only when asked as a ring (exo turns 1-node JACCL into a ring, too).
        None for an error row (no node count) or an instance meta this tool does not know."""
        backend = _META_BACKEND.get(self.instance_meta)
        if not self.ok or backend is None:
            return None
        n = self.nodes or 1
        if n == 1:
            return Route.single("exo") if backend == "ring" else None
        return Route(engine="exo", sharding="tensor" if self.sharding == "Tensor" else "pipeline", backend=backend,
                     nodes=n)

    def refuses(self, route: Route) -> bool:
        """An error row for the (sharding, meta) of `route` (exo gives no node count with it)."""
        if self.ok or route.engine != "exo":
            return False
        return (self.sharding, self.instance_meta) == placement_of(route)[:2]


def placement_of(route: Route) -> tuple[ExoSharding, InstanceMeta, int]:
    """exo's (sharding, instance_meta, min_nodes) for a route; one node runs as a pipeline ring of one."""
    sharding: ExoSharding = "Tensor" if route.sharding == "tensor" else "Pipeline"
    meta: InstanceMeta = "MlxJaccl" if route.backend == "jaccl" else "MlxRing"
    return sharding, meta, route.nodes


class PlaceResult(BaseModel):
    message: str = ""
    command_id: str = ""
    model_card: dict[str, Any] = Field(default_factory=dict)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class GenerationStats(BaseModel):
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    peak_memory_bytes: int | None = None
    prefix_cache_hit: Any = None


class ChatResponse(BaseModel):
    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: Usage = Field(default_factory=Usage)
    generation_stats: GenerationStats | None = None
    power_usage: Any = None
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)


class StreamEvent(BaseModel):
    """One item of a chat stream. kind: keepalive | prefill | delta | finish | stats."""

    kind: Literal["keepalive", "prefill", "delta", "finish", "stats"]
    content: str = ""
    reasoning: str = ""
    processed: int = 0  # prefill
    total: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    stats: GenerationStats | None = None


# --- parsing of exo's tagged camelCase state ---------------------------------------------------------


class _Shape:
    """Any wrong type or missing key while reading an answer becomes one ExoProtocolError naming where."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and issubclass(kind, (TypeError, ValueError, AttributeError, KeyError, IndexError,
                                                  RecursionError)) and not issubclass(kind, ExoError):
            if kind is RecursionError:
                text = "nested too deeply"
            elif hasattr(exc, "errors"):  # pydantic: the first problem, on one line
                first = exc.errors()[0]
                text = f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', '')}"
            else:
                text = f"{kind.__name__}: {' '.join(str(exc).split())[:160]}"
            raise ExoProtocolError(f"{self.where}: not the shape exo sends ({text}). Is this exo's API, and the "
                                   "exo version this tool knows (docs/exo.md)?") from None
        return False


def _untag(obj: Any, where: str) -> tuple[str, dict[str, Any]]:
    """{"Tag": {...}} -> ("Tag", {...})."""
    if isinstance(obj, dict) and len(obj) == 1:
        tag, body = next(iter(obj.items()))
        if isinstance(body, dict):
            return tag, body
    raise ExoProtocolError(f"{where}: expected a tagged object like {{'Name': {{...}}}}, got {str(obj)[:120]}")


def _bytes(value: Any) -> int | None:
    """exo's Memory is {"inBytes": n}."""
    if isinstance(value, dict):
        value = value.get("inBytes", value.get("in_bytes"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def _dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ExoProtocolError(f"{where} is not an object: {str(value)[:120]}")
    return value


def parse_runner_status(obj: Any, where: str = "runner") -> RunnerStatus:
    tag, body = _untag(obj, where)
    with _Shape(where):
        return RunnerStatus(status=tag.removeprefix("Runner"), layers_loaded=body.get("layersLoaded"),
                            total_layers=body.get("totalLayers"), error_message=body.get("errorMessage"))


def _parse_shard(runner_id: str, node_id: str, obj: Any) -> Shard:
    tag, body = _untag(obj, f"shard of runner {runner_id}")
    return Shard(runner_id=runner_id, node_id=node_id, kind=tag.removesuffix("ShardMetadata"),
                 device_rank=body.get("deviceRank", 0), world_size=body.get("worldSize", 1),
                 start_layer=body.get("startLayer", 0), end_layer=body.get("endLayer", 0),
                 n_layers=body.get("nLayers", 0))


def parse_instance(obj: Any, where: str = "instance") -> Instance:
    tag, body = _untag(obj, where)
    with _Shape(where):
        sa = body.get("shardAssignments")
        if not isinstance(sa, dict) or not isinstance(sa.get("modelId"), str):
            raise ExoProtocolError(f"{where}: no shardAssignments.modelId in {tag}")
        runner_node = {r: n for n, r in _dict(sa.get("nodeToRunner"), f"{where}.nodeToRunner").items()}
        shards = [_parse_shard(rid, runner_node.get(rid, "?"), shard)
                  for rid, shard in _dict(sa.get("runnerToShard"), f"{where}.runnerToShard").items()]
        shards.sort(key=lambda s: s.device_rank)
        return Instance(instance_id=str(body.get("instanceId", "")), meta=tag.removesuffix("Instance"),
                        model_id=sa["modelId"], sharding=shards[0].kind if shards else "?", shards=shards,
                        card=_instance_card(sa), raw=obj)


def _instance_card(sa: dict[str, Any]) -> Card | None:
    """The model card the first shard carries (every shard of an instance holds the same one)."""
    for shard in _dict(sa.get("runnerToShard"), "runnerToShard").values():
        _, body = _untag(shard, "shard")
        card = body.get("modelCard")
        if isinstance(card, dict) and isinstance(card.get("modelId"), str):
            return Card(model_id=card["modelId"], n_layers=card.get("nLayers"), hidden_size=card.get("hiddenSize"),
                        storage_bytes=_bytes(card.get("storageSize")), quantization=card.get("quantization"))
    return None


def _parse_topology(obj: Any) -> Topology:
    """{"nodes": [id, ...], "connections": {source: {sink: [edge, ...]}}}."""
    obj = _dict(obj, "/state.topology")
    nodes = [str(n) for n in obj.get("nodes") or []]
    conns, rdma = [], []
    for s, sinks in _dict(obj.get("connections"), "/state.topology.connections").items():
        for t, edges in _dict(sinks, "/state.topology.connections").items():
            conns.append((str(s), str(t)))
            # an RDMA edge names its interfaces; a socket edge its multiaddr
            if any(isinstance(e, dict) and "sourceRdmaIface" in e for e in edges or []):
                rdma.append((str(s), str(t)))
    return Topology(nodes=nodes, connections=conns, rdma=rdma)


def parse_download(obj: Any, where: str) -> Download:
    tag, body = _untag(obj, where)
    _, shard = _untag(body.get("shardMetadata"), f"{where}.shardMetadata")
    card = _dict(shard.get("modelCard"), f"{where}.shardMetadata.modelCard")
    progress = _dict(body.get("downloadProgress"), f"{where}.downloadProgress")
    total = _bytes(progress.get("total", body.get("total"))) or 0
    return Download(node_id=str(body.get("nodeId", "")), model_id=str(card.get("modelId", "")),
                    status=tag.removeprefix("Download"), total=total,
                    downloaded=_bytes(progress.get("downloaded", body.get("downloaded"))) or 0,
                    error_message=body.get("errorMessage"), read_only=bool(body.get("readOnly", False)))


def parse_state(obj: Any, where: str = "/state") -> ClusterState:
    with _Shape(where):
        return _parse_state(obj, where)


def _parse_state(obj: Any, where: str) -> ClusterState:
    if not isinstance(obj, dict):
        raise ExoProtocolError(f"{where} is not a JSON object: {str(obj)[:120]}")

    def section(name: str) -> dict[str, Any]:
        return _dict(obj.get(name), f"{where}.{name}")

    memory, rdma = section("nodeMemory"), section("nodeRdmaCtl")
    # exo v1.0.71 publishes no nodeBackends: absent means "not said", not "no backend"
    backends = section("nodeBackends") if "nodeBackends" in obj else None
    identities, seen = section("nodeIdentities"), section("lastSeen")
    topology = _parse_topology(obj.get("topology"))
    ids = list(dict.fromkeys([*topology.nodes, *memory, *seen, *identities]))
    nodes = {}
    for nid in ids:
        mem = _dict(memory.get(nid), f"{where}.nodeMemory.{nid}")
        ident = _dict(identities.get(nid), f"{where}.nodeIdentities.{nid}")
        ctl = rdma.get(nid)
        node_backends = backends.get(nid) if backends is not None else None
        if node_backends is not None and not isinstance(node_backends, list):
            raise ExoProtocolError(f"{where}.nodeBackends.{nid} is not a list: {str(node_backends)[:80]}")
        nodes[nid] = Node(node_id=nid, friendly_name=ident.get("friendlyName"), chip=ident.get("chipId"),
                          ram_total=_bytes(mem.get("ramTotal")), ram_available=_bytes(mem.get("ramAvailable")),
                          rdma_ctl=None if ctl is None else bool(ctl.get("enabled") if isinstance(ctl, dict) else ctl),
                          rdma_peers=sorted({t for s, t in topology.rdma if s == nid}
                                            | {s for s, t in topology.rdma if t == nid}),
                          backends=None if node_backends is None else [str(b) for b in node_backends],
                          last_seen=str(seen[nid]) if nid in seen else None)
    instances = {k: parse_instance(v, f"{where}.instances[{k}]") for k, v in section("instances").items()}
    runners = {k: parse_runner_status(v, f"{where}.runners[{k}]") for k, v in section("runners").items()}
    downloads = {k: [parse_download(d, f"{where}.downloads[{k}]") for d in v or []]
                 for k, v in section("downloads").items()}
    return ClusterState(nodes=nodes, instances=instances, runners=runners, downloads=downloads, topology=topology,
                        custom_model_cards=section("customModelCards"), raw=obj)


def _parse_gen_stats(obj: Any) -> GenerationStats:
    if not isinstance(obj, dict):
        return GenerationStats()
    return GenerationStats(prompt_tps=float(obj.get("prompt_tps") or 0), generation_tps=float(obj.get("generation_tps") or 0),
                           prompt_tokens=int(obj.get("prompt_tokens") or 0),
                           generation_tokens=int(obj.get("generation_tokens") or 0),
                           peak_memory_bytes=_bytes(obj.get("peak_memory_usage")),
                           prefix_cache_hit=obj.get("prefix_cache_hit"))


def _usage(obj: Any) -> Usage:
    return Usage(**{k: int(v) for k, v in obj.items() if k in Usage.model_fields}) if isinstance(obj, dict) else Usage()


def _error_text(obj: Any) -> str | None:
    """exo's {error:{message,type,code}} (or FastAPI's {detail}) -> the message."""
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if isinstance(err, str):
            return err
        if "detail" in obj:
            return str(obj["detail"])
    return None


def parse_sse(lines: Iterator[str], where: str) -> Iterator[StreamEvent]:
    """exo's chat stream -> StreamEvents, ending after [DONE]. Raises StreamError on an error chunk or a
    stream that stops without [DONE], ExoProtocolError on a line that is not exo's."""
    with _Shape(where):
        yield from _parse_sse(lines, where)


def _parse_sse(lines: Iterator[str], where: str) -> Iterator[StreamEvent]:
    for line in lines:
        if not line:
            continue
        if len(line) > MAX_LINE:
            raise ExoProtocolError(f"{where} sent a line of {len(line)} characters (cap {MAX_LINE})")
        if line.startswith(":"):
            name, _, payload = line[1:].strip().partition(" ")
            if name == "keep-alive":
                yield StreamEvent(kind="keepalive")
            elif name == "prefill_progress":
                yield _prefill_event(payload, where)
            elif name == "generation_stats":
                yield StreamEvent(kind="stats", stats=_parse_gen_stats(_json(payload, where)))
            continue
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = _json(data, where)
        message = _error_text(chunk)
        if message is not None:
            raise StreamError(f"exo reported an error mid-stream at {where}: {message}. "
                              "A node may have left the cluster: check `/state` and place the instance again.")
        yield from _chunk_events(chunk, where)
    raise StreamError(f"The stream from {where} ended without [DONE]: the connection to exo broke off "
                      "(a node may have left the cluster, or exo restarted). Check /state and retry.")


def _json(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ExoProtocolError(f"{where} sent JSON nested too deeply to be exo's") from None
    except ValueError:
        raise ExoProtocolError(f"{where} sent something that is not JSON: {str(text)[:120]!r}") from None


def _prefill_event(payload: str, where: str) -> StreamEvent:
    """`: prefill_progress {"PrefillProgressChunk": {"model", "processed_tokens", "total_tokens"}}`."""
    tag, body = _untag(_json(payload, where), f"{where} prefill_progress")
    if tag != "PrefillProgressChunk":
        raise ExoProtocolError(f"{where}: prefill_progress carries {tag}, not PrefillProgressChunk")
    return StreamEvent(kind="prefill", processed=int(body.get("processed_tokens") or 0),
                       total=int(body.get("total_tokens") or 0))


def _chunk_events(chunk: Any, where: str) -> Iterator[StreamEvent]:
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
        raise ExoProtocolError(f"{where} sent a chunk without choices: {str(chunk)[:120]}")
    choice = chunk["choices"][0] if chunk["choices"] else {}
    delta = choice.get("delta") or {}
    content, reasoning = delta.get("content") or "", delta.get("reasoning_content") or ""
    if content or reasoning:
        yield StreamEvent(kind="delta", content=str(content), reasoning=str(reasoning))
    if choice.get("finish_reason") is not None or chunk.get("usage"):
        reason = choice.get("finish_reason")
        if reason == "error":
            raise StreamError(f"exo ended generation with finish_reason=error at {where}.")
        yield StreamEvent(kind="finish", finish_reason=reason, usage=_usage(chunk.get("usage")))


# --- the client ---------------------------------------------------------------------------------------


def _read_body(resp: requests.Response, where: str) -> None:
    """The whole body, capped; the call's deadline bounds the time."""
    chunks, n = [], 0
    for chunk in resp.iter_content(1 << 16):
        n += len(chunk)
        if n > MAX_BODY:
            resp.close()
            raise ExoProtocolError(f"{where} answered more than {MAX_BODY >> 20} MiB (the cap for one answer): "
                                   "that is not exo's API")
        chunks.append(chunk)
    resp._content = b"".join(chunks)


def _lines(resp: requests.Response, where: str) -> Iterator[str]:
    """SSE lines, each capped at MAX_LINE bytes."""
    buf = b""
    for chunk in resp.iter_content(1 << 14):
        buf += chunk
        *done, buf = buf.split(b"\n")
        for raw in done:
            yield raw.rstrip(b"\r").decode("utf-8", errors="replace")
        if len(buf) > MAX_LINE:
            raise ExoProtocolError(f"{where} sent a line longer than {MAX_LINE} bytes (the cap): not exo's stream")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", errors="replace")


DEFAULT_PORT = 52415


class BadExoURL(ExoError, ValueError):
    """The exo address cannot be an exo API (a scheme other than http/https, no host)."""


def normalize_url(url: str) -> str:
    """HOST, HOST:PORT or a full URL -> http(s)://HOST:PORT without a trailing slash (`--exo mac1:52415`
    is the form the help shows; exo's port is the default when none is given)."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    scheme, _, rest = text.partition("://")
    rest = rest.rstrip("/")
    text = f"{scheme}://{rest}"
    host = rest.split("/", 1)[0]
    if scheme.lower() not in ("http", "https") or not host or host.startswith(":"):
        raise BadExoURL(f"exo address {url[:80]!r}: give HOST, HOST:PORT or http://HOST:PORT (exo's API listens on "
                        f"port {DEFAULT_PORT})")
    if ":" not in host.rsplit("]", 1)[-1]:
        text = f"{scheme}://{host}:{DEFAULT_PORT}" + rest[len(host):]
    return text


class ExoClient:
    """One exo node's API (every node serves the same cluster state).

    deadline: a time.monotonic() instant no call may run past (the caller's whole budget, e.g. `up --timeout`):
    each call's limit shrinks to what is left of it, and a call made after it raises ExoTimeout at once."""

    def __init__(self, url: str | None = None, *, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, retries: int = GET_RETRIES,
                 session: requests.Session | None = None, deadline: float | None = None):
        self.url = normalize_url(url or paths.exo_api())
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout  # the total limit of one call, headers and body
        self.retries = retries
        self.deadline = deadline
        self.http = session or new_session()

    def left(self, seconds: float) -> float:
        """`seconds`, cut to what is left of the deadline."""
        if self.deadline is None:
            return seconds
        return max(0.0, min(seconds, self.deadline - time.monotonic()))

    # -- plumbing

    def _request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                 timeout: float | None = None, stream: bool = False) -> requests.Response:
        """One call within `timeout` seconds in total (the client's read_timeout by default). With stream=True
        the deadline keeps running until the caller closes the response (see _close)."""
        url = self.url + path
        attempts = 1 + (self.retries if method == "GET" else 0)  # only GETs are safe to repeat
        for attempt in range(attempts):
            total = timeout or self.read_timeout
            limit = self.left(self.connect_timeout + total)  # connecting and answering, within the deadline
            if limit <= 0.0:
                raise ExoTimeout(f"exo at {self.url}: no time left for {method} {path} (the whole operation's "
                                 "time limit ran out); check exo's log, or raise --timeout.")
            connect, total = min(self.connect_timeout, limit), min(total, limit)
            deadline = _Deadline(limit).start()
            keep = False
            try:
                resp = self.http.request(method, url, params=params, json=body, stream=True,
                                         timeout=(connect, total))
                deadline.attach()
                if stream:
                    resp.arthur_deadline = deadline  # type: ignore[attr-defined]
                    keep = True
                else:
                    _read_body(resp, f"{method} {url}")
                return resp
            except requests.RequestException as exc:
                if deadline.fired:
                    raise ExoTimeout(f"exo at {self.url} did not finish answering {method} {path} within "
                                     f"{total:g} s (a limit on the whole answer): it may be overloaded or hung, or "
                                     "this is not exo; check its log, or raise the timeout.") from None
                if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
                    if attempt + 1 < attempts:
                        time.sleep(0.2 * (attempt + 1))
                        continue
                    if isinstance(exc, requests.Timeout) and not isinstance(exc, requests.ConnectionError):
                        raise ExoTimeout(f"exo at {self.url} did not answer {method} {path} within {total:g} s: "
                                         "it may be overloaded or hung; check its log, or raise the timeout.") from None
                    raise ExoUnreachable(
                        f"Cannot reach exo at {self.url} ({method} {path}): {_reason(exc)}. Is exo running on that "
                        f"host and port (default {DEFAULT_URL}; set EXO_API to override)?") from None
                raise StreamError(f"The answer of exo at {self.url} to {method} {path} broke off after its headers "
                                  f"(a broken HTTP 200; {_reason(exc)}): the work failed on a node, which may have "
                                  "left the cluster. Check /state and the nodes' logs, then retry.") from None
            finally:
                if not keep:
                    deadline.cancel()
        raise AssertionError("unreachable")

    def _json(self, resp: requests.Response, what: str) -> Any:
        """Check status and content type; return parsed JSON or raise the precise error."""
        where = f"{resp.request.method} {resp.url}"
        ctype = resp.headers.get("content-type", "")
        text = resp.text
        try:
            data = json.loads(text) if text.strip() else None
        except RecursionError:
            raise ExoProtocolError(f"{where} answered JSON nested too deeply to be exo's ({what})") from None
        except ValueError:
            data = None
        if resp.status_code >= 400:
            message = _error_text(data) or text.strip()[:200]
            if data is None and "html" in ctype.lower():
                raise ExoProtocolError(f"{where} answered HTTP {resp.status_code} with an HTML page, not exo's JSON: "
                                       f"something else is listening at {self.url}. Check the port "
                                       f"(exo's API is on 52415) or EXO_API.")
            cls = ModelNotRunning if resp.status_code == 404 and "no instance found" in message.lower() else ExoHTTPError
            hint = (" Place an instance of exactly this model id first (full Hugging Face id)."
                    if cls is ModelNotRunning else "")
            raise cls(f"exo refused {what} ({where}): HTTP {resp.status_code}: {message}.{hint}",
                      status=resp.status_code, exo_message=message, url=resp.url)
        if data is None:
            kind = "an HTML page" if "html" in ctype.lower() or text.lstrip().startswith("<") else "something not JSON"
            raise ExoProtocolError(f"{where} answered {kind} instead of exo's JSON ({what}): is {self.url} exo's API? "
                                   f"Check the port (exo's API is on 52415) or EXO_API.")
        return data

    def get(self, path: str, params: dict | None = None, what: str = "") -> Any:
        return self._json(self._request("GET", path, params=params), what or f"GET {path}")

    # -- cluster

    def node_id(self) -> str:
        data = self.get("/node_id", what="the node id")
        if not isinstance(data, str):
            raise ExoProtocolError(f"{self.url}/node_id should be a bare JSON string, got {str(data)[:80]}")
        return data

    def state(self) -> ClusterState:
        return parse_state(self.get("/state", what="the cluster state"), f"{self.url}/state")

    def state_path(self, path: str) -> Any:
        """GET /state/{path}, raw (e.g. "nodeMemory", "instances/<id>")."""
        return self.get("/state/" + path.strip("/"), what=f"state/{path}")

    # -- catalogue

    def models(self, downloaded: bool = False) -> list[ModelEntry]:
        data = self.get("/v1/models", {"status": "downloaded"} if downloaded else None, "the model list")
        where = f"{self.url}/v1/models"
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ExoProtocolError(f"{where} is not a model list: {str(data)[:120]}")
        with _Shape(where):
            return [ModelEntry(**{k: v for k, v in m.items() if k in ModelEntry.model_fields}) for m in data["data"]]

    def add_model(self, model_id: str, timeout: float = ADD_TIMEOUT) -> ModelEntry:
        """POST /models/add: exo builds the card from the model's folder in its model dirs (checking it against
        Hugging Face when it can reach it) and puts it into State, which every node keeps."""
        resp = self._request("POST", "/models/add", body={"model_id": model_id}, timeout=timeout)
        data = self._json(resp, f"adding the card for {model_id}")
        with _Shape(f"{self.url}/models/add"):
            return ModelEntry(**{k: v for k, v in data.items() if k in ModelEntry.model_fields})

    def delete_custom_model(self, model_id: str) -> Any:
        return self._json(self._request("DELETE", f"/models/custom/{model_id}"), f"deleting custom card {model_id}")

    # -- placement

    def previews(self, model_id: str, node_ids: list[str] | None = None) -> list[Preview]:
        params: dict[str, Any] = {"model_id": model_id}
        if node_ids:
            params["node_ids"] = node_ids
        data = self.get("/instance/previews", params, f"placement previews for {model_id}")
        where = f"{self.url}/instance/previews"
        if not isinstance(data, dict) or not isinstance(data.get("previews"), list):
            raise ExoProtocolError(f"{where} has no previews list: {str(data)[:120]}")
        out = []
        with _Shape(where):
            for p in data["previews"]:
                inst = parse_instance(p["instance"], "preview instance") if p.get("instance") else None
                deltas = {k: _bytes(v) or 0 for k, v in _dict(p.get("memory_delta_by_node"), where).items()}
                out.append(Preview(model_id=p.get("model_id", model_id), sharding=p.get("sharding", "?"),
                                   instance_meta=p.get("instance_meta", "?"), instance=inst,
                                   memory_delta_by_node=deltas, error=p.get("error")))
        return out

    def placement(self, model_id: str, sharding: ExoSharding = "Pipeline", meta: InstanceMeta = "MlxRing",
                  min_nodes: int = 1) -> Instance:
        """GET /instance/placement: the instance exo's master would make now, or PlacementFailed with its reason."""
        params = {"model_id": model_id, "sharding": sharding, "instance_meta": meta, "min_nodes": min_nodes}
        try:
            data = self.get("/instance/placement", params, f"a {sharding}/{meta} placement of {model_id}")
        except ExoHTTPError as exc:
            raise PlacementFailed(f"exo cannot place {model_id} as {sharding}/{meta} on >= {min_nodes} node(s): "
                                  f"{exc.exo_message}", model_id=model_id, reason=exc.exo_message) from None
        return parse_instance(data, f"{self.url}/instance/placement")

    def place_instance(self, model_id: str, sharding: ExoSharding = "Pipeline", meta: InstanceMeta = "MlxRing",
                       min_nodes: int = 1) -> PlaceResult:
        """Send the command only: exo places asynchronously (see wait_ready / place_and_wait)."""
        body = {"model_id": model_id, "sharding": sharding, "instance_meta": meta, "min_nodes": min_nodes}
        resp = self._request("POST", "/place_instance", body=body)
        try:
            data = self._json(resp, f"placing {model_id}")
        except ExoHTTPError as exc:
            raise PlacementFailed(f"exo refused to place {model_id} ({sharding}/{meta}): {exc.exo_message}",
                                  model_id=model_id, reason=exc.exo_message) from None
        with _Shape(f"{self.url}/place_instance"):
            return PlaceResult(**{k: v for k, v in data.items() if k in PlaceResult.model_fields})

    def create_instance(self, instance: Instance) -> Any:
        """POST /instance with an instance taken from a preview (exo checks only total memory)."""
        resp = self._request("POST", "/instance", body={"instance": instance.raw})
        try:
            return self._json(resp, f"creating instance {instance.instance_id}")
        except ExoHTTPError as exc:
            raise PlacementFailed(f"exo refused instance {instance.instance_id} of {instance.model_id}: "
                                  f"{exc.exo_message}", model_id=instance.model_id, reason=exc.exo_message) from None

    def instance(self, instance_id: str) -> Instance:
        return parse_instance(self.get(f"/instance/{instance_id}", what=f"instance {instance_id}"))

    def delete_instance(self, instance_id: str) -> Any:
        return self._json(self._request("DELETE", f"/instance/{instance_id}"), f"deleting instance {instance_id}")

    def wait_ready(self, model_id: str, *, timeout: float = 600.0, poll: float = 0.5,
                   known: set[str] | None = None, on_progress: Callable[[int, int], None] | None = None,
                   on_download: Callable[[int, int], None] | None = None,
                   placement: tuple[str, str, int] | None = None,
                   appear_timeout: float = APPEAR_TIMEOUT) -> Instance:
        """Poll /state until an instance of model_id (not in `known`) has every runner RunnerReady.

        on_progress(layers_loaded, total_layers) sums the instance's runners; on_download(bytes done, total)
        sums its nodes' ongoing downloads. `placement` (sharding, meta, min_nodes) is what was asked for: when
        no instance appears within appear_timeout, exo's master rejected it, and /instance/placement says why.
        Raises RunnerFailed, DownloadFailed, PlacementFailed or InstanceNotReady.
        """
        known = known or set()
        timeout = self.left(timeout)
        start = time.monotonic()
        deadline = start + timeout
        seen: Instance | None = None
        last: dict[str, str] = {}
        while True:
            state = self.state()
            fresh = [i for i in state.instances_of(model_id) if i.instance_id not in known]
            if seen is not None and seen.instance_id not in state.instances:
                raise PlacementFailed(f"Instance {seen.instance_id} of {model_id} disappeared from exo's state at "
                                      f"{self.url} while loading (a node left the cluster, or it was deleted).",
                                      model_id=model_id, reason="instance vanished")
            if fresh:
                seen = next((i for i in fresh if seen and i.instance_id == seen.instance_id), fresh[0])
                last = self._check_instance(state, seen, on_progress, on_download)
                if state.is_ready(seen):
                    return seen
            elif placement and time.monotonic() - start >= min(appear_timeout, timeout):
                raise self._not_placed(model_id, placement)
            if time.monotonic() >= deadline:
                break
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        if seen is None:
            raise PlacementFailed(f"no instance of {model_id} appeared within {timeout:g} s at {self.url}.",
                                  model_id=model_id, reason="no instance appeared")
        detail = "; ".join(f"node {n}: {s}" for n, s in last.items())
        raise InstanceNotReady(f"Instance {seen.instance_id} of {model_id} was not ready after {timeout:g} s "
                               f"({detail}). Check the nodes' exo logs, then delete it and retry or fall back.",
                               instance_id=seen.instance_id, statuses=last)

    def _check_instance(self, state: ClusterState, inst: Instance, on_progress, on_download) -> dict[str, str]:
        """Raise on a failed runner or download; report progress; node -> what it is doing."""
        model_id = inst.model_id
        statuses = state.runner_statuses(inst)
        described = {}
        done = total = 0
        for shard in inst.shards:
            node, st = shard.node_id, statuses[shard.node_id]
            if st.failed:
                raise RunnerFailed(f"exo's runner on node {node} failed to load {model_id}: "
                                   f"{st.error_message or 'no message'}. Check that node's exo log.",
                                   node_id=node, runner_id=shard.runner_id, error_message=st.error_message or "",
                                   instance_id=inst.instance_id)
            dl = state.download(node, model_id)
            if dl is not None and dl.status == "Failed":
                raise DownloadFailed(f"node {node} has no weights for {model_id}: exo says \"{dl.error_message}\". "
                                     "Link the model on that node (`arthur-cluster link`) and start its exo with "
                                     "EXO_MODELS_READ_ONLY_DIRS naming the links directory, or let exo download it.",
                                     node_id=node, error_message=dl.error_message or "", instance_id=inst.instance_id)
            if dl is not None and dl.status in ("Ongoing", "Pending") and not st.ready:
                done, total = done + dl.downloaded, total + dl.total
                described[node] = f"downloading {dl.downloaded >> 20}/{dl.total >> 20} MiB"
            else:
                described[node] = st.describe()
        if on_download and total:
            on_download(done, total)
        if on_progress:
            loaded = sum(st.total_layers or _span(s) if st.ready else (st.layers_loaded or 0)
                         for s, st in ((s, statuses[s.node_id]) for s in inst.shards))
            on_progress(loaded, sum(statuses[s.node_id].total_layers or _span(s) for s in inst.shards))
        return described

    def _not_placed(self, model_id: str, placement: tuple[str, str, int]) -> PlacementFailed:
        """exo's master only logs a rejected placement; /instance/placement, asked the same, says why."""
        sharding, meta, n = placement
        try:
            self.placement(model_id, sharding, meta, n)  # type: ignore[arg-type]
            reason = "exo's master did not create it, though a placement is possible now (see its log)"
        except PlacementFailed as exc:
            reason = exc.reason
        except ExoError as exc:
            reason = f"and asking why failed: {exc}"
        return PlacementFailed(f"exo's master did not place {model_id} ({sharding}/{meta}, >= {n} node(s)) at "
                               f"{self.url}: {reason}", model_id=model_id, reason=reason)

    def place_and_wait(self, model_id: str, sharding: ExoSharding = "Pipeline", meta: InstanceMeta = "MlxRing",
                       min_nodes: int = 1, *, timeout: float = 600.0, poll: float = 0.5,
                       on_progress: Callable[[int, int], None] | None = None,
                       on_download: Callable[[int, int], None] | None = None, cleanup: bool = True) -> Instance:
        """Ask exo whether it can place the model (its reason when not), place it, then wait until every runner
        is RunnerReady. On failure or timeout the new instance is deleted (cleanup=True) so it does not hold
        memory, and the error says why."""
        known = {i.instance_id for i in self.state().instances_of(model_id)}
        self.placement(model_id, sharding, meta, min_nodes)  # PlacementFailed with exo's reason, nothing placed
        self.place_instance(model_id, sharding, meta, min_nodes)
        try:
            return self.wait_ready(model_id, timeout=timeout, poll=poll, known=known, on_progress=on_progress,
                                   on_download=on_download, placement=(sharding, meta, min_nodes))
        except (RunnerFailed, DownloadFailed, InstanceNotReady) as exc:
            if cleanup and exc.instance_id:
                try:
                    self.delete_instance(exc.instance_id)
                except ExoError:
                    pass  # the original error is the one to report
            raise

    def place_route_and_wait(self, model_id: str, route: Route, **kw: Any) -> Instance:
        """place_and_wait for one of the project's routes (its exo sharding, instance meta and node count)."""
        sharding, meta, n = placement_of(route)
        return self.place_and_wait(model_id, sharding, meta, n, **kw)

    # -- generation

    def _chat_body(self, model_id: str, messages: list[dict], stream: bool, **options: Any) -> dict:
        body = {"model": model_id, "messages": messages, "stream": stream}
        body.update({k: v for k, v in options.items() if v is not None})
        if stream:
            body.setdefault("stream_options", {"include_usage": True})
        return body

    def chat(self, model_id: str, messages: list[dict], *, max_tokens: int = 256, temperature: float | None = 0.0,
             bench: bool = False, timeout: float = CHAT_READ_TIMEOUT, **options: Any) -> ChatResponse:
        """Non-streaming chat completion (or /bench/chat/completions with bench=True)."""
        path = "/bench/chat/completions" if bench else "/v1/chat/completions"
        body = self._chat_body(model_id, messages, False, max_tokens=max_tokens, temperature=temperature, **options)
        resp = self._request("POST", path, body=body, timeout=timeout)
        try:
            data = self._json(resp, f"a chat completion with {model_id}")
        except ExoProtocolError:
            if resp.status_code == 200:
                raise StreamError(f"exo at {self.url} answered 200 for {model_id} with a broken body "
                                  f"({resp.text[:80]!r}): generation failed after the headers were sent. "
                                  "Check /state and the nodes' logs.") from None
            raise
        message = _error_text(data)
        if message is not None:
            raise StreamError(f"exo at {self.url} answered 200 for {model_id} but reported: {message}")
        with _Shape(f"{self.url}{path}"):
            return _chat_response(data, f"{path} at {self.url}")

    def bench(self, model_id: str, messages: list[dict], **kw: Any) -> ChatResponse:
        return self.chat(model_id, messages, bench=True, **kw)

    def stream_chat(self, model_id: str, messages: list[dict], *, max_tokens: int = 256,
                    temperature: float | None = 0.0, timeout: float = CHAT_READ_TIMEOUT,
                    **options: Any) -> Iterator[StreamEvent]:
        """Streaming chat completion within `timeout` seconds in total: keepalive/prefill/delta/finish/stats
        events; raises StreamError."""
        body = self._chat_body(model_id, messages, True, max_tokens=max_tokens, temperature=temperature, **options)
        resp = self._request("POST", "/v1/chat/completions", body=body, timeout=timeout, stream=True)
        deadline: _Deadline = resp.arthur_deadline  # type: ignore[attr-defined]
        where = f"{self.url}/v1/chat/completions ({model_id})"
        try:
            with resp:
                if resp.status_code >= 400 or "text/event-stream" not in resp.headers.get("content-type", ""):
                    _read_body(resp, where)
                    self._json(resp, f"a chat stream with {model_id}")  # raises the precise error
                    raise ExoProtocolError(f"{where} did not answer with an event stream.")
                yield from parse_sse(_lines(resp, where), where)
        except requests.RequestException as exc:
            if deadline.fired:
                raise StreamError(f"The stream from {where} did not finish within {timeout:g} s (a limit on the "
                                  "whole answer): exo may be hung; check its log, or raise the timeout.") from None
            raise StreamError(f"The stream from {where} broke off: {_reason(exc)}. A node may have left the "
                              "cluster: check /state and place the instance again.") from None
        finally:
            deadline.cancel()


def _chat_response(data: Any, where: str) -> ChatResponse:
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ExoProtocolError(f"{where}: not a chat completion: {str(data)[:120]}")
    choice = data["choices"][0]
    msg = choice.get("message") or {}
    stats = _parse_gen_stats(data["generation_stats"]) if data.get("generation_stats") else None
    return ChatResponse(text=msg.get("content") or "", reasoning=msg.get("reasoning_content") or "",
                        finish_reason=choice.get("finish_reason"), usage=_usage(data.get("usage")),
                        generation_stats=stats, power_usage=data.get("power_usage"), raw=data)


def _span(shard: Shard) -> int:
    return shard.end_layer - shard.start_layer


def _reason(exc: Exception) -> str:
    text = str(exc)
    for key in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                "Remote end closed", "IncompleteRead", "Connection aborted"):
        if key in text:
            return key
    return text[:160]
