"""What a training step's hooks cost, counted (not timed): the per-step hooks run a fixed number
of tensor operations whatever the number of channel groups (one batched computation over all
groups, no Python loop over them), and no operation that reads a tensor value back to the host
(`.item()`, `float(t)`, `if t:`, boolean-mask indexing): such a read stalls a CUDA stream."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import prunelib as pl
from prunelib.methods import get
from prunelib.methods.base import Context
from prunelib.models import get_model

# operations whose result depends on a tensor's value on the host (a device sync on CUDA);
# 'index_bool': indexing with a boolean mask (its output size is the mask's count)
SYNC = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "item", "index_bool"}
# a configuration of every method whose steps are plain training steps with hooks
HOOKED = {"ns": {}, "pr": {}, "rsnli": {}, "scp": {}, "gbn": {}, "ssl": {}, "oicsr": {},
          "oto": {}, "greg": {}, "scp_concrete": {"mask": "concrete"}}


class Ops(TorchDispatchMode):
    """Records the name of every aten operation that is not a view (views launch no kernel);
    indexing with a boolean mask is recorded as 'index_bool'."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("index") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool
                for a in args[1:] for t in (a if isinstance(a, (list, tuple)) else [a])):
            name = "index_bool"
        if not func.is_view:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def hooked(name: str, model_name: str, dtype: torch.dtype = torch.float32):
    """(method, model, optimizer, batch) with the method attached to a fresh model."""
    torch.manual_seed(0)
    model = get_model(model_name).to(dtype)
    x, y = torch.randn(2, 3, 32, 32, dtype=dtype), torch.randint(0, 10, (2,))
    m = get(name.split("_")[0], **HOOKED[name])
    m.ctx = Context(example_inputs=x[:1], train_loader=[(x, y)], calib_loader=[(x, y)],
                    quiet=True)
    model = m.attach(model, pl.channel_groups(model, x[:1]))
    if hasattr(m, "total_steps"):                          # OTO: in its half-space stage
        m.total_steps = 1
    opt = torch.optim.SGD(m.param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9)
    return m, model, opt, (x, y)


def step(m, model, opt, batch, record: Ops | None = None, hooks_only: bool = False) -> None:
    """One training step; `record` sees the hooks (and the rest unless `hooks_only`)."""
    x, y = batch
    whole = record if record is not None and not hooks_only else None
    with whole or nullcontext():
        loss = F.cross_entropy(model(x), y)
    with record or nullcontext():
        term = m.loss_term(model)
    with whole or nullcontext():
        loss = loss if term is None else loss + term
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with record or nullcontext():
        m.after_backward(model)
    with whole or nullcontext():
        opt.step()
    with record or nullcontext():
        m.after_step(model)


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_hook_operations_do_not_grow_with_the_number_of_groups(name):
    counts = {}
    for model_name in ("resnet20", "resnet56"):                # 9 vs 27 internal groups
        m, model, opt, batch = hooked(name, model_name)
        step(m, model, opt, batch)                             # first step: lazy set-up
        ops = Ops()
        step(m, model, opt, batch, ops, hooks_only=True)
        counts[model_name] = sorted(ops.names)
    assert len(m.groups) > 20
    assert counts["resnet20"] == counts["resnet56"]


@pytest.mark.parametrize("name", sorted(HOOKED))
def test_a_training_step_with_hooks_reads_no_tensor_value_back(name):
    m, model, opt, batch = hooked(name, "resnet20")
    step(m, model, opt, batch)
    ops = Ops()
    step(m, model, opt, batch, ops)
    assert len(ops.names) > 100                            # the whole step was recorded
    assert SYNC.isdisjoint(ops.names), sorted(SYNC & set(ops.names))


def test_greg_reads_values_back_only_in_its_lam_update_every_k_u_steps():
    m, model, opt, batch = hooked("greg", "resnet20")
    synced = []
    for _ in range(2 * m.k_u):
        ops = Ops()
        step(m, model, opt, batch, ops, hooks_only=True)
        synced.append(not SYNC.isdisjoint(ops.names))
    assert synced == [i % m.k_u == 0 for i in range(2 * m.k_u)]


@pytest.mark.parametrize("name", ["ssl", "oicsr", "oto", "greg", "rsnli", "scp", "gbn"])
def test_a_method_attached_then_moved_steps_as_one_attached_after_the_move(name):
    """Index tensors and buffers built at attach follow the parameters (here to float64, as
    to a GPU): the step equals that of the method attached to the moved model."""
    m, model, _, (x, y) = hooked(name, "resnet20")
    model.double()
    opt = torch.optim.SGD(m.param_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9)
    ref_m, ref, ref_opt, batch = hooked(name, "resnet20", torch.float64)
    for _ in range(2):
        step(m, model, opt, batch)
        step(ref_m, ref, ref_opt, batch)
    got, want = dict(model.named_parameters()), dict(ref.named_parameters())
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == torch.float64
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
