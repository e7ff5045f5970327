"""The reference data the tests carry: the real DR17 apStar samples and astroNN's model metadata.

Everything lives inside the repository (``samples/apstar``, ``tests/data``; credits in
``tests/data/NOTICE.md``). A missing file is a broken checkout, so it fails loudly with the
path, never skips.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "apstar"
TEST_DATA = REPO / "tests" / "data"
ASTRONN_PARAMETERS = TEST_DATA / "astroNN_gaia_dr17_model_3.astroNN_model_parameter.json.gz"
"""astroNN's ``astroNN_model_parameter.json`` of the real DR17 distance model, gzipped."""


class MissingTestData(FileNotFoundError):
    """A file the tests ship is not where it belongs."""


def require(path: Path) -> Path:
    if not path.exists():
        raise MissingTestData(
            f"test data missing: {path} (it is part of the repository: restore it with "
            f"`git checkout -- {path.relative_to(REPO)}`)"
        )
    return path


def sample_files() -> list[Path]:
    """The real DR17 apStar files of ``samples/apstar``, sorted by name (bulge star first)."""
    files = sorted(require(SAMPLES).glob("apStar-*.fits"))
    if len(files) < 2:
        raise MissingTestData(f"expected the two real DR17 apStar files in {SAMPLES}, found {len(files)}")
    return files


@functools.cache
def _parameters() -> str:
    """The JSON text of astroNN's parameter file, exactly as astroNN wrote it."""
    return gzip.decompress(require(ASTRONN_PARAMETERS).read_bytes()).decode("utf-8")


def astronn_parameters() -> dict[str, Any]:
    """astroNN's parameters of the DR17 distance model: ``input_mean["input"]`` (7514 values),
    ``labels_std["output"]`` (1 value), normalization modes, hyperparameters. A fresh dict each
    call (callers may change it)."""
    return json.loads(_parameters())


def write_astronn_parameter_json(path: Path) -> Path:
    """Write the parameter file as astroNN's model folder has it (``astroNN_model_parameter.json``)."""
    path.write_text(_parameters(), encoding="utf-8")
    return path
