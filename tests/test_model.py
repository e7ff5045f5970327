"""ApogeeDistBCNN and its checkpoints: SDSS-V's format in, clear refusals for bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import torch
import torch.nn.functional as F  # noqa: E402
from _data import astronn_parameters  # noqa: E402 (tests/ is on sys.path)

from astronn_dist.worker.science.model import (  # noqa: E402
    ApogeeDistBCNN,
    CheckpointError,
    file_sha256,
    load_model,
    save_checkpoint,
)

NAMES = {
    "input_mean": (7514,),
    "labels_std": (1,),
    "conv1.weight": (2, 1, 8),
    "conv1.bias": (2,),
    "conv2.weight": (4, 2, 8),
    "conv2.bias": (4,),
    "dense_1.weight": (192, 7512),
    "dense_1.bias": (192,),
    "dense_2.weight": (64, 192),
    "dense_2.bias": (64,),
    "dense_output.weight": (1, 64),
    "dense_output.bias": (1,),
    "dense_var.weight": (1, 64),
    "dense_var.bias": (1,),
}


@pytest.fixture(scope="module")
def sdss_state() -> dict[str, torch.Tensor]:
    """A state dict as SDSS-V's checkpoint has it: the real DR17 input_mean and labels_std
    (from astroNN's published model parameters), random weights, float64 constants."""
    params = astronn_parameters()
    gen = torch.Generator().manual_seed(7)
    state = {
        name: 0.05 * torch.randn(shape, generator=gen)
        for name, shape in NAMES.items()
        if name not in ("input_mean", "labels_std")
    }
    state["input_mean"] = torch.tensor(params["input_mean"]["input"], dtype=torch.float64)
    state["labels_std"] = torch.tensor(params["labels_std"]["output"], dtype=torch.float64)
    return state


def _write(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def test_state_dict_names_and_shapes_are_sdss_vs():
    state = ApogeeDistBCNN().state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == NAMES
    assert state["input_mean"].dtype == torch.float64
    assert state["labels_std"].dtype == torch.float64


def test_load_sdss_dict_and_bare_state_dict(tmp_path, sdss_state):
    wrapped = _write(tmp_path / "sdss.pt", {"model_state_dict": sdss_state, "epoch": 30})
    bare = _write(tmp_path / "bare.pt", sdss_state)
    a, b = load_model(wrapped), load_model(bare)
    for loaded in (a, b):
        assert not loaded.net.training  # ready for inference
        assert loaded.device == torch.device("cpu")
        got = loaded.net.state_dict()
        for name, want in sdss_state.items():
            assert torch.equal(got[name], want.to(got[name].dtype)), name
    assert a.metadata == {"epoch": 30}
    assert a.net.labels_std.item() == pytest.approx(100.74461800324214)
    assert a.net.input_mean.dtype == torch.float64


def test_model_id_is_stem_plus_content_hash(tmp_path, sdss_state):
    path = _write(tmp_path / "astronn-dr17.pt", {"model_state_dict": sdss_state})
    model_id = load_model(path).model_id
    assert model_id == f"astronn-dr17-{file_sha256(path)[:12]}"
    assert load_model(path).model_id == model_id  # stable
    # Same bytes under another folder: same id. One weight changed: another id.
    (tmp_path / "copy").mkdir()
    same = tmp_path / "copy" / "astronn-dr17.pt"
    same.write_bytes(path.read_bytes())
    assert load_model(same).model_id == model_id
    changed = dict(sdss_state)
    changed["dense_var.bias"] = changed["dense_var.bias"] + 1e-3
    (tmp_path / "changed").mkdir()
    other = _write(tmp_path / "changed" / "astronn-dr17.pt", {"model_state_dict": changed})
    other_id = load_model(other).model_id
    assert other_id.startswith("astronn-dr17-") and other_id != model_id


def test_save_checkpoint_roundtrip_with_extras(tmp_path, sdss_state):
    net = ApogeeDistBCNN()
    net.load_state_dict(sdss_state)
    history = [{"epoch": 1, "loss": np.float32(0.5)}, {"epoch": 2, "loss": 0.25}]
    card = {"name": "demo", "torch_version": torch.__version__, "where": tmp_path, "n": np.int64(3)}
    path = save_checkpoint(net, tmp_path / "sub" / "m.pt", model_card=card, history=history)
    # The file is SDSS-V's layout and loads with plain weights_only torch.load.
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model_state_dict", "model_card", "history"}
    assert set(raw["model_state_dict"]) == set(NAMES)
    loaded = load_model(path)
    assert loaded.metadata["model_card"] == {
        "name": "demo", "torch_version": str(torch.__version__), "where": str(tmp_path), "n": 3
    }
    assert loaded.metadata["history"][0]["loss"] == 0.5
    x = torch.rand(3, 7514, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        for want, got in zip(net(x), loaded.net(x)):
            assert torch.equal(want, got)
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed away
    with pytest.raises(TypeError, match="model_card.fn"):
        save_checkpoint(net, tmp_path / "bad.pt", model_card={"fn": object()})
    assert not (tmp_path / "bad.pt").exists()


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_forward_is_sdss_v_semantics(sdss_state):
    """forward() equals SDSS-V's forward written with functional ops (dropout off): padding
    'same' for the even kernel, pooling, channel-last flatten, softplus head."""
    net = ApogeeDistBCNN()
    net.load_state_dict(sdss_state)
    net.eval()
    s = {k: v.float() for k, v in sdss_state.items() if k not in ("input_mean", "labels_std")}
    gen = torch.Generator().manual_seed(3)
    flux = 1.0 + 0.05 * torch.randn(4, 7514, generator=gen, dtype=torch.float64)
    x = (flux - sdss_state["input_mean"]).float()[:, None, :]
    h = F.relu(F.conv1d(x, s["conv1.weight"], s["conv1.bias"], padding="same"))
    h = F.relu(F.conv1d(h, s["conv2.weight"], s["conv2.bias"], padding="same"))
    h = torch.flatten(F.max_pool1d(h, 4).permute(0, 2, 1), start_dim=1)
    h = F.relu(F.linear(h, s["dense_1.weight"], s["dense_1.bias"]))
    h = F.relu(F.linear(h, s["dense_2.weight"], s["dense_2.bias"]))
    want_out = F.softplus(F.linear(h, s["dense_output.weight"], s["dense_output.bias"]))[:, 0]
    want_var = F.linear(h, s["dense_var.weight"], s["dense_var.bias"])[:, 0]
    with torch.no_grad():
        out, log_var = net(flux)
    assert out.shape == log_var.shape == (4,)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_var, want_var, rtol=1e-5, atol=1e-6)
    # The check has teeth: the same weights with a channel-first flatten differ.
    h = F.relu(F.conv1d(F.relu(F.conv1d(x, s["conv1.weight"], s["conv1.bias"], padding="same")),
                        s["conv2.weight"], s["conv2.bias"], padding="same"))
    h = F.relu(F.linear(torch.flatten(F.max_pool1d(h, 4), 1), s["dense_1.weight"], s["dense_1.bias"]))
    h = F.relu(F.linear(h, s["dense_2.weight"], s["dense_2.bias"]))
    channel_first = F.softplus(F.linear(h, s["dense_output.weight"], s["dense_output.bias"]))[:, 0]
    assert not torch.allclose(channel_first, out, rtol=1e-3)


def test_dropout_follows_training_mode(sdss_state):
    net = ApogeeDistBCNN()
    net.load_state_dict(sdss_state)
    x = 1.0 + 0.05 * torch.randn(2, 7514, dtype=torch.float64)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x)[0], net(x)[0])
        net.train()
        torch.manual_seed(0)
        assert not torch.equal(net(x)[0], net(x)[0])


# ------------------------------------------------------------------------------------------
# Refusals: each names what is wrong.


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "nope.pt")


def test_truncated_file_refused(tmp_path, sdss_state):
    good = _write(tmp_path / "good.pt", {"model_state_dict": sdss_state})
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a readable PyTorch checkpoint"):
        load_model(bad)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(junk)


def test_pickled_objects_refused(tmp_path, sdss_state):
    """weights_only: a file that would run code (any non-tensor class) is refused, not loaded."""
    path = _write(tmp_path / "obj.pt", {"model_state_dict": sdss_state, "when": Path("/x")})
    with pytest.raises(CheckpointError, match="not loaded for safety"):
        load_model(path)


def test_misshaped_tensor_named(tmp_path, sdss_state):
    state = dict(sdss_state)
    state["dense_1.weight"] = torch.zeros(192, 7514)  # a channel-first/unpooled mix-up
    path = _write(tmp_path / "shape.pt", {"model_state_dict": state})
    with pytest.raises(CheckpointError, match=r"dense_1\.weight has shape \(192, 7514\), expected \(192, 7512\)"):
        load_model(path)


def test_missing_tensor_named(tmp_path, sdss_state):
    state = {k: v for k, v in sdss_state.items() if k != "dense_var.bias"}
    path = _write(tmp_path / "missing.pt", {"model_state_dict": state})
    with pytest.raises(CheckpointError, match=r"missing dense_var\.bias"):
        load_model(path)


def test_extra_tensor_named(tmp_path, sdss_state):
    state = dict(sdss_state, **{"dense_3.weight": torch.zeros(3)})
    path = _write(tmp_path / "extra.pt", state)  # bare state dict
    with pytest.raises(CheckpointError, match=r"unexpected dense_3\.weight"):
        load_model(path)


def test_non_finite_and_bad_constants_refused(tmp_path, sdss_state):
    state = dict(sdss_state)
    state["conv2.weight"] = sdss_state["conv2.weight"].clone()
    state["conv2.weight"][0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"conv2\.weight has non-finite values"):
        load_model(_write(tmp_path / "nan.pt", {"model_state_dict": state}))
    state = dict(sdss_state, labels_std=torch.zeros(1, dtype=torch.float64))  # SDSS-V's init value
    with pytest.raises(CheckpointError, match="labels_std is 0.0, must be positive"):
        load_model(_write(tmp_path / "zero.pt", {"model_state_dict": state}))
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_model(_write(tmp_path / "list.pt", [1, 2]))
    with pytest.raises(CheckpointError, match="no 'model_state_dict'"):
        load_model(_write(tmp_path / "other.pt", {"weights": {"a": 1}}))
