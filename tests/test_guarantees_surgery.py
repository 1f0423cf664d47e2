"""Surgery guarantees: checked keep indices, atomic saves, loads that check before they change."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunelib as pl
from prunelib.models import get_model

X = torch.randn(2, 3, 32, 32)


def small_resnet20(tmp_path: Path, name: str = "p.pt", **meta) -> tuple[nn.Module, Path]:
    model = get_model("resnet20").eval()
    groups = pl.channel_groups(model, X)
    small = pl.remove_channels(model, groups, {g.index: torch.arange(0, g.size, 2)
                                               for g in groups}).eval()
    path = tmp_path / name
    pl.save_pruned(small, path, model="resnet20", **meta)
    return small, path


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    """State (values) and layer attributes of a model, to compare before / after."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {n: {k: getattr(m, k) for k in ("in_channels", "out_channels", "num_features",
                                            "in_features", "out_features", "left", "right")
                 if hasattr(m, k)} for n, m in model.named_modules()}
    return state, attrs


def assert_untouched(model: nn.Module, before: tuple[dict, dict]) -> None:
    state, attrs = snapshot(model)
    assert state.keys() == before[0].keys()
    for k, v in state.items():
        assert v.shape == before[0][k].shape and torch.equal(v, before[0][k]), k
    assert attrs == before[1]


# --- keep indices ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r20():
    model = get_model("resnet20").eval()
    return model, pl.channel_groups(model, X)


@pytest.mark.parametrize("kept, err, match", [
    (torch.tensor([0.0, 1.0]), TypeError, r"keep\[1\] \(group 1, 16 channels, out: "
                                          r"layer1.0.conv1\) holds torch.float32 values"),
    (torch.ones(16, dtype=torch.bool), TypeError, r"keep\[1\] .* is a bool tensor.*nonzero"),
    ([0.5, 2], TypeError, r"keep\[1\] .* holds torch.float32 values"),
    (["a"], TypeError, r"keep\[1\] .* expected integer channel indices"),
    ([], ValueError, r"keep\[1\] .* is empty: the group would lose all its channels"),
    (torch.zeros(0, dtype=torch.long), ValueError, r"would lose all its channels"),
    ([3, 16, -1], ValueError, r"keep\[1\] .* indices out of range \[0, 16\): \[16, -1\]"),
    ([2, 5, 2, 5, 7], ValueError, r"keep\[1\] .* repeats indices \[2, 5\]"),
])
def test_bad_keep_values_name_the_group_and_the_problem(r20, kept, err, match):
    model, groups = r20
    before = snapshot(model)
    with pytest.raises(err, match=match):
        pl.remove_channels(model, groups, {1: kept})
    assert_untouched(model, before)


@pytest.mark.parametrize("key", [12, -1, "1", True, 1.0])
def test_keep_keyed_by_a_missing_group_is_refused(r20, key):
    model, groups = r20
    with pytest.raises(IndexError, match=rf"keep has group index {key!r}, but there are 12 "
                                         r"groups \(indices 0..11\)"):
        pl.remove_channels(model, groups, {key: [0]})


def test_keep_as_list_array_or_unsorted_tensor_gives_the_same_model(r20):
    model, groups = r20
    ref = pl.remove_channels(model, groups, {1: torch.tensor([1, 4, 9])}).eval()
    for key, kept in ((1, [9, 1, 4]), (np.int64(1), np.array([4, 9, 1])),
                      (1, torch.tensor([[9], [4], [1]])),
                      (1, torch.tensor([9, 1, 4], dtype=torch.int32))):
        other = pl.remove_channels(model, groups, {key: kept}).eval()
        assert other.layer1[0].conv1.out_channels == 3
        with torch.no_grad():
            assert torch.equal(ref(X), other(X))


# --- save -----------------------------------------------------------------------------------
def test_save_is_atomic_an_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    small, path = small_resnet20(tmp_path)
    old = path.read_bytes()

    def crash(obj, f):                     # writes half a file, then the process "dies"
        f.write(old[: len(old) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        pl.save_pruned(small, path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["p.pt"]          # no temporary file left behind
    loaded, meta = pl.load_pruned(get_model("resnet20"), path)
    assert meta == {"model": "resnet20"}


def test_save_refuses_meta_that_would_need_pickled_code_before_writing(tmp_path):
    model = get_model("resnet20")
    with pytest.raises(TypeError, match=r"meta when=object cannot be stored without pickling"):
        pl.save_pruned(model, tmp_path / "m.pt", model="resnet20", when=object())
    assert not (tmp_path / "m.pt").exists()
    pl.save_pruned(model, tmp_path / "m.pt", scores=torch.ones(3), widths=[16, {"a": (1, 2.5)}])
    _, meta = pl.load_pruned(get_model("resnet20"), tmp_path / "m.pt")
    assert torch.equal(meta["scores"], torch.ones(3)) and meta["widths"] == [16, {"a": (1, 2.5)}]


def test_saved_file_holds_plain_tensors_shapes_and_attributes(tmp_path):
    small, path = small_resnet20(tmp_path)
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"format", "state_dict", "shapes", "attrs", "meta"}
    assert blob["shapes"]["layer1.0.conv1.weight"] == [8, 8, 3, 3]
    assert blob["attrs"]["layer2.0.pad"] == {"left": 4, "right": 4}
    assert torch.equal(blob["state_dict"]["fc.weight"], small.fc.weight)


# --- load: the file is checked before the model changes --------------------------------------
def test_load_into_another_architecture_names_the_file_and_modules_and_leaves_it(tmp_path):
    model = get_model("resnet56")
    path = tmp_path / "r56.pt"
    pl.save_pruned(model, path, model="resnet56")
    dense = get_model("resnet20")
    before = snapshot(dense)
    with pytest.raises(ValueError, match=rf"{str(path)!r} needs modules that CifarResNet "
                                         r"lacks: layer1.3.bn1, layer1.3.bn2, .*\(\+\d+ more\) "
                                         r"\(the file says model='resnet56'\)"):
        pl.load_pruned(dense, path)
    assert_untouched(dense, before)
    vgg = get_model("vgg16")
    before = snapshot(vgg)
    with pytest.raises(ValueError, match=r"needs modules that .* lacks: .*layer1.0"):
        pl.load_pruned(vgg, path)
    assert_untouched(vgg, before)


def test_load_refuses_tensors_larger_than_the_architecture_or_another_kernel(tmp_path):
    def net(width: int, k: int = 3):
        return nn.Sequential(nn.Conv2d(3, width, k), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.Conv2d(width, 4, 1))
    pl.save_pruned(net(16), tmp_path / "wide.pt")
    dense = net(8)
    before = snapshot(dense)
    with pytest.raises(ValueError, match=r"'.*wide.pt' does not fit Sequential: 0.weight "
                                         r"\(16, 3, 3, 3\) vs \(8, 3, 3, 3\) in the model"):
        pl.load_pruned(dense, tmp_path / "wide.pt")
    assert_untouched(dense, before)
    pl.save_pruned(net(8, k=1), tmp_path / "k1.pt")
    with pytest.raises(ValueError, match=r"0.weight \(8, 3, 1, 1\) vs \(8, 3, 3, 3\)"):
        pl.load_pruned(dense, tmp_path / "k1.pt")
    assert_untouched(dense, before)


def test_load_refuses_a_file_missing_tensors_the_model_has(tmp_path):
    saved = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(8, 2, 1))
    pl.save_pruned(saved, tmp_path / "nobias.pt")
    dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 2, 1))
    before = snapshot(dense)
    with pytest.raises(ValueError, match=r"'.*nobias.pt' lacks tensors that Sequential has: "
                                         r"0.bias"):
        pl.load_pruned(dense, tmp_path / "nobias.pt")
    assert_untouched(dense, before)


def test_load_refuses_layer_attributes_that_do_not_fit(tmp_path):
    small, path = small_resnet20(tmp_path)
    blob = torch.load(path, weights_only=True)
    blob["attrs"]["layer1.0.conv1"]["padding"] = 7         # not a width attribute
    blob["attrs"]["layer2.0.pad"]["left"] = 99              # wider than the dense pad
    torch.save(blob, tmp_path / "bad.pt")
    dense = get_model("resnet20")
    before = snapshot(dense)
    with pytest.raises(ValueError, match=r"does not fit CifarResNet: layer1.0.conv1.padding=7 .*"
                                         r"layer2.0.pad.left=99 \(the model has 8\)"):
        pl.load_pruned(dense, tmp_path / "bad.pt")
    assert_untouched(dense, before)


@pytest.mark.parametrize("make, err, match", [
    (lambda p, good: None, FileNotFoundError, "no such file"),
    (lambda p, good: p.write_bytes(good[: len(good) // 2]), ValueError,
     "cannot be read: the file is corrupt or truncated"),
    (lambda p, good: p.write_bytes(b""), ValueError, "corrupt or truncated"),
    (lambda p, good: p.write_bytes(b"not a torch file at all" * 20), ValueError,
     "is corrupt or not a torch file"),
    (lambda p, good: torch.save(get_model("resnet20").state_dict(), p), ValueError,
     r"is not a file written by prunelib.save_pruned: it holds a dict with keys .*"
     r"a plain state_dict loads with model.load_state_dict"),
    (lambda p, good: torch.save(torch.ones(3), p), ValueError, "it holds a Tensor"),
    (lambda p, good: torch.save(nn.Linear(2, 2), p), ValueError,
     r"pickled objects that torch.load\(weights_only=True\) refuses"),
    (lambda p, good: p.mkdir(), ValueError, "is a directory"),
])
def test_every_load_error_names_the_file_and_leaves_the_model(tmp_path, make, err, match):
    _, good = small_resnet20(tmp_path, "good.pt")
    path = tmp_path / "bad.pt"
    make(path, good.read_bytes())
    dense = get_model("resnet20")
    before = snapshot(dense)
    with pytest.raises(err, match=match) as info:
        pl.load_pruned(dense, path)
    assert str(path) in str(info.value)
    assert info.value.__context__ is None or info.value.__suppress_context__   # no raw traceback
    assert_untouched(dense, before)


def test_inconsistent_file_is_refused(tmp_path):
    _, path = small_resnet20(tmp_path)
    blob = torch.load(path, weights_only=True)
    blob["shapes"]["fc.weight"] = [10, 64]                   # does not describe its tensor
    torch.save(blob, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"'.*odd.pt' is inconsistent .*fc.weight"):
        pl.load_pruned(get_model("resnet20"), tmp_path / "odd.pt")


def test_a_good_file_still_loads_exactly(tmp_path):
    small, path = small_resnet20(tmp_path, note="x")
    loaded, meta = pl.load_pruned(get_model("resnet20"), path)
    assert meta == {"model": "resnet20", "note": "x"}
    with torch.no_grad():
        assert torch.equal(small(X), loaded.eval()(X))
    assert pl.count(loaded, X) == pl.count(small, X)
