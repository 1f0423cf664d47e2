"""The benchmark's building blocks run for every registered method (no timing asserted)."""
import copy
import math

import torch

from prunelib import methods
from prunelib.hookcost import bench_overhead, overhead_rows


def test_overhead_bench_runs_the_hooks_of_every_registered_method():
    out = bench_overhead(torch.device("cpu"), steps=1, bs=8, rounds=3, model_name="resnet20")
    failed = {k: v for k, v in out.items() if k != "plain_ms" and not isinstance(v, dict)}
    assert failed == {}
    assert set(methods.names()) <= set(out) and math.isfinite(out["plain_ms"])
    for name in methods.names():                 # median and spread over the rounds
        v = out[name]
        assert v["rounds"] == 3 and all(math.isfinite(v[k]) for k in ("min", "q1", "q3", "max"))
        assert v["min"] <= v["q1"] <= v["median"] <= v["q3"] <= v["max"]
    refs = {n for n in methods.names() if "vs_reference" in out[n]}
    assert refs == {"resrep", "scop"}          # the papers that change the forward pass
    for name in refs:
        v = out[name]["vs_reference"]
        assert v["min"] <= v["q1"] <= v["median"] <= v["q3"] <= v["max"]
    rows = overhead_rows(out)
    assert len(rows) == 2 + len(methods.names()) + len(refs)
    assert all("%" in r for r in rows[2:]) and sum("<= 2%" in r for r in rows) == len(out) - 1


class _Same(torch.nn.Module):
    """A generator returning one fixed knockoff batch."""
    def __init__(self, kf):
        super().__init__()
        self.register_buffer("kf", kf)

    def forward(self, z):
        return self.kf[:len(z)]


def test_the_papers_forward_computes_what_the_hooked_model_computes():
    from prunelib.graph import channel_groups
    from prunelib.hookcost import reference
    from prunelib.methods.base import Context
    from prunelib.models import get_model
    torch.manual_seed(0)
    base, x = get_model("resnet20").train(), torch.randn(4, 3, 32, 32)
    for name in ("resrep", "scop"):
        m = methods.get(name)
        m.ctx = Context(example_inputs=x[:1])
        hooked = m.attach(copy.deepcopy(base), channel_groups(base, x[:1]))
        if name == "scop":
            m.set_generator(_Same(torch.randn(4, 3, 32, 32)))
        ref, make_input = reference(m, base)
        got = ref.train()(make_input(x) if make_input else x)[:4]
        torch.testing.assert_close(hooked.train()(x), got, rtol=1e-5, atol=1e-5)
    assert reference(methods.get("ns"), base) is None


def test_latency_bench_times_every_variant_against_dense_in_the_same_rounds():
    from prunelib.bench import VARIANTS, bench_latency, latency_rows
    rows = bench_latency(torch.device("cpu"), reps=1, rounds=3, models=("resnet20",),
                         batches=(1, 2))
    assert [(r["batch"], r["variant"]) for r in rows] == \
        [(b, v) for b in (1, 2) for v in VARIANTS]
    by = {(r["batch"], r["variant"]): r for r in rows}
    for r in rows:
        assert r["ms"] > 0 and r["rounds"] == 3
        for k in ("vs_dense", "same_path"):
            v = r[k]
            assert v["min"] <= v["q1"] <= v["median"] <= v["q3"] <= v["max"]
    for b in (1, 2):                      # each baseline against itself, round by round
        assert by[b, "dense"]["vs_dense"]["min"] == by[b, "dense"]["vs_dense"]["max"] == 1.0
        assert by[b, "dense export"]["same_path"]["median"] == 1.0
        assert by[b, "pruned"]["same_path"] == by[b, "pruned"]["vs_dense"]
        assert by[b, "dense"]["macs_ratio"] == 1.0
        assert by[b, "pruned export"]["macs_ratio"] == by[b, "pruned"]["macs_ratio"] >= 2.0
        assert by[b, "rounded"]["macs_ratio"] >= 2.0                  # target still met
    lines = latency_rows(rows)
    assert "load" in lines[0] and len(lines) == 2 + len(rows)
    marked = [ln for ln in lines if ">= " in ln]
    assert len(marked) == 1 and " 2 pruned export" in marked[0]
