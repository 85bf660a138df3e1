"""The exo HTTP API, typed (contract: shared/facts/exo.md).

Every call has a timeout; only idempotent GETs are retried. Cluster state arrives camelCase and tagged by
class name ({"MlxRingInstance": {...}}, {"RunnerReady": {}}); it is parsed here into plain typed values so
nothing downstream touches raw JSON. Model ids are always full Hugging Face ids: current exo resolves no
short names.

Node versions: exo.md does not name a field for them. Nodes of different exo versions never join one
cluster, so the check that matters is "every node I expect is in /state". Where a node publishes its
version (state.nodeIdentities[<node>].exoVersion, the shape the test simulator serves) it is read and
compared too; a node without one reports None.
"""

from __future__ import annotations

from .errors import ArthurError

import json
import time
from typing import Any, Callable, Iterator, Literal

import requests
from pydantic import BaseModel, Field

from . import paths

DEFAULT_URL = "http://localhost:52415"
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 30.0
CHAT_READ_TIMEOUT = 300.0  # a stream gets a keep-alive every 10 s; a non-streaming answer can take long
GET_RETRIES = 2

Sharding = Literal["Pipeline", "Tensor"]
InstanceMeta = Literal["MlxRing", "MlxJaccl"]


# --- errors -------------------------------------------------------------------------------------


class ExoError(ArthurError, RuntimeError):
    """Anything that went wrong talking to exo; the message names the URL/node and what to do."""


class ExoUnreachable(ExoError):
    pass


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


class ExoVersionMismatch(ExoError):
    def __init__(self, message: str, versions: dict[str, str | None]):
        super().__init__(message)
        self.versions = versions


class PlacementFailed(ExoError):
    def __init__(self, message: str, *, model_id: str = "", reason: str = ""):
        super().__init__(message)
        self.model_id = model_id
        self.reason = reason


class RunnerFailed(ExoError):
    def __init__(self, message: str, *, node_id: str, runner_id: str, error_message: str, instance_id: str = ""):
        super().__init__(message)
        self.node_id = node_id
        self.runner_id = runner_id
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


# --- typed values ---------------------------------------------------------------------------------


class Node(BaseModel):
    node_id: str
    friendly_name: str | None = None
    ram_total: int | None = None  # bytes
    ram_available: int | None = None
    rdma_enabled: bool = False
    backends: list[str] = Field(default_factory=list)
    exo_version: str | None = None
    last_seen: str | None = None


class Shard(BaseModel):
    runner_id: str
    node_id: str
    kind: str  # "Pipeline" | "Tensor" | "Cfg"
    device_rank: int = 0
    world_size: int = 1
    start_layer: int = 0
    end_layer: int = 0
    n_layers: int = 0


class Instance(BaseModel):
    instance_id: str
    meta: str  # "MlxRing" | "MlxJaccl" | ...
    model_id: str
    sharding: str  # kind of its shards
    shards: list[Shard] = Field(default_factory=list)
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)  # the tagged object, as exo sent it

    @property
    def node_ids(self) -> list[str]:
        return [s.node_id for s in self.shards]

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


class Topology(BaseModel):
    nodes: list[str] = Field(default_factory=list)
    connections: list[tuple[str, str]] = Field(default_factory=list)


class ClusterState(BaseModel):
    nodes: dict[str, Node] = Field(default_factory=dict)
    instances: dict[str, Instance] = Field(default_factory=dict)
    runners: dict[str, RunnerStatus] = Field(default_factory=dict)
    topology: Topology = Field(default_factory=Topology)
    custom_model_cards: dict[str, dict[str, Any]] = Field(default_factory=dict)
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)

    def instances_of(self, model_id: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.model_id == model_id]

    def runner_statuses(self, instance: Instance) -> dict[str, RunnerStatus]:
        """node id -> runner status (Unknown when exo has not published one yet)."""
        return {s.node_id: self.runners.get(s.runner_id, RunnerStatus(status="Unknown")) for s in instance.shards}

    def is_ready(self, instance: Instance) -> bool:
        return bool(instance.shards) and all(r.ready for r in self.runner_statuses(instance).values())

    def versions(self) -> dict[str, str | None]:
        return {nid: n.exo_version for nid, n in self.nodes.items()}


class ModelEntry(BaseModel):
    id: str
    hugging_face_id: str | None = None
    name: str | None = None
    storage_size_megabytes: float | None = None
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
    model_id: str
    sharding: str
    instance_meta: str
    min_nodes: int | None = None
    instance: Instance | None = None
    memory_delta_by_node: dict[str, int] = Field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.instance is not None and not self.error


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


def _untag(obj: Any, where: str) -> tuple[str, dict[str, Any]]:
    """{"Tag": {...}} -> ("Tag", {...})."""
    if isinstance(obj, dict) and len(obj) == 1:
        tag, body = next(iter(obj.items()))
        if isinstance(body, dict):
            return tag, body
    raise ExoProtocolError(f"{where}: expected a tagged object like {{'Name': {{...}}}}, got {str(obj)[:120]}")


def _bytes(value: Any) -> int | None:
    """exo's Memory is {"inBytes": n}; accept a bare number or snake_case too."""
    if isinstance(value, dict):
        value = value.get("inBytes", value.get("in_bytes"))
    return int(value) if isinstance(value, (int, float)) else None


def parse_runner_status(obj: Any, where: str = "runner") -> RunnerStatus:
    tag, body = _untag(obj, where)
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
    sa = body.get("shardAssignments")
    if not isinstance(sa, dict) or "modelId" not in sa:
        raise ExoProtocolError(f"{where}: no shardAssignments.modelId in {tag}")
    shards: list[Shard] = []
    if isinstance(sa.get("runnerToShard"), dict):
        runner_node = {r: n for n, r in (sa.get("nodeToRunner") or {}).items()}
        for rid, shard in sa["runnerToShard"].items():
            shards.append(_parse_shard(rid, runner_node.get(rid, "?"), shard))
    else:  # newer exo: a list of [node_id, runner_id, shard] in rank order
        for item in sa.get("shards") or []:
            nid, rid, shard = (item["nodeId"], item["runnerId"], item["shard"]) if isinstance(item, dict) else item
            shards.append(_parse_shard(rid, nid, shard))
    shards.sort(key=lambda s: s.device_rank)
    return Instance(instance_id=str(body.get("instanceId", "")), meta=tag.removesuffix("Instance"),
                    model_id=sa["modelId"], sharding=shards[0].kind if shards else "?", shards=shards, raw=obj)


def _parse_topology(obj: Any) -> Topology:
    if not isinstance(obj, dict):
        return Topology()
    nodes = [n if isinstance(n, str) else str(n.get("nodeId", n.get("node_id", ""))) for n in obj.get("nodes") or []]
    conns = []
    raw_conns = obj.get("connections") or []
    if isinstance(raw_conns, dict):  # {source: {sink: [...]}}
        raw_conns = [{"source": s, "sink": t} for s, sinks in raw_conns.items() for t in (sinks or {})]
    for c in raw_conns:
        if isinstance(c, dict):
            conns.append((str(c.get("source", c.get("localNodeId", ""))), str(c.get("sink", c.get("sendBackNodeId", "")))))
    return Topology(nodes=nodes, connections=conns)


def parse_state(obj: Any) -> ClusterState:
    if not isinstance(obj, dict):
        raise ExoProtocolError(f"/state is not a JSON object: {str(obj)[:120]}")

    def section(name: str) -> dict[str, Any]:
        value = obj.get(name) or {}
        if not isinstance(value, dict):
            raise ExoProtocolError(f"/state.{name} is not an object")
        return value

    memory, rdma, backends = section("nodeMemory"), section("nodeRdmaCtl"), section("nodeBackends")
    identities, seen = section("nodeIdentities"), section("lastSeen")
    topology = _parse_topology(obj.get("topology"))
    ids = list(dict.fromkeys([*topology.nodes, *memory, *seen, *identities]))
    nodes = {}
    for nid in ids:
        mem, ident, ctl = memory.get(nid) or {}, identities.get(nid) or {}, rdma.get(nid)
        nodes[nid] = Node(node_id=nid, friendly_name=ident.get("friendlyName"),
                          ram_total=_bytes(mem.get("ramTotal")), ram_available=_bytes(mem.get("ramAvailable")),
                          rdma_enabled=bool(ctl.get("enabled") if isinstance(ctl, dict) else ctl),
                          backends=[str(b) for b in backends.get(nid) or []],
                          exo_version=ident.get("exoVersion") or ident.get("version"),
                          last_seen=str(seen[nid]) if nid in seen else None)
    instances = {k: parse_instance(v, f"/state.instances[{k}]") for k, v in section("instances").items()}
    runners = {k: parse_runner_status(v, f"/state.runners[{k}]") for k, v in section("runners").items()}
    return ClusterState(nodes=nodes, instances=instances, runners=runners, topology=topology,
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
    stream that stops without [DONE]."""
    event_name = ""
    for line in lines:
        if line is None or line == "":
            event_name = ""
            continue
        if line.startswith(":"):
            comment = line[1:].strip()
            name, _, payload = comment.partition(" ")
            if name == "keep-alive":
                yield StreamEvent(kind="keepalive")
            elif name == "prefill_progress":
                yield _prefill_event(payload, where)
            elif name == "generation_stats":
                yield StreamEvent(kind="stats", stats=_parse_gen_stats(_json(payload, where)))
            continue
        if line.startswith("event:"):  # older exo sent prefill progress as a named event
            event_name = line[6:].strip()
            continue
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        chunk = _json(data, where)
        if event_name == "prefill_progress":
            yield _prefill_event(data, where)
            continue
        message = _error_text(chunk)
        if message is not None:
            raise StreamError(f"exo reported an error mid-stream at {where}: {message}. "
                              "A node may have left the cluster: check `/state` and place the instance again.")
        yield from _chunk_events(chunk, where)
    raise StreamError(f"The stream from {where} ended without [DONE]: the connection to exo broke off "
                      "(a node may have left the cluster, or exo restarted). Check /state and retry.")


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise ExoProtocolError(f"{where} sent a line that is not JSON: {text[:120]!r}") from None


def _prefill_event(payload: str, where: str) -> StreamEvent:
    p = _json(payload, where) if payload else {}
    processed = p.get("processed", p.get("processed_tokens", 0)) if isinstance(p, dict) else 0
    total = p.get("total", p.get("total_tokens", 0)) if isinstance(p, dict) else 0
    return StreamEvent(kind="prefill", processed=int(processed), total=int(total))


def _chunk_events(chunk: Any, where: str) -> Iterator[StreamEvent]:
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list):
        raise ExoProtocolError(f"{where} sent a chunk without choices: {str(chunk)[:120]}")
    choice = chunk["choices"][0] if chunk["choices"] else {}
    delta = choice.get("delta") or {}
    content, reasoning = delta.get("content") or "", delta.get("reasoning_content") or ""
    if content or reasoning:
        yield StreamEvent(kind="delta", content=content, reasoning=reasoning)
    if choice.get("finish_reason") is not None or chunk.get("usage"):
        reason = choice.get("finish_reason")
        if reason == "error":
            raise StreamError(f"exo ended generation with finish_reason=error at {where}.")
        yield StreamEvent(kind="finish", finish_reason=reason, usage=_usage(chunk.get("usage")))


# --- the client ---------------------------------------------------------------------------------------


class ExoClient:
    """One exo node's API (every node serves the same cluster state)."""

    def __init__(self, url: str | None = None, *, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, retries: int = GET_RETRIES,
                 session: requests.Session | None = None):
        self.url = (url or paths.exo_api()).rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        self.http = session or requests.Session()

    # -- plumbing

    def _request(self, method: str, path: str, *, params: dict | None = None, body: Any = None,
                 read_timeout: float | None = None, stream: bool = False) -> requests.Response:
        url = self.url + path
        attempts = 1 + (self.retries if method == "GET" else 0)  # only GETs are safe to repeat
        for attempt in range(attempts):
            try:
                return self.http.request(method, url, params=params, json=body, stream=stream,
                                         timeout=(self.connect_timeout, read_timeout or self.read_timeout))
            except requests.ConnectionError as exc:
                if attempt + 1 < attempts:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise ExoUnreachable(
                    f"Cannot reach exo at {self.url} ({method} {path}): {_reason(exc)}. Is exo running on that host "
                    f"and port (default {DEFAULT_URL}; set EXO_API to override)?") from None
            except requests.Timeout:
                if attempt + 1 < attempts:
                    continue
                raise ExoUnreachable(f"exo at {self.url} did not answer {method} {path} within "
                                     f"{read_timeout or self.read_timeout:g} s: it may be overloaded or hung; "
                                     "check its log, or raise the timeout.") from None
            except requests.RequestException as exc:  # the body broke off after the headers
                raise StreamError(f"The answer of exo at {self.url} to {method} {path} broke off after its headers "
                                  f"(a broken HTTP 200; {_reason(exc)}): the work failed on a node, which may have "
                                  "left the cluster. Check /state and the nodes' logs, then retry.") from None
        raise AssertionError("unreachable")

    def _json(self, resp: requests.Response, what: str) -> Any:
        """Check status and content type; return parsed JSON or raise the precise error."""
        where = f"{resp.request.method} {resp.url}"
        ctype = resp.headers.get("content-type", "")
        text = resp.text
        try:
            data = resp.json()
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
        return parse_state(self.get("/state", what="the cluster state"))

    def state_path(self, path: str) -> Any:
        """GET /state/{path}, raw (e.g. "nodeMemory", "instances/<id>")."""
        return self.get("/state/" + path.strip("/"), what=f"state/{path}")

    def versions(self) -> dict[str, str | None]:
        return self.state().versions()

    def check_versions(self, expected: str | None = None, nodes: list[str] | None = None) -> dict[str, str | None]:
        """All nodes on one exo version (and `expected` when given); `nodes` must all be in the cluster."""
        state = self.state()
        versions = state.versions()
        missing = [n for n in nodes or [] if n not in versions]
        if missing:
            raise ExoVersionMismatch(
                f"Node(s) {', '.join(missing)} are not in the cluster seen at {self.url}. exo nodes of different "
                "versions never join one cluster: run the same exo version on every node and restart them.", versions)
        known = {v for v in versions.values() if v}
        if len(known) > 1 or (expected and known and known != {expected}):
            detail = ", ".join(f"{n}={v or 'unknown'}" for n, v in versions.items())
            want = f" (expected {expected})" if expected else ""
            raise ExoVersionMismatch(
                f"exo nodes run different versions{want}: {detail}. Install the same exo version on every node "
                "and restart them.", versions)
        return versions

    # -- catalogue

    def models(self, downloaded: bool = False) -> list[ModelEntry]:
        data = self.get("/v1/models", {"status": "downloaded"} if downloaded else None, "the model list")
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise ExoProtocolError(f"{self.url}/v1/models is not a model list: {str(data)[:120]}")
        return [ModelEntry(**{k: v for k, v in m.items() if k in ModelEntry.model_fields}) for m in data["data"]]

    def add_model(self, model_id: str) -> ModelEntry:
        resp = self._request("POST", "/models/add", body={"model_id": model_id})
        data = self._json(resp, f"adding the card for {model_id}")
        return ModelEntry(**{k: v for k, v in data.items() if k in ModelEntry.model_fields})

    def delete_custom_model(self, model_id: str) -> Any:
        return self._json(self._request("DELETE", f"/models/custom/{model_id}"), f"deleting custom card {model_id}")

    # -- placement

    def previews(self, model_id: str, node_ids: list[str] | None = None) -> list[Preview]:
        params: dict[str, Any] = {"model_id": model_id}
        if node_ids:
            params["node_ids"] = node_ids
        data = self.get("/instance/previews", params, f"placement previews for {model_id}")
        if not isinstance(data, dict) or not isinstance(data.get("previews"), list):
            raise ExoProtocolError(f"{self.url}/instance/previews has no previews list: {str(data)[:120]}")
        out = []
        for p in data["previews"]:
            inst = parse_instance(p["instance"], "preview instance") if p.get("instance") else None
            deltas = {k: _bytes(v) or 0 for k, v in (p.get("memory_delta_by_node") or {}).items()}
            out.append(Preview(model_id=p.get("model_id", model_id), sharding=p.get("sharding", "?"),
                               instance_meta=p.get("instance_meta", "?"), min_nodes=p.get("min_nodes"),
                               instance=inst, memory_delta_by_node=deltas, error=p.get("error")))
        return out

    def placement(self, model_id: str, sharding: Sharding = "Pipeline", meta: InstanceMeta = "MlxRing",
                  min_nodes: int = 1) -> Instance:
        params = {"model_id": model_id, "sharding": sharding, "instance_meta": meta, "min_nodes": min_nodes}
        try:
            data = self.get("/instance/placement", params, f"a {sharding}/{meta} placement of {model_id}")
        except ExoHTTPError as exc:
            raise PlacementFailed(f"exo cannot place {model_id} as {sharding}/{meta} on >= {min_nodes} node(s): "
                                  f"{exc.exo_message}", model_id=model_id, reason=exc.exo_message) from None
        return parse_instance(data, "placement")

    def place_instance(self, model_id: str, sharding: Sharding = "Pipeline", meta: InstanceMeta = "MlxRing",
                       min_nodes: int = 1) -> PlaceResult:
        """Send the command only: exo places asynchronously (see wait_ready / place_and_wait)."""
        body = {"model_id": model_id, "sharding": sharding, "instance_meta": meta, "min_nodes": min_nodes}
        resp = self._request("POST", "/place_instance", body=body)
        try:
            data = self._json(resp, f"placing {model_id}")
        except ExoHTTPError as exc:
            raise PlacementFailed(f"exo refused to place {model_id} ({sharding}/{meta}): {exc.exo_message}",
                                  model_id=model_id, reason=exc.exo_message) from None
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
                   deadline_hint: str = "") -> Instance:
        """Poll /state until an instance of model_id (not in `known`) has every runner RunnerReady.

        on_progress(layers_loaded, total_layers) is summed over the instance's loading runners.
        Raises RunnerFailed, PlacementFailed (nothing appeared, or the instance vanished) or InstanceNotReady.
        """
        known = known or set()
        deadline = time.monotonic() + timeout
        seen: Instance | None = None
        last: dict[str, RunnerStatus] = {}
        while True:
            state = self.state()
            fresh = [i for i in state.instances_of(model_id) if i.instance_id not in known]
            if seen is not None and seen.instance_id not in state.instances:
                raise PlacementFailed(f"Instance {seen.instance_id} of {model_id} disappeared from exo's state at "
                                      f"{self.url} while loading (a node left the cluster, or it was deleted).",
                                      model_id=model_id, reason="instance vanished")
            if fresh:
                seen = next((i for i in fresh if seen and i.instance_id == seen.instance_id), fresh[0])
                last = state.runner_statuses(seen)
                for node, st in last.items():
                    if st.failed:
                        rid = next(s.runner_id for s in seen.shards if s.node_id == node)
                        raise RunnerFailed(f"exo's runner on node {node} failed to load {model_id}: "
                                           f"{st.error_message or 'no message'}. Check that node's exo log and that "
                                           "the weights exist on its disk.", node_id=node, runner_id=rid,
                                           error_message=st.error_message or "", instance_id=seen.instance_id)
                if on_progress:
                    loaded = sum((st.layers_loaded or 0) if not st.ready else (st.total_layers or _layers(seen, n))
                                 for n, st in last.items())
                    total = sum(st.total_layers or _layers(seen, n) for n, st in last.items())
                    on_progress(loaded, total)
                if state.is_ready(seen):
                    return seen
            if time.monotonic() >= deadline:
                break
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        if seen is None:
            raise PlacementFailed(f"exo accepted the placement of {model_id} but no instance appeared within "
                                  f"{timeout:g} s at {self.url}: exo's master rejected it (the reason is only in its "
                                  f"log).{deadline_hint}", model_id=model_id, reason="no instance appeared")
        statuses = {n: st.describe() for n, st in last.items()}
        detail = "; ".join(f"node {n}: {s}" for n, s in statuses.items())
        raise InstanceNotReady(f"Instance {seen.instance_id} of {model_id} was not ready after {timeout:g} s "
                               f"({detail}). Check the nodes' exo logs, then delete it and retry or fall back.",
                               instance_id=seen.instance_id, statuses=statuses)

    def place_and_wait(self, model_id: str, sharding: Sharding = "Pipeline", meta: InstanceMeta = "MlxRing",
                       min_nodes: int = 1, *, timeout: float = 600.0, poll: float = 0.5,
                       on_progress: Callable[[int, int], None] | None = None, cleanup: bool = True) -> Instance:
        """place_instance, then wait until every runner is RunnerReady. On failure or timeout the new
        instance is deleted (cleanup=True) so it does not hold memory, and the error says why."""
        known = {i.instance_id for i in self.state().instances_of(model_id)}
        self.place_instance(model_id, sharding, meta, min_nodes)
        try:
            return self.wait_ready(model_id, timeout=timeout, poll=poll, known=known, on_progress=on_progress,
                                   deadline_hint=self._preview_hint(model_id, sharding, meta, min_nodes))
        except (RunnerFailed, InstanceNotReady) as exc:
            if cleanup and exc.instance_id:
                try:
                    self.delete_instance(exc.instance_id)
                except ExoError:
                    pass  # the original error is the one to report
            raise

    def _preview_hint(self, model_id: str, sharding: str, meta: str, min_nodes: int) -> str:
        """exo's own reason, from the previews, for the message of a placement that never appears."""
        try:
            previews = self.previews(model_id)
        except ExoError:
            return ""
        errors = [p.error for p in previews
                  if p.sharding == sharding and p.instance_meta == meta and (p.min_nodes or 1) >= min_nodes and p.error]
        return f" Previews say: {errors[0]}" if errors else ""

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
        resp = self._request("POST", path, body=body, read_timeout=timeout)
        try:
            data = self._json(resp, f"a chat completion with {model_id}")
        except requests.RequestException as exc:  # body broke off after the 200 headers
            raise StreamError(f"exo at {self.url} answered 200 for {model_id} but the body broke off ({_reason(exc)}): "
                              "generation failed on a node. Check /state and the nodes' logs.") from None
        except ExoProtocolError:
            if resp.status_code == 200 and "json" in resp.headers.get("content-type", ""):
                raise StreamError(f"exo at {self.url} answered 200 for {model_id} with a broken body "
                                  f"({resp.text[:80]!r}...): generation failed after the headers were sent. "
                                  "Check /state and the nodes' logs.") from None
            raise
        message = _error_text(data)
        if message is not None:
            raise StreamError(f"exo at {self.url} answered 200 for {model_id} but reported: {message}")
        return _chat_response(data, f"{path} at {self.url}")

    def bench(self, model_id: str, messages: list[dict], **kw: Any) -> ChatResponse:
        return self.chat(model_id, messages, bench=True, **kw)

    def stream_chat(self, model_id: str, messages: list[dict], *, max_tokens: int = 256,
                    temperature: float | None = 0.0, timeout: float = CHAT_READ_TIMEOUT,
                    **options: Any) -> Iterator[StreamEvent]:
        """Streaming chat completion: keepalive/prefill/delta/finish/stats events; raises StreamError."""
        body = self._chat_body(model_id, messages, True, max_tokens=max_tokens, temperature=temperature, **options)
        resp = self._request("POST", "/v1/chat/completions", body=body, read_timeout=timeout, stream=True)
        where = f"{self.url}/v1/chat/completions ({model_id})"
        with resp:
            if resp.status_code >= 400 or "text/event-stream" not in resp.headers.get("content-type", ""):
                self._json(resp, f"a chat stream with {model_id}")  # raises the precise error
                raise ExoProtocolError(f"{where} did not answer with an event stream.")
            resp.encoding = "utf-8"
            try:
                yield from parse_sse(resp.iter_lines(decode_unicode=True), where)
            except requests.RequestException as exc:
                raise StreamError(f"The stream from {where} broke off: {_reason(exc)}. A node may have left the "
                                  "cluster: check /state and place the instance again.") from None


def _chat_response(data: Any, where: str) -> ChatResponse:
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ExoProtocolError(f"{where}: not a chat completion: {str(data)[:120]}")
    choice = data["choices"][0]
    msg = choice.get("message") or {}
    stats = _parse_gen_stats(data["generation_stats"]) if data.get("generation_stats") else None
    return ChatResponse(text=msg.get("content") or "", reasoning=msg.get("reasoning_content") or "",
                        finish_reason=choice.get("finish_reason"), usage=_usage(data.get("usage")),
                        generation_stats=stats, power_usage=data.get("power_usage"), raw=data)


def _layers(instance: Instance, node: str) -> int:
    shard = next((s for s in instance.shards if s.node_id == node), None)
    return (shard.end_layer - shard.start_layer) if shard else 0


def _reason(exc: Exception) -> str:
    text = str(exc)
    for key in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                "Remote end closed", "IncompleteRead", "Connection aborted"):
        if key in text:
            return key
    return text[:160]

