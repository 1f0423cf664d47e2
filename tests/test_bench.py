"""The benchmark's building blocks run for every registered method (no timing asserted)."""
import math

import torch

from prunelib import methods
from prunelib.bench import bench_overhead, overhead_rows


def test_overhead_bench_runs_the_hooks_of_every_registered_method():
    out = bench_overhead(torch.device("cpu"), steps=1, bs=8, rounds=3, model_name="resnet20")
    failed = {k: v for k, v in out.items() if k != "plain_ms" and not isinstance(v, dict)}
    assert failed == {}
    assert set(methods.names()) <= set(out) and math.isfinite(out["plain_ms"])
    for name in methods.names():                 # median and spread over the rounds
        v = out[name]
        assert v["rounds"] == 3 and all(math.isfinite(v[k]) for k in ("min", "q1", "q3", "max"))
        assert v["min"] <= v["q1"] <= v["median"] <= v["q3"] <= v["max"]
    rows = overhead_rows(out)
    assert len(rows) == 2 + len(methods.names())
    assert all("%" in r and "<= 2%" in r for r in rows[2:])
