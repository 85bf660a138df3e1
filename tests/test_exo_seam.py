"""Only exo_client.py reads or writes exo's JSON: no other module names one of its camelCase keys, tagged class
names or instance metas. A new exo release then costs one module (docs/exo.md)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "arthur_cluster"
SEAM = PACKAGE / "exo_client.py"
# exo's wire names: tags of its tagged unions, instance metas, shard kinds, backends
EXO_NAMES = re.compile(r"\b(Mlx(Ring|Jaccl|Metal|Cpu|Cuda)\w*|Runner(Ready|Running|Failed|Loading|Idle)\w*|"
                       r"Download(Failed|Completed|Ongoing|Pending)\w*|(Pipeline|Tensor|Cfg)ShardMetadata|"
                       r"PrefillProgressChunk)\b")
CAMEL = re.compile(r"^[a-z]+(?:[A-Z][a-z0-9]*)+$")  # a string that is exactly a camelCase key
NOT_EXO = {"downloadsFolder"}  # LM Studio's settings key (paths.py), not exo's
EXO_VALUES = {"Pipeline", "Tensor"}  # exo's sharding names, as request/response values


def offences(source: str) -> list[str]:
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.STRING:
            continue
        text = tok.string.lstrip("rbfuRBFU").strip("\"'")
        if (CAMEL.match(text) and text not in NOT_EXO) or text in EXO_VALUES or EXO_NAMES.search(text):
            out.append(f"line {tok.start[0]}: {tok.string[:60]}")
    return out


def test_no_module_but_exo_client_reads_exos_raw_json():
    found = {str(p.relative_to(PACKAGE)): bad for p in sorted(PACKAGE.rglob("*.py"))
             if p != SEAM and (bad := offences(p.read_text(encoding="utf-8")))}
    assert found == {}, f"exo's wire format outside exo_client.py: {found}"


def test_the_scan_sees_what_it_is_for():
    """A camelCase key, an instance meta or a tag in any string is caught; prose and snake_case are not."""
    for planted in ('x.get("shardAssignments")', 'meta == "MlxJaccl"', 'body["nLayers"]', '"Tensor" if t else 1',
                    'tag == "RunnerReady"', 'f"{a}MlxRing"'):
        assert offences(planted + "\n"), planted
    for fine in ('x.get("model_id")', '"tensor split over 2 nodes"', '"Ready"', '# nodeBackends in a comment'):
        assert not offences(fine + "\n"), fine
    assert offences(SEAM.read_text(encoding="utf-8"))  # the seam itself does speak exo's JSON


def test_the_linker_never_imports_bring_up():
    """Bring-up uses the linker (it links before placing); the linker must not reach back (an import circle)."""
    import ast

    tree = ast.parse((PACKAGE / "linker.py").read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("bringup" in name for name in imported), imported
