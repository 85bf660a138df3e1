"""Time estimates count generation (every unit may run to its reserved tokens) and the prefill the prompt cache
really shares; a plan made without weights uses the rates an earlier run of the model recorded here."""

from __future__ import annotations

import pytest

from arthur_cluster import docjob, documents

QUESTIONS = ["What is two plus two?", "Which node holds part 3?"]


def make_doc(n: int) -> documents.Document:
    return documents.Document("\n\n".join(f"## Section {i}\n\nNode {i} holds part {i} of the weights; the answer "
                                          f"for section {i} is {i * 7}." for i in range(n)))


@pytest.fixture
def planner(tiny_models):
    return docjob.plan_runner(str(tiny_models["nemotron_h-8bit"]))


def test_generation_is_estimated_for_every_unit(planner):
    plan = docjob.plan_job(make_doc(60), docjob.make_tasks(QUESTIONS), planner, max_tokens=64, context=600,
                           warmup=False)
    assert plan.mode == "map-reduce" and len(plan.chunks) >= 4
    n, group = len(plan.chunks), plan.reduce_group
    reduces, items = 0, n
    while True:  # the reduce tree run_job walks
        items = -(-items // group)
        reduces += items
        if items == 1:
            break
    assert docjob.unit_count(plan) == 2 * (n + reduces)
    assert plan.generate_tokens == 2 * (n + reduces) * 64
    assert plan.seconds is None and plan.prefill_seconds is None  # no weights, no rates recorded yet


def test_recorded_rates_time_a_plan_without_weights(planner):
    docjob.record_rates(planner, {"prefill_tps": 500.0, "decode_tps": 20.0})
    single = docjob.plan_job(make_doc(5), docjob.make_tasks(QUESTIONS), planner, max_tokens=32, warmup=False)
    assert single.mode == "single" and single.rates_from == "an earlier run on this machine"
    assert single.generate_tokens == 2 * 32
    assert single.generate_seconds == pytest.approx(64 / 20.0)
    assert single.seconds == pytest.approx(single.prefill_tokens / 500.0 + 64 / 20.0)


def test_prefill_counts_the_cache_as_it_is_used(tiny_models):
    doc, tasks = make_doc(5), docjob.make_tasks(QUESTIONS)
    cached = docjob.plan_job(doc, tasks, docjob.plan_runner(str(tiny_models["nemotron_h-8bit"])), max_tokens=32,
                             warmup=False)
    uncached = docjob.plan_job(doc, tasks, docjob.plan_runner(str(tiny_models["nemotron_h-8bit"]), use_cache=False),
                               max_tokens=32, warmup=False)
    # Without the cache the document is prefilled once per question.
    assert uncached.prefill_tokens - cached.prefill_tokens >= cached.document_tokens
