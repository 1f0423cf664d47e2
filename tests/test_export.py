"""Inference export (`prunelib.export.for_inference`): the eval model's function up to float
rounding, BatchNorms gone, in-place ops only where nothing else reads their input. Oracle: the
eval-mode model itself, and the committed ResNet-20 baseline's predictions on real CIFAR-10."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunelib as pl
from prunelib import methods
from prunelib.data import Batches, load_cifar10
from prunelib.export import ExportError, for_inference, make_inplace, trace
from prunelib.methods.base import Context
from prunelib.models import get_model
from prunelib.select import Budget

X1 = torch.randn(1, 3, 32, 32)
BASELINE = Path(__file__).resolve().parents[1] / "book" / "baselines" / "resnet20_cifar10.pt"


def trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
    return model.eval()


def l1_pruned(model: nn.Module, **budget) -> nn.Module:
    m = methods.get("l1")
    m.ctx = Context(example_inputs=X1)
    m.attach(model, pl.channel_groups(model, X1))
    return m.finish(model, Budget(macs=0.5, **budget)).eval()


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("pruned", [False, True])
def test_export_computes_the_eval_models_function(name, shortcut, pruned):
    torch.manual_seed(0)
    model = trained_like(get_model(name, shortcut=shortcut))
    if pruned:
        model = l1_pruned(model)
    x = torch.randn(8, 3, 32, 32)
    exported = for_inference(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in exported.modules())
    assert pl.count(exported, X1)[0] == pl.count(model, X1)[0]          # same convs, same MACs
    with torch.no_grad():
        ref = model(x)
        scale = float(ref.abs().max())
        assert max_diff(exported, model, x) <= 1e-5 * max(scale, 1.0)
        y = torch.randn(3, 3, 32, 32)                                   # another batch size
        assert torch.allclose(exported(y), model(y), rtol=1e-4, atol=1e-5 * max(scale, 1.0))
        assert torch.allclose(exported(x.contiguous(memory_format=torch.channels_last)), ref,
                              rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def test_export_leaves_the_model_and_its_input_unchanged():
    model = trained_like(get_model("resnet20"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    x0 = x.clone()
    with torch.no_grad():
        for_inference(model, x)(x)
    assert torch.equal(x, x0)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class Reuse(nn.Module):
    """A conv output read twice, and a ReLU of a slice (a view) of a tensor read again."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        a = F.relu(h) + h                         # h read twice: the ReLU must not overwrite it
        g = self.conv2(a)
        v = F.relu(g[:, :4])                      # a view of g, which is read again below
        return torch.cat([v, g[:, 4:]], 1) + g.mean()


def test_in_place_ops_only_where_their_input_is_read_by_nothing_else():
    torch.manual_seed(0)
    model = Reuse().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = trace(Reuse().eval())
    gm.load_state_dict(model.state_dict())
    assert make_inplace(gm, (x,)) == 1            # only relu(h) + h: relu(h) is new
    relus = [n for n in gm.graph.nodes if n.target is F.relu]
    assert len(relus) == 2 and not any(n.kwargs.get("inplace") for n in relus)
    assert max_diff(for_inference(model, x), model, x) < 1e-5      # channels_last rounding
    plain = get_model("resnet20").eval()
    gm = trace(plain)
    n_blocks = 9
    assert make_inplace(gm, (X1,)) == 1 + 3 * n_blocks   # stem ReLU; ReLU, add, ReLU per block


def test_jit_backend_computes_the_same_function_at_any_batch_size():
    torch.manual_seed(0)
    model = l1_pruned(trained_like(get_model("resnet20")))
    exported = for_inference(model, torch.randn(4, 3, 32, 32), backend="jit")
    assert isinstance(exported, torch.jit.ScriptModule)
    x = torch.randn(7, 3, 32, 32)
    assert max_diff(exported, model, x) <= 1e-4
    assert pl.latency(exported, x, reps=1, warmup=0) > 0


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else -self.conv(x)    # control flow on a value


def test_untraceable_models_and_unknown_backends_fail_clearly_or_fall_back():
    x = torch.ones(1, 3, 8, 8)
    with pytest.raises(ExportError, match="torch.fx cannot trace Untraceable"):
        for_inference(Untraceable(), x)
    with pytest.raises(ExportError, match="backend='onnx'.*eager"):
        for_inference(get_model("resnet20"), X1, backend="onnx")
    model = Untraceable().eval()
    with pytest.warns(UserWarning, match="cannot trace Untraceable"):
        fallback = for_inference(model, x, strict=False)
    assert max_diff(fallback, model, x) < 1e-5 and fallback is not model


def test_export_keeps_the_baselines_cifar_predictions(data_root):
    from prunelib.train import load_checkpoint
    if not BASELINE.is_file():
        pytest.skip("committed ResNet-20 baseline not found")
    model = get_model("resnet20")
    load_checkpoint(model, BASELINE)
    model.eval()
    images, labels = load_cifar10(data_root, train=False)
    idx = np.random.default_rng(0).choice(len(labels), 500, replace=False)
    x, y = next(iter(Batches(images[idx], labels[idx], 500, shuffle=False, augment=False)))
    for m in (model, l1_pruned(model)):
        exported = for_inference(m, x[:2])
        with torch.no_grad():
            ref, out = m(x), exported(x)
        assert torch.equal(ref.argmax(1), out.argmax(1))               # same predictions
        assert (ref.argmax(1) == y).float().mean() == (out.argmax(1) == y).float().mean()
        assert float((ref - out).abs().max()) <= 1e-4 * float(ref.abs().max())


class SharedConv(nn.Module):
    """One conv called twice, each call followed by its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), \
            nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(F.relu(self.bn1(self.conv(x)))))


def test_a_conv_called_twice_is_not_folded_and_the_function_is_kept():
    model = trained_like(SharedConv())
    x = torch.randn(2, 3, 8, 8)
    exported = for_inference(model, x)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in exported.modules()) == 2
    assert max_diff(exported, model, x) < 1e-5


@pytest.mark.parametrize("name", ["vgg16", "mobilenetv2", "tv_resnet18"])
def test_export_is_exact_on_other_architectures(name):
    import torchvision
    torch.manual_seed(0)
    model = (torchvision.models.resnet18(num_classes=10) if name == "tv_resnet18"
             else get_model(name))                       # shared nn.ReLU; depthwise convs
    model = trained_like(model)
    x = torch.randn(2, 3, 32, 32)
    exported = for_inference(model, x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in exported.modules())
    with torch.no_grad():
        assert max_diff(exported, model, x) <= 1e-5 * max(float(model(x).abs().max()), 1.0)
