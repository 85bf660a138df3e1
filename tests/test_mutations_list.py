"""The mutation check (bench/mutations.py, run by hand: it takes minutes) still applies to the code: every
mutation's old text occurs exactly once in its file, and its tests exist."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutations():
    spec = importlib.util.spec_from_file_location("bench_mutations", ROOT / "bench" / "mutations.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_mutation_still_applies():
    mod = _mutations()
    assert len(mod.MUTATIONS) >= 15
    problems = [f"{m.name}: {why}" for m in mod.MUTATIONS if (why := mod.check_applies(m)) is not None]
    assert not problems, problems
    for m in mod.MUTATIONS:
        assert all(new != old for old, new in m.edits()) and m.tests, m.name
        for t in m.tests:
            path, _, name = t.partition("::")
            assert f"def {name.split('[')[0]}(" in (ROOT / path).read_text(), t
