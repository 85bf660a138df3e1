"""Bounded planning: linear chunking, a named document-size cap, regular files only, caps on node counts,
ranks, layers and names, each refused in one line that names the cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from arthur_cluster import documents, memory, probe
from tests.conftest import NEMOTRON_CONFIG, real_config


def cli(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arthur_cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode not in (0, None) and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error:"), err
    for n in needles:
        assert n in err, err


# --- documents ---------------------------------------------------------------------------------------------


class CountingTokens:
    """A real counter (about four characters a token, as English BPE) that records how much text it saw."""

    def __init__(self):
        self.chars = 0

    def __call__(self, text: str) -> int:
        self.chars += len(text)
        return -(-len(text) // 4)


@pytest.mark.parametrize("text", ["x" * 400_000, ("word " * 80_000), "\n\n".join(["para " * 40] * 2_000)])
def test_chunking_counts_each_character_a_bounded_number_of_times(text):
    count = CountingTokens()
    chunks = documents.chunk(text, count, budget=500, overlap=50)
    assert all(c.tokens <= 500 for c in chunks) and chunks[-1].end >= len(text.rstrip())
    # Linear: the old binary search over every character cut counted this text hundreds of times over.
    assert count.chars <= 4 * len(text), count.chars / len(text)


def test_a_document_past_the_cap_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(documents.MAX_DOCUMENT_BYTES + 1)  # sparse: nothing is written or read
    with pytest.raises(documents.DocumentError, match="cap of 16,777,216 bytes"):
        documents.load([str(big)])


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "doc.txt"
    os.mkfifo(fifo)
    proc = cli("doc", str(fifo), "--ask", "Q?", "--model", "x", "--plan", timeout=30)
    one_line_error(proc, "not a regular file", str(fifo))
    doc = tmp_path / "real.txt"
    doc.write_text("text")
    proc = cli("doc", str(doc), "--prompt-file", str(fifo), "--model", "x", "--plan", timeout=30)
    one_line_error(proc, "prompt file", "not a regular file", str(fifo))


def test_binary_stdin_is_refused_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "arthur_cluster.cli", "doc", "-", "--ask", "Q?", "--model", "x",
                           "--plan"], input=b"\xff\xfe\x00binary\x00" * 100, capture_output=True, timeout=30)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert proc.stderr.decode().startswith("error: stdin: looks binary"), proc.stderr


def test_doc_plan_on_megabytes_without_spaces_finishes(tiny_models, tmp_path):
    doc = tmp_path / "nospace.txt"
    doc.write_text("x" * 3_000_000)
    proc = cli("doc", str(doc), "--ask", "Q?", "--model", str(tiny_models["nemotron_h-8bit"]), "--plan", "--json",
               timeout=120)
    plan = json.loads(proc.stdout)
    assert proc.returncode == 0 and plan["mode"] == "map-reduce" and len(plan["chunks"]) > 100
    assert plan["chunks"][-1]["end"] == 3_000_000


# --- counts and names --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (["--route", "mlx/pipeline/ring/10000000"], "cap of 1,024 nodes"),
    (["--nodes", "1000000"], "cap on node counts"),
    (["--ranks", "0"], "2 to 8 ranks"),
    (["--ranks", "1"], "fewer than 2 splits nothing"),
])
def test_probe_refuses_meaningless_or_huge_counts(tiny_models, args, needle):
    proc = cli("probe", str(tiny_models["llama-4bit"]), "--static-only", *args, timeout=60)
    one_line_error(proc, needle)


@pytest.mark.parametrize("command", [["probe"], ["doc", "-", "--ask", "Q?", "--plan", "--model"],
                                     ["link"], ["unlink"], ["pick", "--engine", "mlx"]])
@pytest.mark.parametrize("name", ["", "n" * 10_000])
def test_empty_and_huge_model_names_are_refused(command, name, tmp_path):
    proc = cli(*command, name, input="text", timeout=60, cwd=tmp_path)
    one_line_error(proc, "empty" if not name else "cap of 1,024")


def test_ten_trillion_layers_is_a_named_cap_not_a_memory_error():
    cfg = real_config(NEMOTRON_CONFIG)
    cfg.pop("hybrid_override_pattern", None)
    cfg["num_hidden_layers"] = 10**13
    with pytest.raises(memory.PlanError, match="cap of 10,000"):
        memory.plan(cfg, context=4096)
    with pytest.raises(memory.PlanError, match="cap of 1,024 nodes"):
        memory.plan(real_config(NEMOTRON_CONFIG), context=4096, nodes=1_000_000, split="pipeline")


def test_route_spec_caps_the_node_count():
    with pytest.raises(probe.ProbeError, match="cap of 1,024"):
        probe.RouteSpec.parse("mlx/pipeline/ring/" + "9" * 40)
    assert probe.RouteSpec.parse("mlx/pipeline/ring/1024").nodes == 1024
