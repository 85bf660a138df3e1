"""Only the ranks of a deployment are ever signalled, and they never run out of sight.

Hostile records ([1], [0], [-5], another user's process, a PID reused by an unrelated process) are run through
the real `down` command inside a PID namespace of their own (`unshare`), so that a regression signals only
processes of that namespace. The control port is attacked with forged and malformed hellos, in-process and
during a real two-rank load. `up --serve` is SIGKILLed at seeded points; `doctor` and `down` are checked
against the processes that really run (/proc).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from arthur_cluster import bringup, paths
from arthur_cluster.catalog import Catalog
from arthur_cluster.fallback import Route
from arthur_cluster.parallel import control, ownership, resident
from tests.fixtures_exo import LLAMA_ID

SECRET = "a" * 64
ROOT = Path(__file__).resolve().parents[1]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_or_fail(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"{reason} (CI must be able to run this)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the control port: who may join -----------------------------------------------------------------------------


def _send(port: int, data: bytes, wait_close: bool = True) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.recv(4096)  # the nonce
    s.sendall(data)
    if wait_close:
        s.settimeout(5)
        try:
            assert s.recv(4096) == b""  # refused: closed without a welcome
        except ConnectionResetError:
            pass  # closed with our bytes unread: refused all the same
        finally:
            s.close()
    return s


def _forged_hello(rank: int, secret: str) -> bytes:
    return (json.dumps({"rank": rank, "pid": 4242, "host": "evil", "nonce": "0" * 32,
                        "mac": control._mac(secret.encode(), "hello", "f" * 32, "0" * 32, rank, 4242, "evil")})
            + "\n").encode()


def test_forged_and_malformed_hellos_are_dropped_and_only_the_real_ranks_join():
    lost: list[str] = []
    port = _free_port()
    c = control.Control("127.0.0.1", port, 2, lost.append, secret=SECRET)
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)  # holds a handshake slot, says nothing
        _send(port, b'{"rank": 1}\n')  # the hello that used to fail the start
        _send(port, b"[1, 2]\n")  # a JSON list used to crash the accept thread
        _send(port, b"\xff\xfe not json\n")
        _send(port, b'{"rank": true, "pid": 1, "host": "h", "nonce": "' + b"0" * 32 + b'", "mac": "' + b"0" * 64
              + b'"}\n')
        _send(port, b'{"rank": 7}' + b" " * 5000)  # over the line cap, no newline
        _send(port, _forged_hello(1, "b" * 64))  # right shape, wrong secret
        with pytest.raises(control.ControlError, match="did not admit"):
            control.join(f"127.0.0.1:{port}", 1, "b" * 64)  # a forged rank: refused
        assert c.peers == {} and not c.ready.is_set() and lost == []
        first = control.join(f"127.0.0.1:{port}", 1, SECRET)
        with pytest.raises(control.ControlError):
            control.join(f"127.0.0.1:{port}", 1, SECRET)  # a second rank 1, even with the secret
        second = control.join(f"127.0.0.1:{port}", 2, SECRET)
        assert c.ready.wait(5) and sorted(c.peers) == [1, 2] and lost == []
        assert c.refusals >= 8 and any("without this deployment's secret" in r for r in c.refused)
        with pytest.raises(control.ControlError):
            control.join(f"127.0.0.1:{port}", 2, SECRET)  # everyone is in: nobody else joins
        silent.close()
        time.sleep(0.2)
        assert lost == []  # refused connections closing are nobody's loss
        second.close()
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lost) == 1 and lost[0].startswith(f"rank 2 (pid {os.getpid()}")
        first.close()
    finally:
        c.close()


def test_a_flood_of_silent_connections_only_delays_a_real_rank():
    port = _free_port()
    c = control.Control("127.0.0.1", port, 1, lambda r: None, secret=SECRET)
    try:
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(control.MAX_PENDING)]
        threading.Timer(1.0, lambda: [s.close() for s in silent]).start()
        conn = control.join(f"127.0.0.1:{port}", 1, SECRET)  # knocks again while every slot is taken
        assert c.ready.wait(5) and list(c.peers) == [1] and any("handshakes at once" in r for r in c.refused)
        conn.close()
    finally:
        c.close()


def test_a_rank_does_not_follow_a_stand_in_for_rank_0():
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def stand_in() -> None:
        conn, _ = srv.accept()
        conn.sendall(b'{"nonce": "' + b"1" * 32 + b'"}\n')
        conn.recv(4096)
        conn.sendall(b'{"mac": "' + b"2" * 64 + b'"}\n')
        time.sleep(1)
        conn.close()

    threading.Thread(target=stand_in, daemon=True).start()
    try:
        with pytest.raises(control.ControlError, match="does not carry this deployment's secret"):
            control.join(f"127.0.0.1:{port}", 1, SECRET)
    finally:
        srv.close()


def test_ranks_need_the_secret():
    with pytest.raises(control.ControlError, match=control.ENV_SECRET):
        control.Control("127.0.0.1", 0, 1, lambda r: None, secret="")


# --- private state ----------------------------------------------------------------------------------------------


def _record(pids: list, deployment: str = "", starts: list | None = None, url: str | None = None):
    res = resident.Resident(url=url or f"http://127.0.0.1:{_free_port()}", model="m", model_path="/x",
                            mode="single", backend="ring", n=1, pids=pids, token="t0ken" * 6,
                            deployment=deployment, starts=starts or [])
    return bringup.Deployment(model="m", served_id="m", engine="mlx",
                              route=Route(engine="mlx", sharding="single"), endpoint=res.endpoint, resident=res,
                              smoke=bringup.Smoke(question="q", answer="a"))


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def open_state(monkeypatch):
    """A state folder whose parents anybody may pass (pytest's own tmp folders are 0700): only the modes of
    the folder and its files keep another user out."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="arthur-state-", dir="/tmp"))
    os.chmod(base, 0o755)
    monkeypatch.setenv(paths.ENV_STATE_DIR, str(base / "state"))
    yield base / "state"
    shutil.rmtree(base, ignore_errors=True)


def test_records_are_private_and_another_user_cannot_read_the_token(open_state):
    old = os.umask(0)  # the widest umask: the modes must not depend on it
    try:
        state = paths.state_dir()
        state.mkdir(parents=True, mode=0o755)
        os.chmod(state, 0o755)  # as an older version left it
        bringup.write_record(_record([2 ** 22 + 7], ownership.new_id()))
        resident.write_state(_record([], ownership.new_id()).resident)
    finally:
        os.umask(old)
    assert _mode(state) == 0o700
    assert _mode(paths.deployment_file()) == 0o600 and _mode(resident.state_file()) == 0o600
    assert not [p for p in state.iterdir() if p.name.startswith(".")]  # no temporary file left
    if os.getuid() != 0:
        _skip_or_fail("switching to another uid needs root")
    for target in (paths.deployment_file(), resident.state_file()):
        pid = os.fork()
        if pid == 0:  # the child becomes nobody and tries to read the token
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    target.read_text()
                    code = 0
                except PermissionError:
                    code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 1, f"another user could read {target}"
    # and the same file at its old mode: the check itself can fail
    os.chmod(state, 0o755)
    os.chmod(paths.deployment_file(), 0o644)
    pid = os.fork()
    if pid == 0:
        os.setgid(65534)
        os.setuid(65534)
        os._exit(0 if "t0ken" in paths.deployment_file().read_text() else 2)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


# --- hostile records: `down` signals nothing that is not a rank of the deployment --------------------------------

_DRIVER = r"""
import json, os, subprocess, sys, time
from arthur_cluster import bringup
from arthur_cluster.fallback import Route
from arthur_cluster.parallel import ownership, resident

case = sys.argv[1]
dep = ownership.new_id()
marked = ["sh", "-c", "sleep 120; :", "x", "--deployment", dep]  # carries the deployment's id, as a rank does
canaries = {"plain": subprocess.Popen(["sleep", "120"]), "marked": subprocess.Popen(marked),
            "other": subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *marked])}
time.sleep(0.5)
pid = {k: c.pid for k, c in canaries.items()}
pids, starts = {
    "one": ([1], []), "zero": ([0], []), "negative": ([-5], []),
    "other-user": ([pid["other"]], [ownership.start_of(pid["other"])]),
    "reused": ([pid["plain"]], [ownership.start_of(pid["plain"])]),
    "reused-other-start": ([pid["marked"]], ["12345"]),
    "no-id": ([pid["marked"]], []),
}[case]
res = resident.Resident(url="http://127.0.0.1:9", model="m", model_path="/x", mode="single", backend="ring", n=1,
                        pids=pids, starts=starts, token="t" * 32, deployment="" if case == "no-id" else dep)
bringup.write_record(bringup.Deployment(model="m", served_id="m", engine="mlx", route=Route(engine="mlx",
                     sharding="single"), endpoint=res.endpoint, resident=res,
                     smoke=bringup.Smoke(question="q", answer="a")))
resident.write_state(res)
p = subprocess.run([sys.executable, "-m", "arthur_cluster.cli", "down", "--json"], capture_output=True, text=True,
                   timeout=120)
print(json.dumps({"code": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "pids": pids,
                  "alive": {k: c.poll() is None for k, c in canaries.items()}}))
"""


@pytest.mark.parametrize("case", ["one", "zero", "negative", "other-user", "reused", "reused-other-start", "no-id"])
def test_down_signals_nothing_a_hostile_record_names(case, tmp_path):
    if os.getuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        _skip_or_fail("needs root, unshare and setpriv: the hostile pids are tried in a PID namespace of their own")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        _skip_or_fail(f"cannot make a PID namespace here: {probe.stderr.decode(errors='replace').strip()}")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _DRIVER, case],
                       capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip(), p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["code"] == 0 and "Traceback" not in out["stderr"], out
    assert all(out["alive"].values()), f"down killed a process that is not a rank: {out}"
    actions = json.loads(out["stdout"])["actions"]
    skipped = [a for a in actions if a.startswith("skipped pid")]
    assert len(skipped) == 1 and f"skipped pid {out['pids'][0]}:" in skipped[0], actions
    why = {"one": "not a process id", "zero": "not a process id", "negative": "not a process id",
           "other-user": "another user", "reused": "not a rank of this deployment",
           "reused-other-start": "PID was reused", "no-id": "no deployment id"}[case]
    assert why in skipped[0] and "not signalled" in skipped[0], skipped
    assert not any(a.startswith(("sent SIG", "stopped the resident")) for a in actions), actions


@pytest.mark.parametrize("platform", ["linux", "darwin"])
def test_a_process_is_proved_by_uid_start_time_and_the_deployment_id(platform, monkeypatch):
    """The proof on Linux (/proc) and as macOS makes it (`ps`, which procps answers the same way here)."""
    if not shutil.which("ps"):
        _skip_or_fail("no ps on this machine")
    monkeypatch.setattr(ownership.sys, "platform", platform)
    dep = ownership.new_id()
    marked = subprocess.Popen(["sh", "-c", "sleep 60; :", "x", "--deployment", dep])
    plain = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.3)
        start = ownership.start_of(marked.pid)
        assert start and ownership.check(marked.pid, dep, start) is None
        assert ownership.check(marked.pid, dep, "") is None  # an older record without start times
        assert "reused" in ownership.check(marked.pid, dep, start + "0")
        assert "lacks the deployment's id" in ownership.check(plain.pid, dep, ownership.start_of(plain.pid))
        assert "lacks the deployment's id" in ownership.check(marked.pid, ownership.new_id())
        assert "no deployment id" in ownership.check(marked.pid, "")
        marked.kill()
        marked.wait()
        assert ownership.gone(ownership.check(marked.pid, dep, start))
    finally:
        for p in (marked, plain):
            p.kill()
            p.wait()


# --- a real load, attacked at its control port --------------------------------------------------------------------


def _attack(port: int, stop: threading.Event, count: list[int]) -> None:
    """Forged and malformed hellos, over and over, until the start is over."""
    payloads = [b'{"rank": 1}\n', b"[1]\n", b"{}\n", _forged_hello(1, "c" * 64), b"x" * 3000, b"\n"]
    while not stop.is_set():
        for data in payloads:
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(data)
                s.close()
                count[0] += 1
            except OSError:
                time.sleep(0.05)


def _rank_processes(marker: str) -> dict[int, str]:
    """Every rank process on this machine whose command line names `marker` (the test's own folder): the truth
    `doctor` and `down` are checked against."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        p = ownership.identity(int(d))
        if p and "arthur_cluster.parallel.server" in p.command and marker in p.command:
            out[int(d)] = p.command
    return out


def test_forged_hellos_during_a_real_load_do_not_fail_the_start(tiny_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama-4bit"], model)
    started: dict = {}

    def start() -> None:
        try:
            started["res"] = bringup.start_resident(model, "tiny", Route(engine="mlx", sharding="pipeline",
                                                                         backend="ring", nodes=2), timeout=180)
        except Exception as e:  # noqa: BLE001 - reported below
            started["error"] = e

    t = threading.Thread(target=start)
    t.start()
    stop, count = threading.Event(), [0]
    try:
        deadline = time.monotonic() + 60
        while not resident.state_file().exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        port = int(resident.read_state().control.rsplit(":", 1)[1])
        threading.Thread(target=_attack, args=(port, stop, count), daemon=True).start()
        t.join(240)
    finally:
        stop.set()
    res = started.get("res")
    assert res is not None, started.get("error")
    try:
        assert count[0] > 0
        r = requests.post(res.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                                  "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert requests.get(res.url + "/health", timeout=5).json()["status"] == "ok"
        log = (Path(res.logdir) / "rank0.log").read_text()
        assert "control port: refused a connection" in log
        # Private: the state folder, the record, the lock files and logs.
        state = paths.state_dir()
        assert _mode(state) == 0o700 and _mode(resident.state_file()) == 0o600
        locks = list(ownership.locks_dir().glob("*.lock"))
        assert len(locks) == 2 and all(_mode(p) == 0o600 for p in locks)
        assert all(_mode(p) == 0o600 for p in Path(res.logdir).glob("*.log"))
        assert sorted(_rank_processes(str(model))) == sorted(res.pids)
    finally:
        resident.stop(res)
    assert _rank_processes(str(model)) == {} and list(ownership.locks_dir().glob("*.lock")) == []


# --- never out of sight -------------------------------------------------------------------------------------------


def _catalog(tmp_path: Path) -> str:
    path = tmp_path / "models.toml"
    path.write_text(f'target = "{LLAMA_ID}"\nfallbacks = []\n')
    return str(path)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arthur_cluster.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _doctor_text() -> str:
    return " ".join(f.message for f in bringup.doctor().findings)


def _listed(pids, text: str) -> bool:
    return all(re.search(rf"\b{p}\b", text) for p in pids)


KILLS = 20
SEED = int(os.environ.get("ARTHUR_KILL_SEED", "19"))


@pytest.fixture
def no_ranks_left(library):
    """The test's model folder (every rank of the test names it); whatever the test leaves running is killed."""
    marker = str(library / LLAMA_ID)
    yield marker
    for pid in _rank_processes(marker):
        os.kill(pid, signal.SIGKILL)


def test_up_serve_killed_at_seeded_points_is_always_listed_by_doctor_and_stopped_by_down(no_ranks_left, tmp_path):
    cat = _catalog(tmp_path)
    marker = no_ranks_left
    t0 = time.monotonic()
    full = _cli("up", "--engine", "mlx", "--serve", "--catalog", cat, "--json", timeout=300)
    span = time.monotonic() - t0  # how long one whole `up --serve` takes on this machine now
    assert full.returncode == 0, full.stderr[-2000:]
    assert _listed(json.loads(full.stdout)["resident"]["pids"], _doctor_text())
    assert _cli("down", "--json").returncode == 0 and _rank_processes(marker) == {}
    rng = random.Random(SEED)
    points = sorted(rng.uniform(0.0, span * 1.1) for _ in range(KILLS))
    seen = []
    for at in points:
        p = subprocess.Popen([sys.executable, "-m", "arthur_cluster.cli", "up", "--engine", "mlx", "--serve",
                              "--catalog", cat, "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        p.send_signal(signal.SIGKILL)
        p.wait()
        ranks = _rank_processes(marker)
        by_cli = len(seen) % 4 == 0  # every fourth point through the commands a user types, the rest in-process
        if by_cli:
            doc = _cli("doctor", "--json")
            text = " ".join(f["message"] for f in json.loads(doc.stdout)["findings"])
        else:
            text = _doctor_text()
        assert _listed(ranks, text), f"killed at {at:.2f} s: doctor does not list {sorted(ranks)}: {text}"
        if by_cli:
            r = _cli("down", "--json")
            assert r.returncode == 0, r.stderr[-2000:]
            actions = json.loads(r.stdout)["actions"]
        else:
            actions = bringup.down().actions
        left = _rank_processes(marker)
        assert left == {}, f"killed at {at:.2f} s: after down {sorted(left)} still run ({actions})"
        assert not [a for a in actions if a.startswith("skipped")], actions
        assert ownership.live() == [] and not resident.state_file().exists()
        seen.append(len(ranks))
    assert any(seen), f"no kill point left a rank running ({points})"  # the schedule reaches the ranks


def test_a_corrupt_record_is_reported_down_still_stops_the_ranks_and_up_never_runs_two_copies(no_ranks_left):
    cat = Catalog(target=LLAMA_ID, fallbacks=[])
    marker = no_ranks_left
    first = bringup.up(cat, engine="mlx", serve=True)
    pids = set(first.resident.pids)
    assert set(_rank_processes(marker)) == pids
    resident.state_file().write_text('{"url": "http://127.0.0.1:1", "pids": [')
    paths.deployment_file().write_text("{not json")
    text = _doctor_text()
    assert "resident ranks' record is corrupt" in text and str(paths.deployment_file()) in text
    assert _listed(pids, text)
    second = bringup.up(cat, engine="mlx", serve=True)  # the old ranks go first, found by their locks
    assert set(_rank_processes(marker)) == set(second.resident.pids) and not pids & set(second.resident.pids)
    resident.state_file().write_text("[]")
    paths.deployment_file().write_text("\0\0\0")
    r = _cli("down", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    actions = json.loads(r.stdout)["actions"]
    assert any("stopped the resident ranks" in a for a in actions), actions
    assert any("moved the unreadable record" in a for a in actions), actions
    assert _rank_processes(marker) == {} and not paths.deployment_file().exists()
    assert list(paths.state_dir().glob("deployment.json.corrupt-*"))


def test_a_lock_nobody_holds_is_not_a_rank_doctor_leaves_it_and_down_removes_it():
    held = ownership.hold(ownership.new_id(), "rank0", {"model": "m", "url": "http://127.0.0.1:9"})
    assert [lk.path for lk in ownership.live()] == [held.path] and _mode(held.path) == 0o600
    ownership.release(held)  # as when the rank that held it has ended
    assert ownership.live() == [] and held.path.exists()
    assert "ranks of m" not in _doctor_text() and held.path.exists()  # doctor changes nothing
    out = bringup.down()
    assert not out.had_deployment and not held.path.exists()


def test_whatever_now_listens_at_a_stale_records_port_is_not_taken_for_rank_0():
    import http.server

    class ListAnswer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a JSON list, as some other local server might answer
            body = b"[1, 2, 3]"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ListAnswer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        bringup.write_record(_record([2 ** 22 + 9], ownership.new_id(), url=f"http://127.0.0.1:{httpd.server_port}"))
        notes = bringup.stale_notes()
        assert len(notes) == 1 and "nothing answers" in notes[0] and "all its processes are gone" in notes[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
