"""Shared by the OpenAI endpoint tests: resident deployments on a miniature model (1 rank, 2 tensor ranks over
ring on loopback), and mlx_lm.server on the same folder as the reference."""

from __future__ import annotations

import subprocess
import sys
import time

import openai
import pytest
import requests

from arthur_cluster import bringup, paths
from arthur_cluster.fallback import Route
from arthur_cluster.hostfile import free_ports
from arthur_cluster.parallel import resident

MODEL_ID = "tiny-nemotron"
QUESTIONS = ["Hello there", "What is two plus two?", "Summarize the document.", "Name the parts of the cluster."]


def start(path, ranks: int, home) -> resident.Resident:
    with pytest.MonkeyPatch.context() as mp:  # module scope: its own state folder
        mp.setenv(paths.ENV_STATE_DIR, str(home))
        return bringup.start_resident(path, MODEL_ID, Route(engine="mlx", sharding="tensor", backend="ring",
                                                            nodes=ranks), prefill_step=32, timeout=180)


def client(url: str, timeout: float = 120.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=timeout)


class MlxLmServer:
    """mlx_lm.server on a free port, as a user would start it on the same folder (the reference)."""

    def __init__(self, path, log):
        self.port = free_ports(1)[0]
        self.model = str(path)
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlx_lm.server", "--model", self.model, "--host",
                                      "127.0.0.1", "--port", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("mlx_lm.server did not start")
            time.sleep(0.3)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def ask(c: openai.OpenAI, q: str, *, thinking: bool | None = None, model: str = MODEL_ID, **kw):
    extra = {} if thinking is None else {"extra_body": {"chat_template_kwargs": {"enable_thinking": thinking}}}
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], **extra, **kw)


def said(message) -> tuple[str, str]:
    """(content, reasoning) of a whole answer's message; None counts as empty."""
    return message.content or "", getattr(message, "reasoning", None) or ""
