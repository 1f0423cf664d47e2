"""Tests for prunelib.train (fit / evaluate / schedules / hooks / checkpoints) and the
`prunelib train` command on a tiny npz data set."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from prunelib.train import (evaluate, fit, load_checkpoint, lr_factor, save_checkpoint,
                            seed_everything)


class Loader:
    """Fixed list of (x, y) batches, re-iterable, with len()."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int) -> None:
        self.batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def blobs(n: int = 64, d: int = 8, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return centers[y] + 0.3 * torch.randn(n, d, generator=g), y


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_fit_learns_separable_problem_and_evaluate_memorized() -> None:
    seed_everything(0)
    x, y = blobs()
    model = nn.Linear(8, 4)
    data = Loader(x, y, 16)
    before = evaluate(model, data)
    hist = fit(model, data, epochs=10, lr=0.1, quiet=True)
    assert len(hist["loss"]) == 10 and hist["steps"] == 40 and hist["images"] == 640
    assert hist["loss"][-1] < 0.2 * hist["loss"][0]
    assert evaluate(model, data) == 100.0 and before < 100.0
    assert model.training                               # mode restored


def test_fractional_epochs_max_steps_and_on_epoch() -> None:
    x, y = blobs(n=40)
    data = Loader(x, y, 4)                              # 10 steps per epoch
    seen: list[int] = []
    h = fit(nn.Linear(8, 4), data, epochs=2.5, lr=0.01, quiet=True,
            on_epoch=lambda e, loss: seen.append(e))
    assert h["steps"] == 25 and len(h["loss"]) == 3 and seen == [1, 2]
    assert fit(nn.Linear(8, 4), data, epochs=0.5, lr=0.01, quiet=True)["steps"] == 5
    assert fit(nn.Linear(8, 4), data, epochs=3, lr=0.01, quiet=True, max_steps=7)["steps"] == 7


class Recorder:
    """Method-like hooks that log calls and add 3 * sum(weight) to the loss."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.grads: list[torch.Tensor] = []
        self.w_before_step: list[torch.Tensor] = []
        self.w_after_step: list[torch.Tensor] = []

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        self.calls.append("param_groups")
        return [{"params": [model.weight], "lr": lr, "weight_decay": 0.0},
                {"params": [model.bias], "lr": 0.0, "weight_decay": 0.0}]

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        self.calls.append("loss_term")
        return 3.0 * model.weight.sum()

    def after_backward(self, model: nn.Module) -> None:
        self.calls.append("after_backward")
        self.grads.append(model.weight.grad.clone())
        self.w_before_step.append(model.weight.detach().clone())

    def after_step(self, model: nn.Module) -> None:
        self.calls.append("after_step")
        self.w_after_step.append(model.weight.detach().clone())


def test_hooks_order_loss_term_gradient_and_param_groups() -> None:
    x = torch.zeros(8, 5)                 # zero inputs: CE has no gradient w.r.t. the weight
    y = torch.arange(8) % 3
    model = nn.Linear(5, 3)
    bias0 = model.bias.detach().clone()
    rec = Recorder()
    fit(model, Loader(x, y, 4), epochs=1, lr=0.1, momentum=0.0, schedule="constant",
        hooks=rec, quiet=True)
    assert rec.calls == ["param_groups"] + ["loss_term", "after_backward", "after_step"] * 2
    for g in rec.grads:                   # d(3 * sum W)/dW = 3 everywhere
        torch.testing.assert_close(g, torch.full_like(g, 3.0))
    for wb, wa in zip(rec.w_before_step, rec.w_after_step):     # optimizer stepped in between
        torch.testing.assert_close(wa, wb - 0.1 * 3.0)
    assert torch.equal(model.bias, bias0)                       # its group has lr 0


def test_nan_raises_with_step() -> None:
    class Bad(Recorder):
        def loss_term(self, model: nn.Module) -> torch.Tensor:
            n = len(self.calls)
            self.calls.append("loss_term")
            return model.weight.sum() * (float("nan") if n >= 1 + 3 * 3 else 0.0)

    x, y = blobs(n=40)
    with pytest.raises(FloatingPointError, match=r"step 3 .*lower the learning rate"):
        fit(nn.Linear(8, 4), Loader(x, y, 4), epochs=1, lr=0.1, hooks=Bad(), quiet=True)


def test_lr_factor_schedules() -> None:
    assert lr_factor(0, 100) == 1.0 and abs(lr_factor(50, 100) - 0.5) < 1e-12
    assert lr_factor(100, 100) < 1e-12
    assert lr_factor(49, 100, "step") == 1.0 and lr_factor(50, 100, "step") == pytest.approx(0.1)
    assert lr_factor(75, 100, "step") == pytest.approx(0.01)
    assert lr_factor(99, 100, "constant") == 1.0
    assert lr_factor(0, 100, "constant", warmup=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, "constant", warmup=10) == 1.0
    assert lr_factor(0, 100, "triangular") == pytest.approx(0.1)
    assert lr_factor(50, 100, "triangular") == 1.0
    assert lr_factor(75, 100, "triangular") == pytest.approx(0.55)
    assert lr_factor(30, 100, lambda s, t: 1 - s / t) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(0, 10, "linear")
    with pytest.raises(ValueError, match="finite"):
        lr_factor(0, 10, lambda s, t: float("nan"))


@pytest.mark.parametrize("schedule,final", [("cosine", 0.0), ("step", 0.01), ("constant", 1.0),
                                            ("triangular", 0.1), (lambda s, t: 0.5, 0.5)])
def test_fit_applies_schedule_per_step(schedule, final: float) -> None:
    x, y = blobs(n=40)
    h = fit(nn.Linear(8, 4), Loader(x, y, 4), epochs=2, lr=0.2, schedule=schedule, quiet=True)
    assert h["lr"] == pytest.approx(0.2 * final, abs=1e-12)


def test_distillation_from_identical_teacher_is_zero() -> None:
    torch.manual_seed(0)
    x, y = blobs(n=32)
    student = nn.Linear(8, 4)
    teacher = copy.deepcopy(student)
    h = fit(student, Loader(x, y, 8), epochs=1, lr=0.0, weight_decay=0.0, quiet=True,
            distill_from=teacher, distill_alpha=1.0)
    assert abs(h["loss"][0]) < 1e-6
    h = fit(student, Loader(x, y, 8), epochs=1, lr=0.0, weight_decay=0.0, quiet=True,
            distill_from=teacher, distill_alpha=0.0)
    assert h["loss"][0] > 0.1                           # plain cross-entropy


def test_cnn_is_trained_channels_last() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    m = tiny_cnn()
    fit(m, Loader(x, y, 6), epochs=1, lr=0.01, quiet=True)
    assert m[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = tiny_cnn()
    fit(m, Loader(torch.randn(12, 3, 8, 8), torch.arange(12) % 3, 6), epochs=1, lr=0.1,
        quiet=True)
    m.eval()
    path = tmp_path / "sub" / "m.pt"
    save_checkpoint(m, path, model="tiny", accuracy=np.float64(91.5), epochs=2,
                    evals=[[1, 50.0]], src=tmp_path, torch=torch.__version__)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"state_dict", "meta"}
    m2 = tiny_cnn().eval()
    meta = load_checkpoint(m2, path)
    assert meta == {"model": "tiny", "accuracy": 91.5, "epochs": 2, "evals": [[1, 50.0]],
                    "src": str(tmp_path), "torch": str(torch.__version__)}
    xb = torch.randn(2, 3, 8, 8)
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    torch.testing.assert_close(m2(xb), m(xb))          # layouts may differ: tiny fp noise
    with pytest.raises(TypeError, match="plain Python"):
        save_checkpoint(m, path, bad=object())
    with pytest.raises(RuntimeError):
        load_checkpoint(nn.Linear(2, 2), path)


def test_cli_train_on_tiny_npz(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from prunelib.cli import main
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        np.savez(tmp_path / f"cifar10_{split}.npz",
                 images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 10)
    out = tmp_path / "r20.pt"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--model", "resnet20", "--epochs", "2", "--batch-size", "20",
                     "--data", str(tmp_path), "--out", str(out), "--eval-every", "1",
                     "--device", "cpu", "--quiet", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    log = capsys.readouterr().out
    assert "epoch   1/2" in log and "final test accuracy" in log
    from prunelib.models import get_model
    meta = load_checkpoint(get_model("resnet20"), out)
    assert meta["model"] == "resnet20" and meta["steps"] == 4 and meta["epochs"] == 2
    assert 0 <= meta["accuracy"] <= 100 and meta["command"].startswith("prunelib train")
    assert [e[0] for e in meta["evals"]] == [1, 2] and meta["threads"] == 1
    with pytest.raises(SystemExit):
        main(["train", "--model", "resnet21"])


def test_fit_and_evaluate_on_device(device: torch.device) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    m = tiny_cnn()
    h = fit(m, Loader(x, y, 6), epochs=20, lr=0.1, device=device, quiet=True)
    assert next(m.parameters()).device.type == device.type
    assert h["loss"][-1] < h["loss"][0]
    assert 0.0 <= evaluate(m, Loader(x, y, 6), device=device) <= 100.0
