"""The queue message: validation of what arrives, construction of what is sent.

A message is the keyword arguments of task ``astronn_dist.process`` (DESIGN.md, "Message")::

    {"spectra": [{"spectrum_id": str, "path": str, "k_mag": float|null, "ebv": float|null}, ...],
     ...optional provenance: "provenance": {str: scalar}, or top-level str/number/bool/null fields}

Anyone who can write to the broker can send one, so nothing in it is trusted: types are strict
(no str for a number, no bool for a number), sizes are bounded (a chunk of at most
:data:`MAX_CHUNK` spectra, strings of at most :data:`MAX_ID_CHARS` / :data:`MAX_PATH_CHARS`),
unknown keys are refused (a typo such as ``"kmag"`` would otherwise silently drop photometry) and,
when data roots are configured, paths outside them are refused.

Problems of the message as a whole (not a dict, no spectra, too many spectra, ...) raise
:class:`MessageError`. Problems of one spectrum do not spoil the others: :func:`split_message`
returns them as :class:`InvalidSpectrum` entries beside the valid requests, so the task can write a
no-result row for each one that has a usable ``spectrum_id`` and process the rest.
:func:`parse_message` is the strict form: any invalid spectrum raises.

Photometry that is NaN or +-inf is treated as missing (None): JSON has no such numbers, but
Python's encoder writes ``NaN``/``Infinity`` and its decoder reads them, so they do arrive.
Values outside the physical window (e.g. APOGEE's -9999.99) are kept: :mod:`astronn_dist.worker.science.distance`
decides what "missing" means and flags it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astronn_dist.worker.contract import MAX_CHUNK, MAX_ID_CHARS, MAX_PATH_CHARS, SpectrumRequest

__all__ = ["MAX_CHUNK", "MAX_ID_CHARS", "MAX_PATH_CHARS", "InvalidSpectrum", "MessageError",
           "ParsedMessage", "SpectrumRequest", "make_message", "parse_message", "split_message"]

MAX_PROVENANCE_KEYS = 32
MAX_PROVENANCE_CHARS = 1024
"""Bounds on the optional provenance: number of fields, length of a key or a string value."""

SPECTRUM_KEYS = frozenset({"spectrum_id", "path", "k_mag", "ebv"})
REQUIRED_SPECTRUM_KEYS = ("spectrum_id", "path")


class MessageError(ValueError):
    """The message as a whole is unusable; ``str()`` says what is wrong and what was expected."""


@dataclass(frozen=True)
class InvalidSpectrum:
    """One entry of ``spectra`` that cannot be processed.

    index: its position in the message; spectrum_id / path: the values if they are usable
    strings (a no-result row can be written only with a spectrum_id), else None; reason: why;
    k_mag / ebv: the entry's photometry where it is a usable number (kept in the no-result
    row, so a requeue sends it again), else None.
    """

    index: int
    spectrum_id: str | None
    path: str | None
    reason: str
    k_mag: float | None = None
    ebv: float | None = None

    def as_request(self) -> SpectrumRequest:
        """The entry as a request, for its no-result row (needs a spectrum_id)."""
        assert self.spectrum_id is not None
        return SpectrumRequest(self.spectrum_id, self.path or "", k_mag=self.k_mag, ebv=self.ebv)


@dataclass(frozen=True)
class ParsedMessage:
    """A validated message: the requests to process, the entries refused, the provenance."""

    requests: list[SpectrumRequest]
    invalid: list[InvalidSpectrum] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_string(value: Any, name: str, max_chars: int) -> str:
    """A non-empty str of at most ``max_chars`` characters, without NUL; else ValueError."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {_type_name(value)}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    if len(value) > max_chars:
        raise ValueError(f"{name} is {len(value)} characters long; at most {max_chars} allowed")
    if "\x00" in value:
        raise ValueError(f"{name} contains a NUL character")
    return value


def _check_photometry(value: Any, name: str) -> float | None:
    """A number (int or float, not bool) or null; NaN and +-inf become None (missing)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or null, got {_type_name(value)} {value!r:.40}")
    number = float(value)  # an int too large for a float raises OverflowError, caught below
    return number if math.isfinite(number) else None


def _inside_roots(path: str, roots: Sequence[Path]) -> bool:
    """Whether ``path`` lies in one of ``roots``.

    Checked lexically (``..`` removed, symlinks not followed: a symlink farm inside a data root is
    the operator's choice) and, when that fails, on the fully resolved path (a root given through
    a symlink, e.g. /data -> /mnt/data).
    """
    lexical = Path(os.path.normpath(os.path.abspath(path)))
    candidates = [lexical]
    try:
        candidates.append(lexical.resolve())
    except (OSError, RuntimeError):  # a symlink loop: the reader reports the file itself
        pass
    return any(c.is_relative_to(root) for c in candidates for root in roots)


def _parse_spectrum(entry: Any, roots: Sequence[Path]) -> SpectrumRequest:
    if not isinstance(entry, Mapping):
        raise ValueError(f"must be an object, got {_type_name(entry)}")
    missing = [k for k in REQUIRED_SPECTRUM_KEYS if k not in entry]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    unknown = sorted(str(k)[:40] for k in entry if k not in SPECTRUM_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(SPECTRUM_KEYS))}"
        )
    spectrum_id = _check_string(entry["spectrum_id"], "spectrum_id", MAX_ID_CHARS)
    path = _check_string(entry["path"], "path", MAX_PATH_CHARS)
    try:
        k_mag = _check_photometry(entry.get("k_mag"), "k_mag")
        ebv = _check_photometry(entry.get("ebv"), "ebv")
    except OverflowError as exc:
        raise ValueError(f"photometry out of range: {exc}") from None
    if roots and not _inside_roots(path, roots):
        raise ValueError(
            f"path {path!r} is outside the allowed data roots (ASTRONN_DIST_DATA_ROOTS: "
            f"{os.pathsep.join(str(r) for r in roots)})"
        )
    return SpectrumRequest(spectrum_id=spectrum_id, path=path, k_mag=k_mag, ebv=ebv)


def _usable_photometry(entry: Any, key: str) -> float | None:
    """``entry[key]`` if it is a usable number, for the no-result row of an invalid entry."""
    if not isinstance(entry, Mapping):
        return None
    try:
        return _check_photometry(entry.get(key), key)
    except (ValueError, OverflowError):
        return None


def _usable(entry: Any, key: str, max_chars: int) -> str | None:
    """``entry[key]`` if it is a valid string, for the no-result row of an invalid entry."""
    if not isinstance(entry, Mapping):
        return None
    try:
        return _check_string(entry.get(key), key, max_chars)
    except ValueError:
        return None


def _parse_provenance(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level fields other than ``spectra``, and a ``provenance`` object: JSON scalars only."""
    items: list[tuple[str, Any]] = [
        (k, v) for k, v in payload.items() if k not in ("spectra", "provenance")
    ]
    nested = payload.get("provenance")
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise MessageError(f"provenance must be an object, got {_type_name(nested)}")
        items.extend(nested.items())
    if len(items) > MAX_PROVENANCE_KEYS:
        raise MessageError(
            f"{len(items)} provenance fields; at most {MAX_PROVENANCE_KEYS} allowed"
        )
    out: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(key, str) or not key or len(key) > MAX_PROVENANCE_CHARS:
            raise MessageError(f"provenance key {str(key)[:40]!r} must be a short non-empty string")
        if isinstance(value, str):
            if len(value) > MAX_PROVENANCE_CHARS:
                raise MessageError(
                    f"provenance field {key!r} is {len(value)} characters long; "
                    f"at most {MAX_PROVENANCE_CHARS} allowed"
                )
        elif value is not None and not isinstance(value, (bool, int, float)):
            raise MessageError(
                f"provenance field {key!r} must be a string, number, boolean or null, "
                f"got {_type_name(value)}"
            )
        out[key] = value
    return out


def split_message(payload: Any, *, data_roots: Iterable[Path] = ()) -> ParsedMessage:
    """Validate a message; one bad spectrum does not spoil the others.

    Args:
        payload: the task's keyword arguments (decoded JSON).
        data_roots: folders spectra may be read from (empty: any path).

    Returns:
        The valid requests in message order, the invalid entries with reasons (a spectrum_id
        repeated in the message counts once: later copies are invalid, since two rows with the
        same key cannot come from one chunk), and the provenance fields.

    Raises:
        MessageError: the message as a whole is unusable (its text says why).
    """
    if not isinstance(payload, Mapping):
        raise MessageError(
            f"a message must be an object with key 'spectra', got {_type_name(payload)}"
        )
    if "spectra" not in payload:
        raise MessageError(
            "a message must have key 'spectra': a list of "
            '{"spectrum_id": str, "path": str, "k_mag": number|null, "ebv": number|null}'
        )
    spectra = payload["spectra"]
    if not isinstance(spectra, list):
        raise MessageError(f"'spectra' must be a list, got {_type_name(spectra)}")
    if not spectra:
        raise MessageError("'spectra' is empty: a message carries 1 to %d spectra" % MAX_CHUNK)
    if len(spectra) > MAX_CHUNK:
        raise MessageError(
            f"'spectra' has {len(spectra)} entries; at most {MAX_CHUNK} per message "
            "(split the chunk)"
        )
    provenance = _parse_provenance(payload)
    roots = tuple(data_roots)

    parsed: list[SpectrumRequest | InvalidSpectrum] = []
    for index, entry in enumerate(spectra):
        try:
            parsed.append(_parse_spectrum(entry, roots))
        except ValueError as exc:
            parsed.append(
                InvalidSpectrum(
                    index=index,
                    spectrum_id=_usable(entry, "spectrum_id", MAX_ID_CHARS),
                    path=_usable(entry, "path", MAX_PATH_CHARS),
                    reason=f"invalid message entry {index}: {exc}",
                    k_mag=_usable_photometry(entry, "k_mag"),
                    ebv=_usable_photometry(entry, "ebv"),
                )
            )

    # One row per spectrum_id: the first valid entry claims it; an invalid entry gets a row only
    # if no valid entry and no earlier invalid one has its id (else it is logged, without a row).
    requests: list[SpectrumRequest] = []
    invalid: list[InvalidSpectrum] = []
    claimed: set[str] = set()
    for index, item in enumerate(parsed):
        if isinstance(item, SpectrumRequest):
            if item.spectrum_id in claimed:
                invalid.append(
                    InvalidSpectrum(
                        index=index,
                        spectrum_id=None,
                        path=item.path,
                        reason=f"invalid message entry {index}: spectrum_id "
                        f"{item.spectrum_id!r} appears more than once in the message",
                    )
                )
                continue
            claimed.add(item.spectrum_id)
            requests.append(item)
    for item in parsed:
        if isinstance(item, InvalidSpectrum):
            if item.spectrum_id is not None and item.spectrum_id in claimed:
                item = dataclasses.replace(item, spectrum_id=None)
            elif item.spectrum_id is not None:
                claimed.add(item.spectrum_id)
            invalid.append(item)
    invalid.sort(key=lambda item: item.index)
    return ParsedMessage(requests=requests, invalid=invalid, provenance=provenance)


def parse_message(payload: Any, *, data_roots: Iterable[Path] = ()) -> list[SpectrumRequest]:
    """Validate a message strictly: every spectrum must be valid.

    Raises:
        MessageError (a ValueError): the first problem found, with the entry's index.
    """
    parsed = split_message(payload, data_roots=data_roots)
    if parsed.invalid:
        first = parsed.invalid[0]
        more = f" (and {len(parsed.invalid) - 1} more)" if len(parsed.invalid) > 1 else ""
        raise MessageError(first.reason + more)
    return parsed.requests


def make_message(
    requests: Sequence[SpectrumRequest], provenance: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The message for a chunk of requests (what the producer sends), validated on the way out.

    NaN photometry is sent as null, so the message is strict JSON.

    Raises:
        MessageError: the chunk would be refused by the worker.
    """
    spectra = [
        {
            "spectrum_id": r.spectrum_id,
            "path": r.path,
            "k_mag": None if r.k_mag is None or not math.isfinite(r.k_mag) else float(r.k_mag),
            "ebv": None if r.ebv is None or not math.isfinite(r.ebv) else float(r.ebv),
        }
        for r in requests
    ]
    message: dict[str, Any] = {"spectra": spectra}
    if provenance:
        message["provenance"] = dict(provenance)
    parse_message(message)
    return message
