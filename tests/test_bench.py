"""The benchmark's building blocks run for every registered method (no timing asserted)."""
import math

import torch

from prunelib import methods
from prunelib.bench import bench_overhead


def test_overhead_bench_runs_the_hooks_of_every_registered_method():
    out = bench_overhead(torch.device("cpu"), steps=1, bs=8, rounds=1, model_name="resnet20")
    failed = {k: v for k, v in out.items() if not isinstance(v, float)}
    assert failed == {}
    assert set(methods.names()) <= set(out) and math.isfinite(out["plain_ms"])
