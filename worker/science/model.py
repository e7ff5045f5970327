"""ApogeeDistBCNN: the Bayesian CNN of the astroNN distance pipeline, and its checkpoints.

The network (Leung & Bovy 2019; astroNN 1.1.0 ``ApogeeBCNN`` with ``hidden=[192, 64]`` as trained
for the DR17 distance catalog, and SDSS-V astra's PyTorch port
``astra/pipelines/astronn_dist/network.py``, class ``Network.ApogeeDistBCNN``)::

    x: continuum-normalized flux (B, 7514)
    x - input_mean                                   (B, 1, 7514)   float64 subtraction, then float32
    conv1   Conv1d(1 -> 2, k=8, 'same') + ReLU       (B, 2, 7514)
    dropout 0.3                                      (B, 2, 7514)
    conv2   Conv1d(2 -> 4, k=8, 'same') + ReLU       (B, 4, 7514)   (no dropout here)
    max pool 4 (floor: the last 2 pixels drop out)   (B, 4, 1878)
    flatten channel-last (Keras order t*4 + c)       (B, 7512)
    dropout 0.3                                      (B, 7512)
    dense_1 Linear(7512 -> 192) + ReLU               (B, 192)
    dropout 0.3                                      (B, 192)
    dense_2 Linear(192 -> 64) + ReLU                 (B, 64)        (no dropout after it)
    dense_output Linear(64 -> 1) + softplus          (B,)  fakemag / labels_std
    dense_var    Linear(64 -> 1)                     (B,)  log variance, in (label-std units)^2

Where the dropouts sit is what SDSS-V's ``forward`` does (dropout after conv1's ReLU, after the
flattened pooling and after dense_1's ReLU; none after conv2 or dense_2), and the same as astroNN's
Keras ``ApogeeBCNN.model()`` (``MCDropout`` after activation_1, the flattener and activation_3).
PyTorch's ``padding='same'`` with an even kernel pads 3 zeros on the left and 4 on the right, as
Keras/TensorFlow's 'same' does. The flatten order matters because dense_1's weights come from
Keras: ``permute(0, 2, 1)`` before flattening, as SDSS-V does.

Training and :meth:`ApogeeDistBCNN.forward` use ``nn.Dropout`` (active when ``net.training``);
MC-dropout inference has its own fast path in :mod:`astronn_dist.worker.science.inference`, tested against this
module's forward.

Checkpoints are SDSS-V's format: ``torch.save({"model_state_dict": state_dict, ...})``; the
state-dict names are the attribute names above (``conv1.weight``, ``dense_var.bias``,
``input_mean``, ``labels_std``, ...).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BCNNConfig",
    "ApogeeDistBCNN",
    "CheckpointError",
    "LoadedModel",
    "load_model",
    "save_checkpoint",
    "file_sha256",
]


@dataclass(frozen=True)
class BCNNConfig:
    """Architecture of ApogeeDistBCNN (the defaults are the DR17 distance model's)."""

    n_pixels: int = 7514  # continuum-normalized pixels after gap removal
    filters: tuple[int, int] = (2, 4)  # conv1, conv2 output channels
    filter_len: int = 8
    pool_length: int = 4
    hidden: tuple[int, int] = (192, 64)  # dense_1, dense_2 widths
    dropout_rate: float = 0.3

    @property
    def n_pooled(self) -> int:
        """Positions after max pooling (floor): 7514 // 4 = 1878."""
        return self.n_pixels // self.pool_length

    @property
    def n_flat(self) -> int:
        """Width of the flattened pooling output: 1878 * 4 = 7512."""
        return self.n_pooled * self.filters[1]


DropoutMasks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Kept units of the three dropout layers: conv1 output (B, 2, 7514), flattened pooling
(B, 7512), dense_1 output (B, 192); bool."""


class ApogeeDistBCNN(nn.Module):
    """The astroNN distance BCNN; ``forward`` returns (fakemag, log variance) in label-std units.

    Multiply the output by ``labels_std`` for fakemag; the predictive variance in fakemag units
    is ``exp(log_var) * labels_std**2``.
    """

    def __init__(self, config: BCNNConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or BCNNConfig()
        # Normalization constants travel with the weights. Buffers, not Parameters: they are not
        # trained (SDSS-V stores them as frozen Parameters; the state-dict entries are the same).
        self.register_buffer("input_mean", torch.zeros(cfg.n_pixels, dtype=torch.float64))
        self.register_buffer("labels_std", torch.ones(1, dtype=torch.float64))
        c1, c2 = cfg.filters
        # 'same' padding written out: (k-1)//2 zeros left, k//2 right (3 and 4 for k = 8), as
        # Keras and PyTorch's padding="same" both pad an even kernel; explicit, so that the
        # fast MC path can use the same numbers and PyTorch does not warn on every call.
        self.same_pad = ((cfg.filter_len - 1) // 2, cfg.filter_len // 2)
        self.conv1 = nn.Conv1d(1, c1, cfg.filter_len)
        self.conv2 = nn.Conv1d(c1, c2, cfg.filter_len)
        self.dense_1 = nn.Linear(cfg.n_flat, cfg.hidden[0])
        self.dense_2 = nn.Linear(cfg.hidden[0], cfg.hidden[1])
        self.dense_output = nn.Linear(cfg.hidden[1], 1)
        self.dense_var = nn.Linear(cfg.hidden[1], 1)
        self.dropout = nn.Dropout(cfg.dropout_rate)  # no state: adds nothing to the state dict

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: normalized flux (B, 7514), any float dtype -> (out (B,), log_var (B,)) float32."""
        h = self.features(x)  # (B, 64)
        out = F.softplus(self.dense_output(h)).squeeze(-1)  # (B,)
        log_var = self.dense_var(h).squeeze(-1)  # (B,)
        return out, log_var

    def features(self, x: torch.Tensor, keep: DropoutMasks | None = None) -> torch.Tensor:
        """What both heads read: dense_2's activations (B, 64), after every dropout.

        keep: explicit dropout masks (kept units True) instead of nn.Dropout's random ones;
        kept units are scaled by 1 / (1 - rate) either way (inverted dropout).
        """
        dtype = self.conv1.weight.dtype
        drop = self.dropout if keep is None else None
        scale = 1.0 / (1.0 - self.config.dropout_rate)

        def dropout(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return drop(h) if drop is not None else h * mask.to(h.dtype) * scale  # type: ignore[union-attr]

        k1, k2, k3 = keep if keep is not None else (None, None, None)
        # The mean is subtracted in float64 (it is stored so), as SDSS-V subtracts it in numpy.
        h = (x.to(torch.float64) - self.input_mean).to(dtype).unsqueeze(1)  # (B, 1, 7514)
        h = dropout(F.relu(self.conv1(F.pad(h, self.same_pad))), k1)  # (B, 2, 7514)
        h = F.relu(self.conv2(F.pad(h, self.same_pad)))  # (B, 4, 7514)
        h = F.max_pool1d(h, self.config.pool_length)  # (B, 4, 1878)
        h = h.permute(0, 2, 1).flatten(1)  # (B, 7512), Keras channel-last order: t * 4 + c
        h = dropout(h, k2)
        h = dropout(F.relu(self.dense_1(h)), k3)  # (B, 192)
        return F.relu(self.dense_2(h))  # (B, 64)

    def forward_with_masks(self, x: torch.Tensor, keep: DropoutMasks) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain reference forward with given dropout masks: (out (B,), log_var (B,)).

        keep: (conv1 output (B, 2, 7514), flattened pooling (B, 7512), dense_1 output (B, 192)),
        bool. astronn_dist.worker.science.inference's fast path must give the same numbers for the same masks
        (tests/test_inference.py); this is the readable definition it is checked against.
        """
        h = self.features(x, keep)
        return F.softplus(self.dense_output(h)).squeeze(-1), self.dense_var(h).squeeze(-1)


class CheckpointError(Exception):
    """A checkpoint file that cannot be used: unreadable, or not this network's weights."""


@dataclass
class LoadedModel:
    """A network ready for inference, with the identity results are recorded under.

    ``model_id`` is ``f"{file stem}-{sha256(file)[:12]}"``: the name people know, plus the
    content, so two different files with the same name never share results.
    ``metadata`` holds the checkpoint's other entries (model card, training history, ...).
    """

    net: ApogeeDistBCNN
    model_id: str
    path: Path
    device: torch.device
    metadata: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _why_unreadable(exc: BaseException) -> str:
    """A one-line reason from torch.load's (often long) error."""
    text = str(exc)
    unsupported = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), "")
    if unsupported:  # a real pickle, but of classes weights_only does not load
        return (
            "it holds Python objects other than tensors and plain containers, which are not "
            f"loaded for safety ({unsupported}); re-save it with astronn_dist.worker.science.model.save_checkpoint"
        )
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if "Weights only load failed" in first:  # the useful part is further down
        first = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln), first)
    return (
        f"not a readable PyTorch checkpoint, truncated or corrupt? ({type(exc).__name__}: "
        f"{first[:160]})"
    )


def _state_dict_of(obj: object, path: Path) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
    """Split a loaded checkpoint into (state dict, other entries); bare state dicts allowed."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, expected a dict with 'model_state_dict' "
            "or a state dict"
        )
    if "model_state_dict" in obj:
        state = obj["model_state_dict"]
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path}: 'model_state_dict' is a {type(state).__name__}, not a dict")
        return state, {k: v for k, v in obj.items() if k != "model_state_dict"}
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, {}
    keys = ", ".join(sorted(map(str, obj))[:8]) or "nothing"
    raise CheckpointError(
        f"{path}: no 'model_state_dict' and not a bare state dict (top-level keys: {keys})"
    )


def _check_state(state: Mapping[str, object], reference: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse missing, unexpected, misshaped, non-float and non-finite tensors, naming all."""
    problems = []
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing:
        problems.append("missing " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(map(str, unexpected)))
    for name, want in reference.items():
        got = state.get(name)
        if got is None:
            continue
        if not isinstance(got, torch.Tensor):
            problems.append(f"{name} is a {type(got).__name__}, not a tensor")
        elif tuple(got.shape) != tuple(want.shape):
            problems.append(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif not got.is_floating_point():
            problems.append(f"{name} has dtype {got.dtype}, expected a floating-point tensor")
        elif not bool(torch.isfinite(got).all()):
            problems.append(f"{name} has non-finite values")
    if not problems:
        labels_std = float(state["labels_std"].reshape(-1)[0])  # type: ignore[union-attr]
        if not labels_std > 0:
            problems.append(f"labels_std is {labels_std}, must be positive")
    if problems:
        raise CheckpointError(f"{path}: not an ApogeeDistBCNN checkpoint: " + "; ".join(problems))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint (SDSS-V format or a bare state dict) onto ``device``, in eval mode.

    Parameters
    ----------
    path
        ``torch.save`` of ``{"model_state_dict": {...}, ...}`` or of the state dict itself.
    device
        Where the network goes (``"cpu"``, ``"cuda:0"``, a ``torch.device``).

    Raises
    ------
    CheckpointError
        The file is missing, unreadable by ``torch.load(weights_only=True)``, or its tensors
        are not exactly ApogeeDistBCNN's (missing, unexpected, misshaped or non-finite ones are
        named), or ``labels_std`` is not positive.
    """
    path = Path(path)
    device = torch.device(device)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if device.type == "cuda" and device.index is None:
        # "cuda" means the current GPU; named with its index, as the tensors made there report
        # their device (the Predictor checks that its input lives on its own device)
        device = torch.device("cuda", torch.cuda.current_device())
    sha = file_sha256(path)
    try:
        # weights_only: a checkpoint is data, it must not be able to run code when loaded.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all mean "unreadable"
        raise CheckpointError(f"{path}: {_why_unreadable(exc)}") from exc
    state, metadata = _state_dict_of(obj, path)
    net = ApogeeDistBCNN()
    reference = net.state_dict()
    _check_state(state, reference, path)
    net.load_state_dict({k: state[k].to(reference[k].dtype) for k in reference}, strict=True)
    net.to(device).eval()
    return LoadedModel(net=net, model_id=f"{path.stem}-{sha[:12]}", path=path, device=device,
                       metadata=metadata)


def _plain(value: object, where: str) -> object:
    """``value`` as types ``torch.load(weights_only=True)`` accepts, or TypeError naming it."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):  # also int subclasses such as IntEnum
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (str, PurePath)):  # str subclasses too: torch.__version__ is one
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"save_checkpoint: {where} is a {type(value).__name__}; checkpoints hold only tensors, "
        "arrays, numbers, strings and lists/dicts of them (so they load with weights_only=True)"
    )


def save_checkpoint(net: ApogeeDistBCNN, path: str | os.PathLike, **extra: object) -> Path:
    """Write ``{"model_state_dict": ..., **extra}`` (SDSS-V's format) atomically; return the path.

    ``extra`` entries (a model card, training history, ...) are converted to plain types
    (numpy scalars to numbers, paths and ``torch.__version__`` to str, arrays to tensors) so
    that :func:`load_model` can read the file with ``weights_only=True``; anything else raises
    TypeError before the file is touched.
    """
    path = Path(path)
    if "model_state_dict" in extra:
        raise TypeError("save_checkpoint: 'model_state_dict' is written from net, not from extra")
    payload: dict[str, object] = {
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    }
    payload.update({k: _plain(v, k) for k, v in extra.items()})
    for name, tensor in payload["model_state_dict"].items():  # type: ignore[union-attr]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"save_checkpoint: {name} has non-finite values")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; workers may run as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

