"""Configuration: every setting the service reads, in one place.

Command-line flags override these environment variables; nothing else reads ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from astronn_dist.worker.contract import QUEUE, TASK_NAME  # noqa: F401  (re-exported with the settings)

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
DEFAULT_DATABASE_URL = "sqlite:///astronn-dist.sqlite"
# Longer than the longest chunk can take (a few hundred spectra at 100 MC passes on a slow CPU
# is minutes), short enough that a dead worker's message comes back in bounded time.
DEFAULT_VISIBILITY_TIMEOUT_S = 1800
DEFAULT_MC_PASSES = 100
DEFAULT_SEED = 0
# Prometheus metrics of a worker (0: off). 9808 is free in Prometheus's port allocations list.
DEFAULT_METRICS_PORT = 9808
# All interfaces, so that a Prometheus on another host can scrape; 127.0.0.1 keeps it local.
DEFAULT_METRICS_ADDR = "0.0.0.0"

BUNDLED_MODEL = Path(__file__).parent / "models" / "astronn-dist-demo.pt"
LOG_FORMATS = ("text", "json")  # astronn_dist.worker.service.logs


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def _secret_from_file(url: str | None, file_var: str) -> str | None:
    """A URL may also come from a file (Docker/Kubernetes secrets): ``<VAR>_FILE``."""
    path = _env(file_var)
    if path:
        return Path(path).read_text().strip()
    return url


@dataclass(frozen=True)
class Settings:
    broker_url: str = DEFAULT_BROKER_URL
    database_url: str = DEFAULT_DATABASE_URL
    model_path: Path = BUNDLED_MODEL
    device: str = "auto"
    visibility_timeout_s: int = DEFAULT_VISIBILITY_TIMEOUT_S
    data_roots: tuple[Path, ...] = field(default_factory=tuple)
    mc_passes: int = DEFAULT_MC_PASSES
    seed: int = DEFAULT_SEED
    # A chunk whose worker died this many times is parked as failed instead of looping forever.
    max_deliveries: int = 5
    # Retries of a chunk after a transient failure before its spectra get no-result rows.
    max_retries: int = 5
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_addr: str = DEFAULT_METRICS_ADDR  # the IP address the metrics server listens on
    log_format: str = "text"  # or "json": one object per line (astronn_dist.worker.service.logs)

    @classmethod
    def from_env(cls) -> "Settings":
        roots = _env("ASTRONN_DIST_DATA_ROOTS", "") or ""
        return cls(
            broker_url=_secret_from_file(
                _env("ASTRONN_DIST_BROKER_URL", DEFAULT_BROKER_URL), "ASTRONN_DIST_BROKER_URL_FILE"
            ),
            database_url=_secret_from_file(
                _env("ASTRONN_DIST_DATABASE_URL", DEFAULT_DATABASE_URL),
                "ASTRONN_DIST_DATABASE_URL_FILE",
            ),
            model_path=Path(_env("ASTRONN_DIST_MODEL", str(BUNDLED_MODEL))),
            device=_env("ASTRONN_DIST_DEVICE", "auto"),
            visibility_timeout_s=int(
                _env("ASTRONN_DIST_VISIBILITY_TIMEOUT", str(DEFAULT_VISIBILITY_TIMEOUT_S))
            ),
            data_roots=tuple(Path(p).resolve() for p in roots.split(os.pathsep) if p),
            mc_passes=int(_env("ASTRONN_DIST_MC_PASSES", str(DEFAULT_MC_PASSES))),
            seed=int(_env("ASTRONN_DIST_SEED", str(DEFAULT_SEED))),
            max_deliveries=int(_env("ASTRONN_DIST_MAX_DELIVERIES", "5")),
            max_retries=int(_env("ASTRONN_DIST_MAX_RETRIES", "5")),
            metrics_port=int(_env("ASTRONN_DIST_METRICS_PORT", str(DEFAULT_METRICS_PORT))),
            metrics_addr=_env("ASTRONN_DIST_METRICS_ADDR", DEFAULT_METRICS_ADDR),
            log_format=_log_format(_env("ASTRONN_DIST_LOG_FORMAT", "text")),
        )

    def __post_init__(self) -> None:
        # Here rather than in from_env: a --metrics-addr flag (dataclasses.replace) is checked too.
        object.__setattr__(self, "metrics_addr", metrics_address(self.metrics_addr))


def metrics_address(value: str) -> str:
    """``value`` as the IP address to listen on (``[::1]`` -> ``::1``); a clear error otherwise.

    Only IP addresses: a host name could resolve to an address of another machine, or to
    several, and the metrics server binds one.
    """
    text = str(value).strip()
    try:
        return str(ipaddress.ip_address(text.removeprefix("[").removesuffix("]")))
    except ValueError:
        raise ValueError(
            f"metrics address {text!r} (ASTRONN_DIST_METRICS_ADDR or --metrics-addr) is not an IP "
            "address: use 0.0.0.0 (every IPv4 interface), 127.0.0.1 (this host only), :: (every "
            "interface, IPv6 too) or one of this host's addresses"
        ) from None


def _log_format(value: str) -> str:
    value = value.strip().lower()
    if value not in LOG_FORMATS:
        raise ValueError(f"ASTRONN_DIST_LOG_FORMAT={value!r}: use one of {', '.join(LOG_FORMATS)}")
    return value
