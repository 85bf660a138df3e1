"""What a later question's short prefill pays for shapes seen for the first time: each operation of a Nemotron-3-Nano
layer run at a token count it has not run before, then again at the same shape, at the real dimensions.

    python bench/gpu_firstcall.py --context 32384 --out firstcall.json

A resident rank answers a later question by prefilling a few dozen tokens against a long cache: a token count and
a cache length that no earlier request had. Where a backend builds something per shape (a compiled graph, a
kernel, an attention plan), the first call pays for it; the repeat shows the compute alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def timed(fn) -> float:
    import mlx.core as mx

    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval(fn())
    mx.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--context", type=int, default=32384, help="tokens already in the cache")
    p.add_argument("--lengths", default="43,37,51", help="new token counts, each tried first and then again")
    p.add_argument("--out", type=Path)
    p.add_argument("--tiny", action="store_true", help="small dimensions: a smoke run on the CPU")
    args = p.parse_args()

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.nn import relu2
    from mlx_lm.models.ssm import ssm_attn
    from mlx_lm.models.switch_layers import SwitchMLP

    hidden, heads, kv, hd, experts, k, mi = 2688, 32, 2, 128, 128, 6, 1856
    mh, mhd, groups, state = 64, 64, 8, 128
    if args.tiny:
        hidden, heads, experts, mi, mh, state = 256, 4, 8, 128, 8, 16
    bf = mx.bfloat16
    mx.random.seed(0)
    moe = SwitchMLP(hidden, mi, experts, activation=relu2)
    moe.set_dtype(bf)
    nn.quantize(moe, group_size=64, bits=8)
    dense = nn.QuantizedLinear(hidden, 2 * mi, bias=False, group_size=64, bits=8)
    keys = mx.random.normal((1, kv, args.context + 256, hd)).astype(bf)
    vals = mx.random.normal((1, kv, args.context + 256, hd)).astype(bf)
    A_log, D, dt_bias = mx.random.normal((mh,)), mx.random.normal((mh,)), mx.random.normal((mh,))
    ssm_state = mx.random.normal((1, mh, mhd, state)).astype(mx.float32)
    mx.eval(moe.parameters(), dense.parameters(), keys, vals, A_log, D, dt_bias, ssm_state)

    def ops(L: int, S: int):
        x = mx.random.normal((1, L, hidden)).astype(bf)
        q = mx.random.normal((1, heads, L, hd)).astype(bf)
        idx = mx.random.randint(0, experts, (1, L, k)).astype(mx.uint32)
        xs = mx.random.normal((1, L, mh, mhd)).astype(bf)
        B = mx.random.normal((1, L, groups, state)).astype(bf)
        C = mx.random.normal((1, L, groups, state)).astype(bf)
        dt = mx.random.normal((1, L, mh)).astype(bf)
        mx.eval(x, q, idx, xs, B, C, dt)
        return {
            "sdpa (causal, cache S)": lambda: mx.fast.scaled_dot_product_attention(
                q, keys[:, :, :S], vals[:, :, :S], scale=hd ** -0.5, mask="causal"),
            "8-bit linear": lambda: dense(x),
            "8-bit MoE experts (gather)": lambda: moe(x, idx),
            "Mamba SSD scan (ssm_attn)": lambda: ssm_attn(xs, A_log, B, C, D, dt, dt_bias, state=ssm_state)[0],
        }

    rows = []
    # warm each op once at another shape, so that a first call below is a new shape, not a first use
    for fn in ops(2048, 4096).values():
        timed(fn)
    for L in [int(x) for x in args.lengths.split(",")]:
        S = args.context + L
        for name, fn in ops(L, S).items():
            first, again = timed(fn), timed(fn)
            rows.append({"op": name, "L": L, "S": S, "first_s": round(first, 5), "again_s": round(again, 5)})
            print(json.dumps(rows[-1]), flush=True)
        # the same L against another cache length: does attention build something per (L, S)?
        fn = ops(L, S + 128)["sdpa (causal, cache S)"]
        first, again = timed(fn), timed(fn)
        rows.append({"op": "sdpa, same L, S + 128", "L": L, "S": S + 128, "first_s": round(first, 5),
                     "again_s": round(again, 5)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"mlx": mx.__version__, "device": str(mx.default_device()), "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))
    print("\n| op | L | S | first call s | again s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['L']} | {r['S']} | {r['first_s']:.4f} | {r['again_s']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
