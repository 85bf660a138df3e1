"""Resident MLX ranks at real shape on a GPU: a Nemotron-3-Nano-30B-A3B-shaped model with random 8-bit weights
(each rank builds its own share, as bench/gpu_parallel.py does), a 32k-token document, time to first token of
the second and third questions through rank 0's endpoint against the first.

    python bench/gpu_resident.py --doc-tokens 32768 --mode pipeline --time-budget 540

With one GPU both ranks share it and talk over ring on loopback (NCCL cannot put two ranks on one device);
with two, pass --backend nccl. Writes $OUT/gpu_resident.json (or --out) after every step.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_resident import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    defaults = {"--doc-tokens": "32768", "--mode": "pipeline"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    sys.exit(main(argv, synthetic=True, default_out="gpu_resident.json"))
