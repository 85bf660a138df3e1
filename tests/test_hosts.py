"""Bring-up across real hosts: two network namespaces, each with its own address, OpenSSH server and HOME (its
own LM Studio folder holding the demo model, its own Hugging Face cache and state), and this machine as the
client outside both (tests/netns_hosts.py). Everything runs as a user would: `arthur-cluster up`, `doc`, `down`.

The nodes share this machine's disk, so the worktree's arthur-cluster serves as each node's program (set per node
in models.toml, as on Macs where it lives in a virtual environment that a non-interactive ssh login does not put
on PATH). Without permission for network namespaces these tests skip with the reason; under CI=true they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from arthur_cluster import demo, miniature
from tests import netns_hosts

MODEL = "arthur-demo/Tiny-NemotronH-MLX-8bit"
PROGRAM = str(Path(sys.executable).parent / "arthur-cluster")
PROFILE_NOISE = "welcome to this node (the login profile writes this to stderr)"


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    """The demo target, built once (random weights, offline tokenizer); every node gets an identical copy."""
    real = json.loads(demo.REAL_CONFIGS["nemotron_h"].read_text())
    quant = miniature.quantization_like(real)
    quant["bits"] = 8
    return miniature.make(tmp_path_factory.mktemp("demo") / "model", "nemotron_h", like=real, quant=quant,
                          seed=int.from_bytes(os.urandom(2), "little"), shards=2)


QUESTIONS = ["Which node holds the most memory?", "zebra quantum 42", "Name three colors."]


@pytest.fixture(scope="module")
def reference(demo_model) -> dict[str, list[int]]:
    """Greedy answers of the demo model in one process, from scratch: what the ranks across hosts must give.
    The questions are checked to give different answers, so a rank mixing them up cannot pass."""
    from arthur_cluster.parallel.worker import encode_request, generate, load

    model, tok, _ = load(demo_model)
    out = {}
    for q in QUESTIONS:
        ids = encode_request(tok, {"messages": [{"role": "user", "content": q}]})
        out[q] = [t for t, _ in generate(model, ids, max_tokens=6)]
    assert len({tuple(v) for v in out.values()}) > 1
    return out


def _place(model: Path, home: Path) -> Path:
    dst = home / ".lmstudio" / "models" / MODEL
    shutil.copytree(model, dst)
    return dst


@pytest.fixture
def hosts(tmp_path, demo_model):
    """Two hosts with their own homes, each holding the demo model in its own LM Studio folder; node-1's login
    profile writes to stderr. Taken down after the test, whatever happened."""
    reason = netns_hosts.unavailable()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the multi-host tests: {reason}")
        pytest.skip(reason)
    h = netns_hosts.Hosts(tmp_path / "hosts")
    try:
        h.up()
        for node in h.nodes:
            _place(demo_model, node.home)
        (h.nodes[1].home / ".bashrc").write_text(f"echo '{PROFILE_NOISE}' >&2\n")
        yield h
    finally:
        h.down()


@pytest.fixture
def client(tmp_path, demo_model, hosts, monkeypatch):
    """This machine: its own LM Studio folder with the model, a models.toml naming both nodes, ssh through the
    hosts' config. Returns a function running the CLI here."""
    home = Path(os.environ["HOME"])
    _place(demo_model, home)
    catalog = tmp_path / "models.toml"
    nodes = "".join(f'[[cluster.nodes]]\nname = "{n.name}"\nips = ["{n.address}"]\nmemory_bytes = 8589934592\n'
                    f'program = "{PROGRAM}"\n' for n in hosts.nodes)
    catalog.write_text(f'target = "{MODEL}"\nfallbacks = []\n[cluster]\nbackend = "ring"\n{nodes}')
    monkeypatch.setenv("ARTHUR_CLUSTER_SSH", hosts.ssh_command())
    monkeypatch.setenv("ARTHUR_CLUSTER_MODELS", str(catalog))

    def cli(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
        return subprocess.run([PROGRAM, *args], capture_output=True, text=True, timeout=timeout)

    cli.catalog = catalog
    yield cli
    cli("down")  # whatever a failed test left up


def _ranks(hosts, i: int) -> list[str]:
    """The command lines of the ranks running in node i's namespace."""
    out = []
    pids = subprocess.run(["ip", "netns", "pids", hosts.nodes[i].ns], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if " rank " in line:
            out.append(line)
    return out


def _listening(hosts, i: int) -> list[str]:
    """Local addresses of the TCP listeners in node i's namespace (`ss -ltn` there)."""
    lines = hosts.in_ns(i, "ss", "-ltnH").stdout.splitlines()
    return [line.split()[3] for line in lines if line.strip()]


def _wait(cond, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.3)
    return cond()


def _check_across(hosts, dep: dict, client, tmp_path, route: str, reference: dict[str, list[int]]) -> None:
    """Rank 0 at its cluster address (reached from here), nothing on 0.0.0.0, each node's rank on the model in
    its own home, its answers those of one process; then a document job through rank 0's endpoint, and `down`
    stops every rank."""
    node0 = hosts.nodes[0].address
    assert dep["endpoint"].startswith(f"http://{node0}:") and dep["resident"]["hosts"] == ["node-0", "node-1"]
    assert requests.get(dep["resident"]["url"] + "/health", timeout=5).json()["status"] == "ok"
    for q, want in reference.items():
        body = requests.post(dep["endpoint"] + "/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": q}], "max_tokens": 6, "temperature": 0.0}).json()
        assert body["arthur"]["ids"] == want, q
    port = dep["resident"]["url"].rsplit(":", 1)[1]
    for i in range(2):
        listening = _listening(hosts, i)
        assert not [a for a in listening if a.startswith(("0.0.0.0:", "*:", "[::]:"))], listening
        assert all(a.startswith((hosts.nodes[i].address + ":", "127.")) for a in listening), listening
    assert f"{node0}:{port}" in _listening(hosts, 0)
    for i, node in enumerate(hosts.nodes):
        ranks = _ranks(hosts, i)
        assert len(ranks) == 1 and f"{PROGRAM} rank " in ranks[0], ranks
        assert f"--model {node.home}/" in ranks[0], ranks

    doc = tmp_path / "log.md"
    doc.write_text("The node studio holds 192 GB of memory. The node air holds 24 GB.\n" * 20)
    job = client("doc", str(doc), "--ask", "Which node holds the most memory?", "--max-tokens", "12", "--json")
    assert job.returncode == 0, job.stdout + job.stderr
    result = json.loads(job.stdout)["result"]
    assert result["route"] == route and 0 < result["tokens"]["generated"] <= 12
    # answered by the ranks' endpoint (cache "none": no model was loaded in this process to prefill)
    assert result["cache_hits"]["none"] == 1 and result["cache_hits"]["prefill"] == 0

    down = client("down", "--json")
    assert down.returncode == 0, down.stdout + down.stderr
    assert _wait(lambda: not _ranks(hosts, 0) and not _ranks(hosts, 1)), (_ranks(hosts, 0), _ranks(hosts, 1))
    with pytest.raises(requests.ConnectionError):
        requests.get(dep["resident"]["url"] + "/health", timeout=5)


def test_pipeline_across_two_hosts_each_from_its_own_home_then_doc_and_down(hosts, client, tmp_path, reference):
    up = client("up", MODEL, "--engine", "mlx", "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    dep = json.loads(up.stdout)
    assert (dep["route"]["sharding"], dep["route"]["backend"], dep["route"]["nodes"]) == ("pipeline", "ring", 2)
    # the blocked tensor/JACCL route is listed once
    assert sum(r["route"] is not None and r["route"]["backend"] == "jaccl" for r in dep["rejections"]) == 1
    doctor = client("doctor", "--json")
    assert "stale-record" not in doctor.stdout, doctor.stdout  # the ranks across hosts answer where recorded
    _check_across(hosts, dep, client, tmp_path, "mlx pipeline/ring on 2 nodes", reference)


def test_tensor_across_two_hosts_then_doc_and_down(hosts, client, tmp_path, reference):
    """Tensor over the ring is outside `up`'s default order (pipeline over ring before it): `--route` asks for it,
    and nothing else is tried."""
    up = client("up", MODEL, "--engine", "mlx", "--route", "mlx/tensor/ring", "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    dep = json.loads(up.stdout)
    assert dep["route"] == {"engine": "mlx", "sharding": "tensor", "backend": "ring", "nodes": 2}
    assert dep["rejections"] == [] and dep["fallback_reason"] is None  # JACCL and the pipeline were not tried
    assert dep["smoke"]["generation_tokens"] > 0
    _check_across(hosts, dep, client, tmp_path, "mlx tensor/ring on 2 nodes", reference)


def _set_program(client, node: str, program: str) -> None:
    text = client.catalog.read_text()
    head, sep, rest = text.partition(f'name = "{node}"')
    client.catalog.write_text(head + sep + rest.replace(f'program = "{PROGRAM}"', f'program = "{program}"', 1))


def _ssh_log(hosts, tmp_path, monkeypatch) -> Path:
    """Wrap the hosts' ssh so that every call is recorded (host and command)."""
    log = tmp_path / "ssh-calls.log"
    wrapper = tmp_path / "ssh-logged"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" | tr "\\n" " " >> {log}\necho >> {log}\n'
                       f'exec {hosts.ssh_command()} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("ARTHUR_CLUSTER_SSH", str(wrapper))
    log.touch()
    return log


def test_a_node_without_the_model_is_named_with_its_own_error_then_the_fallback(hosts, client, tmp_path,
                                                                                monkeypatch):
    shutil.rmtree(hosts.nodes[1].home / ".lmstudio" / "models")
    calls = _ssh_log(hosts, tmp_path, monkeypatch)
    up = client("up", MODEL, "--engine", "mlx", "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    dep = json.loads(up.stdout)
    assert dep["route"]["sharding"] == "single" and dep["resident"] is None  # this machine alone
    assert dep["nodes"] == [socket.gethostname()]  # not node-0, where nothing runs
    reason = next(r["reason"] for r in dep["rejections"] if r["stage"] == "bringup")
    assert reason.startswith(f"node node-1: `{PROGRAM} link {MODEL} --json` failed: ")
    assert f"no LM Studio model matches '{MODEL}'" in reason  # the command's own error ...
    assert PROFILE_NOISE not in reason  # ... not what node-1's login profile printed before it
    assert f"Put {MODEL} in node node-1's LM Studio folder" in reason
    assert "node node-1" in dep["fallback_reason"]
    # every pick after a failure judges the blocked tensor/JACCL route again: it is still listed once
    assert sum(r["route"] is not None and r["route"]["backend"] == "jaccl" for r in dep["rejections"]) == 1
    # node-0 was linked once, for the 2-node route; the single-node route asked no node anything
    links = [line for line in calls.read_text().splitlines() if " link " in line]
    assert len([line for line in links if "node-0" in line.split()]) == 1
    assert len([line for line in links if "node-1" in line.split()]) == 1 and len(links) == 2


def test_a_node_without_the_program_is_named_with_the_fix_then_the_fallback(hosts, client):
    missing = str(hosts.nodes[1].home / "venv" / "bin" / "arthur-cluster")
    _set_program(client, "node-1", missing)
    up = client("up", MODEL, "--engine", "mlx", "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    dep = json.loads(up.stdout)
    assert dep["route"]["sharding"] == "single"
    reason = next(r["reason"] for r in dep["rejections"] if r["stage"] == "bringup")
    assert reason.startswith(f"node node-1: `{missing} --version` failed: {missing} is not there")
    assert 'set program = "/absolute/path/to/arthur-cluster" for node node-1 in models.toml' in reason
    assert PROFILE_NOISE not in reason


def test_an_unreachable_node_is_named_then_the_fallback(hosts, client):
    text = client.catalog.read_text().replace(f'"{hosts.nodes[1].address}"', f'"{hosts.subnet}.99"')
    client.catalog.write_text(text.replace('name = "node-1"', 'name = "node-9"'))
    up = client("up", MODEL, "--engine", "mlx", "--json")
    assert up.returncode == 0, up.stdout + up.stderr
    dep = json.loads(up.stdout)
    assert dep["route"]["sharding"] == "single"
    reason = next(r["reason"] for r in dep["rejections"] if r["stage"] == "bringup")
    assert reason.startswith(f"node node-9: `{PROGRAM} --version` could not run: ")
    assert "ssh: Could not resolve hostname node-9" in reason and "`ssh node-9 true` works" in reason


# --- two ranks on this machine: no ssh at all -------------------------------------------------------------------


def test_two_ranks_on_this_machine_go_without_ssh_then_doc_and_down(demo_model, tmp_path, monkeypatch):
    _place(demo_model, Path(os.environ["HOME"]))
    calls = tmp_path / "ssh-called"
    refuse = tmp_path / "no-ssh"  # stands in for ssh: there is no ssh server here; any use is recorded
    refuse.write_text(f'#!/bin/sh\necho "$*" >> {calls}\necho "ssh: connect to host $1 port 22: Connection '
                      'refused" >&2\nexit 255\n')
    refuse.chmod(0o755)
    catalog = tmp_path / "models.toml"
    catalog.write_text(f'target = "{MODEL}"\nfallbacks = []\n[cluster]\nbackend = "ring"\n'
                       '[[cluster.nodes]]\nname = "here-a"\nssh = "localhost"\nmemory_bytes = 8589934592\n'
                       '[[cluster.nodes]]\nname = "here-b"\nssh = "127.0.0.1"\nmemory_bytes = 8589934592\n')
    env = {**os.environ, "ARTHUR_CLUSTER_SSH": str(refuse), "ARTHUR_CLUSTER_MODELS": str(catalog)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PROGRAM, *args], capture_output=True, text=True, timeout=420, env=env)

    try:
        up = cli("up", MODEL, "--engine", "mlx", "--json")
        assert up.returncode == 0, up.stdout + up.stderr
        dep = json.loads(up.stdout)
        assert (dep["route"]["sharding"], dep["route"]["nodes"]) == ("pipeline", 2) and dep["fallback_reason"] is None
        assert dep["resident"]["n"] == 2 and dep["resident"]["hosts"] == [] and len(dep["resident"]["pids"]) == 2
        assert dep["endpoint"].startswith("http://127.0.0.1:")
        doc = tmp_path / "log.md"
        doc.write_text("The node studio holds 192 GB of memory.\n" * 10)
        job = cli("doc", str(doc), "--ask", "Which node holds the most memory?", "--max-tokens", "8", "--json")
        assert job.returncode == 0, job.stdout + job.stderr
        result = json.loads(job.stdout)["result"]
        assert result["route"] == "mlx pipeline/ring on 2 nodes" and result["tokens"]["generated"] > 0
        down = cli("down", "--json")
        assert down.returncode == 0
        assert any("stopped the resident ranks" in a for a in json.loads(down.stdout)["actions"])
        assert not calls.exists()  # nothing went through ssh
    finally:
        cli("down")


@pytest.mark.parametrize("bind", ["", "localhost:8080", "every interface"])
def test_up_refuses_a_bind_that_is_not_an_address(bind):
    done = subprocess.run([PROGRAM, "up", "--engine", "mlx", "--bind", bind], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"--bind {bind!r} is not an IP address" in done.stderr and done.stdout == ""


def test_a_loopback_bind_is_refused_when_rank_0_is_another_host():
    from arthur_cluster.parallel import resident

    assert resident.check_bind("10.0.0.2", across_hosts=True) == "10.0.0.2"
    assert resident.check_bind("127.0.0.1") == "127.0.0.1" and resident.check_bind(None) is None
    with pytest.raises(resident.BindError, match="whose loopback no other machine reaches"):
        resident.check_bind("127.0.0.1", across_hosts=True)
