"""Fixtures serving the exo HTTP contract with a simulator (see tests/exo_simulator.py).

The tiny models are registered under real Hugging Face ids (the simulator is a simulator: ids that look
real while serving miniatures keep the adapter's code paths identical to a real cluster's).
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

from tests.exo_simulator import Faults, Simulator

SIM_LLAMA_ID = "mlx-community/Llama-3.2-1B-Instruct-4bit"  # exo ships a card for it
SIM_NEMOTRON_ID = "mlx-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8Bit"  # exo's own Nemotron card
SIM_LMSTUDIO_NEMOTRON_ID = "lmstudio-community/NVIDIA-Nemotron-3-Nano-30B-A3B-MLX-8bit"  # needs a custom card


def sim_models(tiny_models: dict) -> dict[str, Any]:
    return {SIM_LLAMA_ID: tiny_models["llama-4bit"], SIM_NEMOTRON_ID: tiny_models["nemotron_h-8bit"],
            SIM_LMSTUDIO_NEMOTRON_ID: tiny_models["nemotron_h-8bit"]}


@pytest.fixture
def exo_sim_factory(tiny_models) -> Callable[..., Simulator]:
    """make(nodes=2 | [node dicts], **faults) -> a started simulator; all stopped after the test.
    Node dict keys: ram_total, ram_available, rdma, backends, version, name."""
    started: list[Simulator] = []

    def make(nodes: int | list[dict] = 2, models: dict | None = None, **faults: Any) -> Simulator:
        sim = Simulator(models if models is not None else sim_models(tiny_models), nodes=nodes,
                        faults=Faults(**faults)).start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def exo_sim(exo_sim_factory) -> Simulator:
    """A two-node simulator (48 GiB available per node, ring only) with the tiny Llama and Nemotron."""
    return exo_sim_factory()
