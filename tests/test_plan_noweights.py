"""A plan never needs the weights: `doc --plan` on the 33.6 GB real-shape Nemotron folder (sparse files) reads
headers and the tokenizer only, in a child process whose peak memory is measured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import realshape
from tests.conftest import NEMOTRON_CONFIG

RSS_LIMIT = 1 << 30  # 1 GiB: loading the weights would take 33 GB


@pytest.fixture(scope="module")
def nemotron_realshape(tmp_path_factory) -> Path:
    return realshape.build(tmp_path_factory.mktemp("rs") / "nemotron", NEMOTRON_CONFIG)


def _child_peak_rss(args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI in a grandchild of a small wrapper that reports the CLI's own ru_maxrss (kilobytes on
    Linux, bytes on macOS): RUSAGE_CHILDREN of this test process would include every earlier child."""
    wrapper = ("import resource, subprocess, sys\n"
               # A cap on the address space keeps a regression (loading 33 GB) from taking the machine down.
               "def cap():\n"
               "    try:\n"
               "        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
               "    except (ValueError, OSError):\n"
               "        pass  # macOS may refuse to lower RLIMIT_AS; the RSS assertion still holds\n"
               "p = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=120, preexec_fn=cap)\n"
               "sys.stdout.write(p.stdout); sys.stderr.write(p.stderr)\n"
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(p.returncode)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "arthur_cluster.cli", *args],
                          capture_output=True, text=True, timeout=150, cwd=tmp_path)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS")][-1]
    rss = int(line.split()[1]) * (1 if sys.platform == "darwin" else 1024)
    return proc, rss


def test_doc_plan_on_the_real_shape_folder_loads_no_weights(nemotron_realshape, tmp_path):
    total = sum(f.stat().st_size for f in nemotron_realshape.glob("*.safetensors"))
    assert total > 30e9  # the folder claims the real checkpoint's size
    doc = tmp_path / "doc.md"
    doc.write_text("\n\n".join(f"Paragraph {i}: the cluster splits the model's layers." for i in range(200)))
    proc, rss = _child_peak_rss(["doc", str(doc), "--ask", "What splits?", "--model", str(nemotron_realshape),
                                 "--plan", "--context", "8192"], tmp_path)
    assert proc.returncode in (0, 3), proc.stderr
    assert "Plan" in proc.stdout and "memory at" in proc.stdout and "Traceback" not in proc.stderr
    assert rss < RSS_LIMIT, f"peak RSS {rss / 2**20:.0f} MiB"
    print(f"doc --plan on {total / 1e9:.1f} GB: peak RSS {rss / 2**20:.0f} MiB")
