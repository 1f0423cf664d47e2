"""What prunelib.train guarantees: `fit` refuses bad settings and stops on a diverging loss or a
loader that yields nothing (instead of hanging); checkpoints are written atomically and every
load error names the file."""
from __future__ import annotations

import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from prunelib.train import CheckpointError, fit, load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True)
def deadline():
    """Fail (instead of hanging) if a test runs longer than 60 s."""
    def fail(*_):
        raise TimeoutError("test ran past 60 s: fit() is probably looping forever")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def batches(n: int = 8, bs: int = 4, d: int = 5, k: int = 4, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g), torch.arange(n) % k
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def zero_linear(d: int = 5, k: int = 4) -> nn.Linear:
    """Zero weights: every logit is 0, so the cross-entropy is exactly ln(k) on any batch."""
    m = nn.Linear(d, k)
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    return m


class AddLoss:
    """Method-like hooks whose loss_term adds `extra(step)` (a constant) to the loss."""

    def __init__(self, extra) -> None:
        self.extra, self.steps = extra, 0

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        return [{"params": list(model.parameters()), "lr": lr, "weight_decay": weight_decay}]

    def loss_term(self, model: nn.Module) -> torch.Tensor:
        self.steps += 1
        return torch.tensor(float(self.extra(self.steps - 1)))

    def after_backward(self, model: nn.Module) -> None:
        return None

    def after_step(self, model: nn.Module) -> None:
        return None


# -- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [("epochs", math.nan), ("epochs", math.inf),
                                        ("epochs", 0), ("epochs", -1.0), ("lr", math.nan),
                                        ("lr", math.inf), ("lr", -0.1), ("sync_every", 0),
                                        ("diverge_factor", 1.0)])
def test_bad_settings_are_refused_before_any_step(name: str, value: float) -> None:
    model = nn.Linear(5, 4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"fit\(\): {name} must be .*, got {value}$"):
        fit(model, batches(), **{"epochs": 1, "lr": 0.1, name: value}, quiet=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_lr_zero_and_fractional_epochs_are_allowed() -> None:
    h = fit(zero_linear(), batches(n=16), epochs=0.5, lr=0.0, quiet=True)
    assert h["steps"] == 2 and h["loss"] == [pytest.approx(math.log(4))]


# -- loaders that yield nothing -------------------------------------------------------------------

class OneShot:
    """An iterator that claims a length: the first pass works, later passes yield nothing."""

    def __init__(self, items: list) -> None:
        self.items, self.it = items, iter(items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return self.it

    def __next__(self):
        return next(self.it)


def test_exhausted_one_shot_iterator_raises_instead_of_hanging() -> None:
    loader = OneShot(batches(n=8))
    with pytest.raises(ValueError, match=r"pass 2 over `batches` yielded no batches although "
                                         r"len\(batches\) = 2: .*one-shot iterator"):
        fit(nn.Linear(5, 4), loader, epochs=3, lr=0.1, quiet=True)


def test_loader_that_never_yields_raises_on_the_first_pass() -> None:
    class Liar:
        def __len__(self) -> int:
            return 3

        def __iter__(self):
            return iter([])

    with pytest.raises(ValueError, match="pass 1 over `batches` yielded no batches"):
        fit(nn.Linear(5, 4), Liar(), epochs=1, lr=0.1, quiet=True)


def test_generator_is_refused_with_the_way_out() -> None:
    with pytest.raises(TypeError, match=r"re-iterable loader with len\(\).*got generator"):
        fit(nn.Linear(5, 4), (b for b in batches()), epochs=1, lr=0.1, quiet=True)
    with pytest.raises(ValueError, match=r"empty loader \(len\(batches\) == 0\)"):
        fit(nn.Linear(5, 4), [], epochs=1, lr=0.1, quiet=True)


# -- divergence -----------------------------------------------------------------------------------

def test_inf_loss_names_its_step() -> None:
    hooks = AddLoss(lambda s: math.inf if s == 6 else 0.0)
    with pytest.raises(FloatingPointError, match=r"loss became inf at step 6 .*lower the "
                                                 r"learning rate \(lr=0.1\)"):
        fit(zero_linear(), batches(n=40), epochs=1, lr=0.1, hooks=hooks, quiet=True,
            sync_every=4)
    assert hooks.steps == 8                            # stopped at the first sync after it


def test_exploding_loss_stops_at_the_next_sync_naming_the_step() -> None:
    ref = math.log(4)                                  # first window: exactly ln(4)
    hooks = AddLoss(lambda s: 0.0 if s < 7 else 2e3 * ref * 2 ** s)
    with pytest.raises(FloatingPointError, match=r"loss diverged at step 7 \(epoch 0.70\): "
                                                 r".* more than 1000x the reference 1.386 "
                                                 r".*lower the learning rate \(lr=0.0\)"):
        fit(zero_linear(), batches(n=40), epochs=2, lr=0.0, hooks=hooks, quiet=True,
            sync_every=5)
    assert hooks.steps == 10


@pytest.mark.parametrize("below", [True, False])
def test_divergence_threshold_is_factor_times_reference(below: bool) -> None:
    ref = math.log(4)
    loss = (0.99 if below else 1.01) * 1e3 * ref       # total loss of steps 6..
    hooks = AddLoss(lambda s: 0.0 if s < 6 else loss - ref)
    run = lambda: fit(zero_linear(), batches(n=40), epochs=1, lr=0.0, hooks=hooks,  # noqa: E731
                      quiet=True, sync_every=6)
    if below:
        h = run()
        assert h["steps"] == 10 and h["loss"][0] == pytest.approx((6 * ref + 4 * loss) / 10)
    else:
        with pytest.raises(FloatingPointError, match="diverged at step 6"):
            run()
    h = fit(zero_linear(), batches(n=40), epochs=1, lr=0.0, hooks=AddLoss(
        lambda s: 0.0 if s < 6 else 1e9), quiet=True, sync_every=6, diverge_factor=None)
    assert h["steps"] == 10                            # the check can be turned off


def test_tiny_reference_loss_does_not_make_the_check_trigger_happy() -> None:
    # a nearly converged model (loss ~1e-6) whose loss then rises to 20: bad, not divergence
    hooks = AddLoss(lambda s: 0.0 if s < 4 else 20.0)
    model = nn.Linear(5, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([30.0, 0, 0, 0]))
    data = [(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))] * 10
    h = fit(model, data, epochs=1, lr=0.0, hooks=hooks, quiet=True, sync_every=4)
    assert h["steps"] == 10 and h["loss"][0] == pytest.approx(12.0, rel=1e-4)


def test_real_divergence_with_a_huge_lr_is_caught() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = 10 * torch.randn(64, 20, generator=g)
    data = [(x[i:i + 8], torch.arange(8) % 10) for i in range(0, 64, 8)]
    with pytest.raises(FloatingPointError, match=r"lower the learning rate \(lr=100000.0\)"):
        fit(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 10)), data, epochs=20,
            lr=1e5, momentum=0.9, quiet=True, sync_every=4)


def test_normal_training_never_triggers_the_check() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    centers = 3 * torch.randn(4, 5, generator=g)
    y = torch.arange(64) % 4
    x = centers[y] + 0.3 * torch.randn(64, 5, generator=g)
    data = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    h = fit(nn.Linear(5, 4), data, epochs=30, lr=0.5, quiet=True, sync_every=3)
    assert h["steps"] == 240 and h["loss"][-1] < 0.05 < h["loss"][0]


# -- checkpoints ----------------------------------------------------------------------------------

def saved(tmp_path: Path, **meta) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    path = tmp_path / "ck" / "m.pt"
    save_checkpoint(m, path, **meta)
    return m, path


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    m, path = saved(tmp_path, version=1)
    old = path.read_bytes()

    def half_then_fail(obj, f) -> None:
        f.write(old[: len(old) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(m, path, version=2)
    monkeypatch.undo()
    assert path.read_bytes() == old and os.listdir(path.parent) == ["m.pt"]
    assert load_checkpoint(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)), path) == {
        "version": 1}


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError,
                       match=f"checkpoint {re.escape(str(tmp_path / 'nope.pt'))} does not"):
        load_checkpoint(nn.Linear(5, 3), tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_checkpoint(nn.Linear(5, 3), tmp_path)


@pytest.mark.parametrize("cut", [0, 10, 0.5, -1])
def test_truncated_checkpoint_names_the_file(tmp_path: Path, cut: float) -> None:
    _, path = saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(cut * len(raw)) if isinstance(cut, float) else cut])
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as e:
        load_checkpoint(nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)), path)
    assert str(e.value).startswith(f"{path}: ") and "delete it or save it again" in str(e.value)


def test_a_torch_file_that_is_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is not a prunelib"):
        load_checkpoint(nn.Linear(5, 3), path)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_code_in_a_checkpoint_is_not_run(tmp_path: Path) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"state_dict": {}, "meta": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: not a readable"):
        load_checkpoint(nn.Linear(5, 3), path)
    assert not marker.exists()


def test_state_dict_mismatch_names_the_file(tmp_path: Path) -> None:
    _, path = saved(tmp_path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} does not match the "
                                              "Linear it is loaded into .*Missing key") as e:
        load_checkpoint(nn.Linear(5, 4), path)
    assert isinstance(e.value, RuntimeError)
    m = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    assert load_checkpoint(m, path) == {}
