"""Convert a published astroNN distance model (Keras HDF5) into this project's PyTorch checkpoint.

An astroNN model folder, e.g. ``astroNN_gaia_dr17_model_3/``, holds

- ``astroNN_model_parameter.json``: hyperparameters and the normalization constants
  (``input_mean`` of the 7514 normalized pixels, ``labels_std`` of fakemag);
- ``model_weights.h5``: the Keras model. astroNN 1.1.0 writes it with ``keras_model.save()``, so
  the layers live under the group ``model_weights``; a bare ``save_weights()`` file keeps them
  at the root. Both are accepted. Each layer is a group named after the layer, its attribute
  ``weight_names`` lists dataset paths relative to that group (``conv1d_3/kernel:0`` in Keras 2,
  ``conv1d_3/kernel`` in Keras 3's legacy writer); the root (or ``model_weights``) attribute
  ``layer_names`` lists the layers in the model's construction order.

The file is read with h5py only: importing TensorFlow for a handful of arrays would drag a
gigabyte of dependencies into the worker.

Layers are found by role and shape, never by their auto-generated names (``conv1d_7`` depends on
how many layers the Python session had built before):

============== ================================ ============================ ==================
torch name     Keras layer                      Keras kernel                  torch weight
============== ================================ ============================ ==================
``conv1``      Conv1D, 1 input channel          (8, 1, 2)  (k, in, out)       (2, 1, 8)
``conv2``      Conv1D, 2 input channels         (8, 2, 4)                     (4, 2, 8)
``dense_1``    Dense on the flattened pooling   (7512, 192) (in, out)         (192, 7512)
``dense_2``    Dense                            (192, 64)                     (64, 192)
``dense_output`` Dense, softplus (fakemag)      (64, 1)                       (1, 64)
``dense_var``  Dense, linear (log-variance)     (64, 1)                       (1, 64)
============== ================================ ============================ ==================

Keras kernels are transposed to PyTorch's layouts (a Conv1D kernel ``(k, in, out)`` becomes
``(out, in, k)``, a Dense kernel ``(in, out)`` becomes ``(out, in)``). The flattening order needs
no permutation: Keras flattens the pooled ``(1878, 4)`` feature map channel-last (index
``t * 4 + c``) and so does :class:`astronn_dist.worker.science.model.ApogeeDistBCNN`.

Telling the two ``(64, 1)`` heads apart, in order of preference:

1. names: astroNN names them explicitly (``output`` and ``variance_output``), so a head whose
   name contains ``var`` is the log-variance head;
2. the model configuration stored in the file (``model_config``): the fakemag head is the Dense
   layer with ``softplus`` activation, the variance head is ``linear``;
3. order: astroNN builds ``output`` before ``variance_output`` and Keras lists layers in
   construction order, so the first of the two in ``layer_names`` is the fakemag head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

PARAMETER_FILE = "astroNN_model_parameter.json"
WEIGHTS_FILE = "model_weights.h5"

N_PIXELS = 7514
FILTERS = (2, 4)
FILTER_LEN = 8
POOL_LENGTH = 4
HIDDEN = (192, 64)
N_FLAT = (N_PIXELS // POOL_LENGTH) * FILTERS[1]  # 1878 pooled positions x 4 channels = 7512


class AstroNNImportError(ValueError):
    """The folder is not an astroNN ApogeeBCNN-type distance model this importer understands."""


@dataclass(frozen=True)
class _KerasLayer:
    """One Keras layer that carries weights: its name, position and (kernel, bias) arrays."""

    name: str
    index: int
    kernel: np.ndarray
    bias: np.ndarray


def _decode(value: object) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def read_parameters(path: Path) -> dict:
    """Read and check ``astroNN_model_parameter.json``; return the parts the network needs.

    Returns a dict with ``input_mean`` (float64, (7514,)), ``labels_std`` (float, fakemag units),
    ``id`` (astroNN class name) and ``parameters`` (the whole json, for provenance).
    """
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError:
        raise AstroNNImportError(f"{path}: missing; an astroNN model folder holds {PARAMETER_FILE}")
    except json.JSONDecodeError as exc:
        raise AstroNNImportError(f"{path}: not valid JSON ({exc})") from exc

    def need(key: str) -> object:
        if key not in params:
            raise AstroNNImportError(f"{path}: no '{key}' entry; is this an astroNN model?")
        return params[key]

    # The architecture the PyTorch network hard-codes; anything else would load wrong weights.
    expected = {"filternum": list(FILTERS), "filterlen": FILTER_LEN, "hidden": list(HIDDEN)}
    for key, value in expected.items():
        if key in params and params[key] != value:
            raise AstroNNImportError(
                f"{path}: {key} = {params[key]}, but ApogeeDistBCNN has {value}"
            )
    if params.get("pool_length", POOL_LENGTH) != POOL_LENGTH:
        raise AstroNNImportError(f"{path}: pool_length {params['pool_length']} != {POOL_LENGTH}")
    activation = params.get("last_layer_activation", "softplus")
    if activation != "softplus":
        raise AstroNNImportError(
            f"{path}: last_layer_activation is {activation!r}; ApogeeDistBCNN applies softplus"
        )

    input_mean = np.asarray(need("input_mean")["input"], dtype=np.float64).ravel()
    if input_mean.shape != (N_PIXELS,):
        raise AstroNNImportError(
            f"{path}: input_mean has {input_mean.size} values, expected {N_PIXELS} pixels"
        )
    # The network divides nothing by an input std and adds no label mean (modes 3 and 4):
    # a model trained otherwise cannot be represented by the checkpoint format.
    input_std = np.asarray(params.get("input_std", {}).get("input", [1.0]), dtype=np.float64)
    if not np.all(input_std == 1.0):
        raise AstroNNImportError(f"{path}: input_std is not 1 (input normalization mode 3 expected)")
    labels_std_all = need("labels_std")
    labels_std = float(np.asarray(labels_std_all.get("output", [np.nan])).ravel()[0])
    labels_mean = np.asarray(params.get("labels_mean", {}).get("output", [0.0]), dtype=np.float64)
    if not np.all(labels_mean == 0.0):
        raise AstroNNImportError(
            f"{path}: labels_mean is {labels_mean.tolist()}, but the network scales fakemag "
            "without centering it (label normalization mode 4)"
        )
    if not (np.isfinite(labels_std) and labels_std > 0):
        raise AstroNNImportError(f"{path}: labels_std['output'] = {labels_std} is not positive")
    return {
        "input_mean": input_mean,
        "labels_std": labels_std,
        "id": str(params.get("id", "")),
        "parameters": params,
    }


def _read_keras_layers(path: Path) -> tuple[list[_KerasLayer], dict[str, str], str | None]:
    """Layers with weights, in ``layer_names`` order; Dense activations from ``model_config``.

    Returns ``(layers, activations, keras_version)``; ``activations`` maps layer name to
    activation for the Dense layers the file's model configuration describes (empty without one).
    """
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise AstroNNImportError(f"{path}: missing; an astroNN model folder holds {WEIGHTS_FILE}")
    except OSError as exc:
        raise AstroNNImportError(f"{path}: not an HDF5 file ({exc})") from exc
    with handle:
        # keras_model.save() nests the weights under "model_weights"; save_weights() does not.
        root = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" not in root.attrs:
            raise AstroNNImportError(
                f"{path}: no 'layer_names' attribute; not a Keras HDF5 model or weights file"
            )
        version = root.attrs.get("keras_version", handle.attrs.get("keras_version"))
        layers: list[_KerasLayer] = []
        for index, raw_name in enumerate(root.attrs["layer_names"]):
            name = _decode(raw_name)
            if name not in root:
                raise AstroNNImportError(f"{path}: layer '{name}' is listed but has no group")
            group = root[name]
            arrays = [np.asarray(group[_decode(w)]) for w in group.attrs.get("weight_names", [])]
            if not arrays:
                continue  # Input, Activation, Dropout, pooling, Flatten: nothing to carry over
            kernels = [a for a in arrays if a.ndim >= 2]
            biases = [a for a in arrays if a.ndim == 1]
            if len(arrays) != 2 or len(kernels) != 1 or len(biases) != 1:
                shapes = [a.shape for a in arrays]
                raise AstroNNImportError(
                    f"{path}: layer '{name}' holds weights of shapes {shapes}; expected one kernel "
                    "and one bias (a Conv1D or Dense layer of ApogeeBCNN)"
                )
            layers.append(_KerasLayer(name, index, kernels[0], biases[0]))

        activations: dict[str, str] = {}
        config = handle.attrs.get("model_config")
        if config is not None:
            try:
                model_config = json.loads(_decode(config))
                for layer in model_config.get("config", {}).get("layers", []):
                    if layer.get("class_name") == "Dense":
                        cfg = layer.get("config", {})
                        activations[cfg.get("name", layer.get("name"))] = str(cfg.get("activation"))
            except (json.JSONDecodeError, AttributeError):
                activations = {}  # an unreadable config only costs us one of three hints
    return layers, activations, (_decode(version) if version is not None else None)


def _one(candidates: list[_KerasLayer], what: str, shape: tuple[int, ...], path: Path) -> _KerasLayer:
    if len(candidates) != 1:
        found = ", ".join(f"{c.name} {c.kernel.shape}" for c in candidates) or "none"
        raise AstroNNImportError(
            f"{path}: expected exactly one {what} layer with kernel shape {shape}; found {found}"
        )
    return candidates[0]


def _split_heads(heads: list[_KerasLayer], activations: dict[str, str]) -> tuple[_KerasLayer, _KerasLayer]:
    """(fakemag head, log-variance head) among the two Dense (64, 1) layers; see module doc."""
    named_var = [h for h in heads if "var" in h.name.lower()]
    if len(named_var) == 1:
        var = named_var[0]
        return next(h for h in heads if h is not var), var
    softplus = [h for h in heads if activations.get(h.name) == "softplus"]
    if len(softplus) == 1:
        out = softplus[0]
        return out, next(h for h in heads if h is not out)
    first, second = sorted(heads, key=lambda h: h.index)
    return first, second


def map_keras_weights(path: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """Read ``model_weights.h5``; return the torch state-dict entries of the weights (float32).

    The keys are ``conv1.weight``, ``conv1.bias``, ... ``dense_var.bias``; the arrays are already
    in PyTorch layouts. Also returns the Keras version that wrote the file (or None).
    """
    layers, activations, version = _read_keras_layers(path)
    convs = [layer for layer in layers if layer.kernel.ndim == 3]
    denses = [layer for layer in layers if layer.kernel.ndim == 2]
    other = [layer for layer in layers if layer.kernel.ndim not in (2, 3)]
    if other:
        raise AstroNNImportError(
            f"{path}: unexpected layer(s) {[(o.name, o.kernel.shape) for o in other]}"
        )

    k, (f1, f2), (h1, h2) = FILTER_LEN, FILTERS, HIDDEN
    conv1 = _one([c for c in convs if c.kernel.shape == (k, 1, f1)], "Conv1D", (k, 1, f1), path)
    conv2 = _one([c for c in convs if c.kernel.shape == (k, f1, f2)], "Conv1D", (k, f1, f2), path)
    dense_1 = _one([d for d in denses if d.kernel.shape == (N_FLAT, h1)], "Dense", (N_FLAT, h1), path)
    dense_2 = _one([d for d in denses if d.kernel.shape == (h1, h2)], "Dense", (h1, h2), path)
    heads = [d for d in denses if d.kernel.shape == (h2, 1)]
    if len(heads) != 2:
        raise AstroNNImportError(
            f"{path}: expected two Dense output heads with kernel shape ({h2}, 1) (fakemag and "
            f"its log-variance); found {[h.name for h in heads]}"
        )
    if len(convs) != 2 or len(denses) != 4:
        raise AstroNNImportError(
            f"{path}: expected 2 Conv1D and 4 Dense layers, found "
            f"{[(c.name, c.kernel.shape) for c in layers]}"
        )
    output, variance = _split_heads(heads, activations)

    state: dict[str, np.ndarray] = {}
    for torch_name, layer in (("conv1", conv1), ("conv2", conv2)):
        # Keras Conv1D kernel (k, in, out) -> torch Conv1d weight (out, in, k).
        state[f"{torch_name}.weight"] = np.ascontiguousarray(layer.kernel.transpose(2, 1, 0))
        state[f"{torch_name}.bias"] = layer.bias
    for torch_name, layer in (
        ("dense_1", dense_1),
        ("dense_2", dense_2),
        ("dense_output", output),
        ("dense_var", variance),
    ):
        # Keras Dense kernel (in, out) -> torch Linear weight (out, in). dense_1's input order
        # is channel-last in both frameworks, so no row permutation is needed.
        state[f"{torch_name}.weight"] = np.ascontiguousarray(layer.kernel.T)
        state[f"{torch_name}.bias"] = layer.bias
    for name, array in state.items():
        if not np.all(np.isfinite(array)):
            raise AstroNNImportError(f"{path}: non-finite values in the weights of {name}")
    return {name: array.astype(np.float32) for name, array in state.items()}, version


def import_model(folder: Path, out: Path) -> Path:
    """Convert an astroNN model folder into a checkpoint that :func:`astronn_dist.worker.science.model.load_model` reads.

    Parameters
    ----------
    folder : Path
        astroNN model folder with ``astroNN_model_parameter.json`` and ``model_weights.h5``.
    out : Path
        Checkpoint to write (``torch.save`` of ``{"model_state_dict": ..., ...}``).

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    AstroNNImportError
        Missing files, missing or extra layers, shapes that do not match ApogeeDistBCNN, or
        normalization constants the checkpoint format cannot represent.
    """
    import torch

    from astronn_dist.worker.science.model import ApogeeDistBCNN, save_checkpoint

    folder = Path(folder)
    if not folder.is_dir():
        raise AstroNNImportError(f"{folder}: not a folder; give the astroNN model folder")
    params = read_parameters(folder / PARAMETER_FILE)
    weights, keras_version = map_keras_weights(folder / WEIGHTS_FILE)

    net = ApogeeDistBCNN()
    reference = net.state_dict()
    state = {}
    for name, array in weights.items():
        if tuple(reference[name].shape) != array.shape:  # the torch model's contract changed?
            raise AstroNNImportError(
                f"{name}: converted shape {array.shape} != ApogeeDistBCNN's {tuple(reference[name].shape)}"
            )
        state[name] = torch.as_tensor(array, dtype=reference[name].dtype)
    state["input_mean"] = torch.as_tensor(params["input_mean"], dtype=reference["input_mean"].dtype)
    state["labels_std"] = torch.tensor([params["labels_std"]], dtype=reference["labels_std"].dtype)
    net.load_state_dict(state, strict=True)

    parameters = {k: v for k, v in params["parameters"].items() if k not in ("input_mean", "input_std")}
    return save_checkpoint(
        net,
        Path(out),
        source="astroNN",
        astronn_folder=folder.name,
        astronn_id=params["id"],
        astronn_parameters=parameters,
        keras_version=keras_version,
    )
