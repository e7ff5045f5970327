"""Importing an astroNN (Keras HDF5) distance model into the PyTorch checkpoint format.

The real DR17 weights are not public, so the tests write astroNN-format folders themselves: the
real ``astroNN_model_parameter.json`` of ``astroNN_gaia_dr17_model_3`` plus a ``model_weights.h5``
in Keras 2's HDF5 layout (what astroNN 1.1.0's ``keras_model.save()`` wrote under TensorFlow 2.5)
holding random weights. The imported network must reproduce a forward pass with Keras semantics
(``same`` padding, valid max pooling, channel-last flatten), computed here in numpy, on the real
apStar spectra; the ``reference`` test checks the same against Keras itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import torch

from _data import write_astronn_parameter_json  # noqa: E402 (tests/ is on sys.path)
from astronn_dist.worker.science.continuum import normalize  # noqa: E402
from astronn_dist.worker.modeling.import_astronn import (  # noqa: E402
    PARAMETER_FILE,
    WEIGHTS_FILE,
    AstroNNImportError,
    import_model,
)
from astronn_dist.worker.science.model import load_model  # noqa: E402
from astronn_dist.worker.science.spectra import read_apstar  # noqa: E402


# Keras kernel shapes of ApogeeBCNN as configured for the DR17 distance model.
SHAPES = {
    "conv1": (8, 1, 2),
    "conv2": (8, 2, 4),
    "dense_1": (7512, 192),
    "dense_2": (192, 64),
    "output": (64, 1),
    "variance": (64, 1),
}


def random_weights(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(kernel, bias) per role, float32. He-scaled (std sqrt(2 / fan_in)) rather than astroNN's
    RandomNormal(0, 0.05), so that differences between spectra survive to the outputs and a
    wrong layout would show."""
    rng = np.random.default_rng(seed)
    weights = {}
    for role, shape in SHAPES.items():
        fan_in = int(np.prod(shape[:-1]))
        kernel = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        weights[role] = (kernel, rng.normal(0.0, 0.05, shape[-1]).astype(np.float32))
    return weights


def keras2_layers(
    weights: dict, conv=("conv1d_3", "conv1d_4"), dense=("dense_6", "dense_7"), heads=("output", "variance_output")
) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Layer list in astroNN's ApogeeBCNN construction order, auto-generated-looking names."""

    def kb(role: str) -> list[tuple[str, np.ndarray]]:
        kernel, bias = weights[role]
        return [("kernel", kernel), ("bias", bias)]

    return [
        ("input", []),
        (conv[0], kb("conv1")),
        ("activation_12", []),
        ("mc_dropout_9", []),
        (conv[1], kb("conv2")),
        ("activation_13", []),
        ("max_pooling1d_3", []),
        ("flatten_3", []),
        ("mc_dropout_10", []),
        (dense[0], kb("dense_1")),
        ("activation_14", []),
        ("mc_dropout_11", []),
        (dense[1], kb("dense_2")),
        ("activation_15", []),
        ("labels_err", []),
        (heads[0], kb("output")),
        (heads[1], kb("variance")),
    ]


def write_keras_h5(
    path: Path,
    layers: list[tuple[str, list[tuple[str, np.ndarray]]]],
    *,
    full_model: bool = True,
    model_config: dict | None = None,
) -> None:
    """Write Keras 2's HDF5 layout (``hdf5_format.save_weights_to_hdf5_group``).

    ``full_model``: ``Model.save()`` puts the layer groups under ``model_weights`` (astroNN's
    case), ``save_weights()`` at the root. Names are fixed-length byte strings, weight names
    carry TensorFlow's ``:0`` suffix and are paths relative to the layer group.
    """
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.5.0"
        f.attrs["backend"] = b"tensorflow"
        if model_config is not None:
            f.attrs["model_config"] = json.dumps(model_config).encode()
        root = f.create_group("model_weights") if full_model else f
        root.attrs["layer_names"] = np.array([name.encode() for name, _ in layers], dtype="S")
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.5.0"
        for name, weights in layers:
            group = root.create_group(name)
            names = [f"{name}/{w}:0".encode() for w, _ in weights]
            group.attrs["weight_names"] = np.array(names, dtype="S") if names else np.array([])
            for (w, array), wname in zip(weights, names):
                group.create_dataset(wname.decode(), data=array)


def make_folder(root: Path, layers, **kwargs) -> Path:
    folder = root / "astroNN_gaia_dr17_model_3"
    folder.mkdir(parents=True)
    write_astronn_parameter_json(folder / PARAMETER_FILE)
    write_keras_h5(folder / WEIGHTS_FILE, layers, **kwargs)
    return folder


def keras_forward(x: np.ndarray, weights: dict, input_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ApogeeBCNN forward pass with dropout off, Keras semantics, float64 numpy.

    x: (B, 7514) normalized flux -> (fakemag head (B,), log-variance head (B,)) in label units.
    """

    def conv_same(h: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
        k = kernel.shape[0]
        # TensorFlow's 'same' puts the odd padding pixel on the right: 3 left, 4 right for k=8.
        padded = np.pad(h, ((0, 0), ((k - 1) // 2, k // 2), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, k, axis=1)  # (B, T, Cin, k)
        return np.einsum("btcj,jco->bto", windows, kernel.astype(np.float64)) + bias

    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    h = (x - input_mean)[:, :, None]  # (B, 7514, 1) channel-last
    h = relu(conv_same(h, *weights["conv1"]))  # (B, 7514, 2)
    h = relu(conv_same(h, *weights["conv2"]))  # (B, 7514, 4)
    t = h.shape[1] // 4
    h = h[:, : t * 4].reshape(len(h), t, 4, h.shape[2]).max(axis=2)  # (B, 1878, 4), valid pooling
    h = h.reshape(len(h), -1)  # (B, 7512), index t * 4 + c
    h = relu(h @ weights["dense_1"][0] + weights["dense_1"][1])
    h = relu(h @ weights["dense_2"][0] + weights["dense_2"][1])
    out = np.logaddexp(0.0, h @ weights["output"][0] + weights["output"][1])  # softplus
    log_var = h @ weights["variance"][0] + weights["variance"][1]
    return out[:, 0], log_var[:, 0]


@pytest.fixture(scope="module")
def spectra(apstar_files) -> np.ndarray:
    """The two real DR17 coadds, normalized: (2, 7514)."""
    loaded = [read_apstar(p) for p in apstar_files]
    flux, _ = normalize(
        np.stack([s.flux for s in loaded]), np.stack([s.err for s in loaded]), np.stack([s.bitmask for s in loaded])
    )
    return flux


def torch_forward(checkpoint: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, object]:
    model = load_model(checkpoint)
    net = model.net.eval()
    with torch.no_grad():
        out, log_var = net(torch.as_tensor(x, dtype=torch.float32))
    return out.double().numpy(), log_var.double().numpy(), net


def test_import_matches_keras_semantics(tmp_path, spectra):
    weights = random_weights(1)
    folder = make_folder(tmp_path, keras2_layers(weights))
    checkpoint = import_model(folder, tmp_path / "imported.pt")
    assert checkpoint == tmp_path / "imported.pt"

    params = json.loads((folder / PARAMETER_FILE).read_text())
    input_mean = np.asarray(params["input_mean"]["input"], dtype=np.float64)
    out, log_var, net = torch_forward(checkpoint, spectra)
    want_out, want_var = keras_forward(spectra, weights, input_mean)
    assert np.ptp(want_out) > 0 and np.ptp(want_var) > 0  # the two stars really differ
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_var, want_var, rtol=1e-5, atol=1e-6)

    # Normalization constants from the json, exactly; weights transposed to torch layouts.
    state = net.state_dict()
    assert state["input_mean"].dtype == torch.float64
    np.testing.assert_array_equal(state["input_mean"].numpy(), input_mean)
    assert state["labels_std"].item() == params["labels_std"]["output"][0]
    np.testing.assert_array_equal(state["conv1.weight"].numpy(), weights["conv1"][0].transpose(2, 1, 0))
    np.testing.assert_array_equal(state["dense_1.weight"].numpy(), weights["dense_1"][0].T)
    np.testing.assert_array_equal(state["dense_var.bias"].numpy(), weights["variance"][1])


def test_channel_last_flatten_is_required(tmp_path, spectra):
    """Guards the test itself: a channel-first dense_1 would give different numbers."""
    weights = random_weights(2)
    folder = make_folder(tmp_path, keras2_layers(weights))
    out, _, _ = torch_forward(import_model(folder, tmp_path / "m.pt"), spectra)
    permuted = dict(weights)
    kernel = weights["dense_1"][0]  # rows t * 4 + c; channel-first would be c * 1878 + t
    permuted["dense_1"] = (kernel.reshape(1878, 4, 192).transpose(1, 0, 2).reshape(7512, 192), weights["dense_1"][1])
    input_mean = np.asarray(json.loads((folder / PARAMETER_FILE).read_text())["input_mean"]["input"])
    wrong, _ = keras_forward(spectra, permuted, input_mean)
    assert not np.allclose(out, wrong, rtol=1e-3)


@pytest.mark.parametrize(
    "heads, first, config",
    [
        # astroNN's explicit names win even when the variance head is listed first
        (("variance_output", "output"), "variance", None),
        # auto-generated names: the softplus activation in model_config identifies fakemag
        (("dense_9", "dense_8"), "variance", {"dense_9": "linear", "dense_8": "softplus"}),
        # nothing but order: astroNN builds the fakemag head first
        (("dense_8", "dense_9"), "output", None),
    ],
)
def test_heads_are_told_apart(tmp_path, spectra, heads, first, config):
    weights = random_weights(3)
    layers = keras2_layers(weights, heads=heads)
    if first == "variance":  # write the variance head's weights under the first-listed name
        layers[-2], layers[-1] = (heads[0], layers[-1][1]), (heads[1], layers[-2][1])
    model_config = None
    if config is not None:
        model_config = {
            "class_name": "Functional",
            "config": {
                "layers": [
                    {"class_name": "Dense", "name": n, "config": {"name": n, "activation": a}}
                    for n, a in config.items()
                ]
            },
        }
    folder = make_folder(tmp_path, layers, model_config=model_config)
    _, _, net = torch_forward(import_model(folder, tmp_path / "m.pt"), spectra)
    np.testing.assert_array_equal(net.dense_output.weight.detach().numpy(), weights["output"][0].T)
    np.testing.assert_array_equal(net.dense_var.weight.detach().numpy(), weights["variance"][0].T)


def test_save_weights_layout_at_root(tmp_path, spectra):
    weights = random_weights(4)
    folder = make_folder(tmp_path, keras2_layers(weights), full_model=False)
    out, _, _ = torch_forward(import_model(folder, tmp_path / "m.pt"), spectra)
    input_mean = np.asarray(json.loads((folder / PARAMETER_FILE).read_text())["input_mean"]["input"])
    np.testing.assert_allclose(out, keras_forward(spectra, weights, input_mean)[0], rtol=1e-5, atol=1e-6)


def test_missing_files_are_named(tmp_path):
    folder = make_folder(tmp_path, keras2_layers(random_weights(5)))
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(AstroNNImportError, match=WEIGHTS_FILE):
        import_model(folder, tmp_path / "m.pt")
    (folder / PARAMETER_FILE).unlink()
    with pytest.raises(AstroNNImportError, match=PARAMETER_FILE):
        import_model(folder, tmp_path / "m.pt")
    with pytest.raises(AstroNNImportError, match="not a folder"):
        import_model(tmp_path / "nowhere", tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_missing_layer_and_wrong_shapes(tmp_path):
    weights = random_weights(6)
    layers = [layer for layer in keras2_layers(weights) if layer[0] != "dense_7"]
    folder = make_folder(tmp_path / "a", layers)
    with pytest.raises(AstroNNImportError, match=r"\(192, 64\)"):
        import_model(folder, tmp_path / "m.pt")

    wider = dict(weights)
    wider["conv2"] = (np.zeros((8, 2, 8), np.float32), np.zeros(8, np.float32))  # 8 filters, not 4
    folder = make_folder(tmp_path / "b", keras2_layers(wider))
    with pytest.raises(AstroNNImportError, match="Conv1D"):
        import_model(folder, tmp_path / "m.pt")


def test_incompatible_normalization_is_refused(tmp_path):
    folder = make_folder(tmp_path, keras2_layers(random_weights(7)))
    params = json.loads((folder / PARAMETER_FILE).read_text())
    params["labels_mean"]["output"] = [50.0]
    (folder / PARAMETER_FILE).write_text(json.dumps(params))
    with pytest.raises(AstroNNImportError, match="labels_mean"):
        import_model(folder, tmp_path / "m.pt")


@pytest.mark.reference
def test_import_matches_keras_model(tmp_path, spectra):
    """The same check against Keras itself: a Keras ApogeeBCNN saved by ``Model.save('.h5')``.

    astroNN 1.1.0's own model classes cannot be built with the TensorFlow/Keras 3 installed here
    (its losses import tensorflow_probability, which wants tf_keras), so the network is built
    layer for layer as ``ApogeeBCNN.model()`` does, with Keras's standard Dropout (off at predict).
    """
    pytest.importorskip("astroNN", reason="astroNN 1.1.0 (the `reference` extra) is not installed")
    keras = pytest.importorskip("keras")
    layers = keras.layers
    keras.utils.set_random_seed(0)
    init = keras.initializers.RandomNormal(0.0, 0.05, seed=0)
    x_in = keras.Input((7514, 1), name="input")
    err_in = keras.Input((1,), name="labels_err")
    h = layers.Conv1D(2, 8, padding="same", kernel_initializer=init, bias_initializer=init)(x_in)
    h = layers.Dropout(0.3)(layers.Activation("relu")(h))
    h = layers.Conv1D(4, 8, padding="same", kernel_initializer=init, bias_initializer=init)(h)
    h = layers.Flatten()(layers.MaxPooling1D(4)(layers.Activation("relu")(h)))
    h = layers.Dense(192, kernel_initializer=init, bias_initializer=init)(layers.Dropout(0.3)(h))
    h = layers.Dense(64, kernel_initializer=init, bias_initializer=init)(layers.Dropout(0.3)(layers.Activation("relu")(h)))
    h = layers.Activation("relu")(h)
    out = layers.Dense(1, activation="softplus", name="output", bias_initializer=init)(h)
    var = layers.Dense(1, activation="linear", name="variance_output", bias_initializer=init)(h)
    model = keras.Model([x_in, err_in], [out, var])

    folder = tmp_path / "astroNN_gaia_dr17_model_3"
    folder.mkdir()
    write_astronn_parameter_json(folder / PARAMETER_FILE)
    model.save(folder / WEIGHTS_FILE)  # legacy HDF5, as astroNN saves

    input_mean = np.asarray(json.loads((folder / PARAMETER_FILE).read_text())["input_mean"]["input"])
    x = (spectra - input_mean).astype(np.float32)[:, :, None]
    want_out, want_var = model.predict([x, np.zeros((len(x), 1), np.float32)], verbose=0)
    got_out, got_var, _ = torch_forward(import_model(folder, tmp_path / "m.pt"), spectra)
    np.testing.assert_allclose(got_out, want_out[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_var, want_var[:, 0], rtol=1e-5, atol=1e-6)
