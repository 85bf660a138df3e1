"""A stand-in for exo, only for faults exo's real code cannot produce: an answer that trickles in one byte
every few seconds, malformed or deeply nested JSON, answers of the wrong shape.

Everything else is tested against exo's own code (tests/fixtures_exo.py). The stand-in's well-formed answers
(WELL_FORMED, and WELL_FORMED_BY_KIT for what each exo version's State holds) are validated against that
version's pydantic types by tests/test_exo_faults.py, so the faults differ from real exo only where each test
says.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NODE = "exonode-0"
LLAMA_ID = "mlx-community/Llama-3.2-1B-Instruct-4bit"
GIB = 1 << 30


def _memory(total: int, free: int) -> dict:
    return {"ramTotal": {"inBytes": total}, "ramAvailable": {"inBytes": free}, "swapTotal": {"inBytes": 0},
            "swapAvailable": {"inBytes": 0}}


# path -> (exo's type that validates it, the answer)
WELL_FORMED: dict[str, tuple[str, object]] = {
    "/node_id": ("exo.shared.types.common:NodeId", NODE),
    "/state": ("exo.shared.types.state:State", {
        "topology": {"nodes": [NODE], "connections": {}},
        "nodeMemory": {NODE: _memory(64 * GIB, 48 * GIB)},
        "nodeIdentities": {NODE: {"modelId": "Mac16,11", "chipId": "Apple M4 Pro", "friendlyName": "mac-0",
                                  "osVersion": "26.2", "osBuildVersion": "Unknown"}},
        "nodeRdmaCtl": {NODE: {"enabled": False}},
        "nodeBackends": {NODE: ["MlxMetal"]},
    }),
    "/v1/models": ("exo.api.types.api:ModelList", {"object": "list", "data": [
        {"id": LLAMA_ID, "object": "model", "created": 0, "owned_by": "exo", "hugging_face_id": LLAMA_ID,
         "name": "Llama-3.2-1B-Instruct-4bit", "description": "", "context_length": 131072, "tags": [],
         "storage_size_megabytes": 696, "supports_tensor": True, "tasks": ["TextGeneration"], "is_custom": False,
         "family": "llama", "quantization": "4bit", "base_model": "Llama 3.2 1B", "capabilities": ["text"],
         "reasoning_dialect": "none"}]}),
    "/instance/previews": ("exo.api.types.api:PlacementPreviewResponse", {"previews": []}),
}
# exo v1.0.71's State has no nodeBackends (and rejects unknown keys): the same answers without it.
_STATE_V1 = {k: v for k, v in WELL_FORMED["/state"][1].items() if k != "nodeBackends"}
WELL_FORMED_BY_KIT: dict[str, dict[str, tuple[str, object]]] = {
    "main": WELL_FORMED,
    "v1.0.71": {**WELL_FORMED, "/state": ("exo.shared.types.state:State", _STATE_V1)},
}


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# fault name -> path -> the body it serves instead of the well-formed one (everything else stays well-formed)
MALFORMED: dict[str, dict[str, str]] = {
    "node-memory-string": {"/state": json.dumps({**WELL_FORMED["/state"][1], "nodeMemory": "lots"})},
    "node-memory-entry-string": {"/state": json.dumps({**WELL_FORMED["/state"][1], "nodeMemory": {NODE: "lots"}})},
    "node-backends-number": {"/state": json.dumps({**WELL_FORMED["/state"][1], "nodeBackends": {NODE: 5}})},
    "models-wrong-items": {"/v1/models": json.dumps({"object": "list", "data": [5, "x"]})},
    "models-wrong-field": {"/v1/models": json.dumps({"object": "list", "data": [{"id": ["a"], "tasks": 3}]})},
    "previews-five": {"/instance/previews": json.dumps({"previews": [5]})},
    "deep-state": {"/state": _deep(100_000)},
    "deep-previews": {"/instance/previews": '{"previews": ' + _deep(50_000) + "}"},
}


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 and a free port, for the stand-ins; stop() closes it."""

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FaultServer(LoopbackServer):
    """start(fault=None, trickle=0.0): well-formed answers, except those the fault replaces; with trickle > 0
    every answer is sent one byte at a time, `trickle` seconds apart."""

    def __init__(self, fault: str | None = None, trickle: float = 0.0, answers: dict | None = None):
        self.fault = fault
        self.trickle = trickle
        self.answers = {**WELL_FORMED, **(answers or {})}  # a test's own well-formed answers (validated too)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                body = MALFORMED.get(server.fault or "", {}).get(path)
                if body is None and path in server.answers:
                    body = json.dumps(server.answers[path][1])
                if body is None:
                    self.send_response(404)
                    body = json.dumps({"detail": "Not Found"})
                else:
                    self.send_response(200)
                data = body.encode()
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                try:
                    if server.trickle:
                        for i in range(len(data)):
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                            time.sleep(server.trickle)
                    else:
                        self.wfile.write(data)
                except OSError:
                    pass  # the client gave up

        self._serve(Handler)
