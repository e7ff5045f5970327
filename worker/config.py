"""Configuration: every setting the service reads, in one place.

Command-line flags override these environment variables; nothing else reads ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from astronn_dist.worker.contract import QUEUE, TASK_NAME  # noqa: F401  (re-exported with the settings)

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
# Redis Sentinel: the name of the monitored primary (``sentinel monitor NAME ...``), redis's own
# example name and Celery's documented one.
DEFAULT_SENTINEL_MASTER = "mymaster"
DEFAULT_SENTINEL_PORT = 26379
# The TLS keys a broker URL's query may carry (rediss://, or sentinel:// to use TLS to the
# Sentinels and to the primary); ``ssl=true`` alone turns TLS on with the defaults.
TLS_QUERY_KEYS = ("ssl", "ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
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
    # Redis Sentinel (a ``sentinel://`` broker URL): the primary's name, and the Sentinels' own
    # password (their ``requirepass``; the primary's password is in the URL, as Celery takes it).
    sentinel_master: str = DEFAULT_SENTINEL_MASTER
    sentinel_password: str | None = field(default=None, repr=False)

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
            sentinel_master=_env("ASTRONN_DIST_SENTINEL_MASTER", DEFAULT_SENTINEL_MASTER),
            sentinel_password=_secret_from_file(
                _env("ASTRONN_DIST_SENTINEL_PASSWORD"), "ASTRONN_DIST_SENTINEL_PASSWORD_FILE"
            ),
        )

    def __post_init__(self) -> None:
        # Here rather than in from_env: a flag (dataclasses.replace) is checked too.
        object.__setattr__(self, "metrics_addr", metrics_address(self.metrics_addr))
        master = str(self.sentinel_master).strip()
        if not master or any(c.isspace() for c in master):
            raise ValueError(
                f"Sentinel master name {self.sentinel_master!r} (ASTRONN_DIST_SENTINEL_MASTER or "
                "--sentinel-master): give the name of 'sentinel monitor NAME host port quorum' "
                f"(default {DEFAULT_SENTINEL_MASTER})"
            )
        object.__setattr__(self, "sentinel_master", master)
        if is_sentinel_url(self.broker_url):
            parse_sentinel_url(self.broker_url)  # a clear error now, not at the first connection

    @property
    def sentinel(self) -> SentinelURL | None:
        """The Sentinels of a ``sentinel://`` broker URL (None for a plain Redis URL)."""
        return parse_sentinel_url(self.broker_url) if is_sentinel_url(self.broker_url) else None


def is_sentinel_url(url: str) -> bool:
    return str(url).strip().lower().startswith("sentinel://")


@dataclass(frozen=True)
class SentinelURL:
    """A broker URL in Celery's Sentinel form, parsed.

    ``sentinel://[USER:PASSWORD@]HOST[:PORT][/DB];sentinel://HOST[:PORT];...[?TLS]``: every part
    names one Sentinel (port default 26379); the first part that has them gives the primary's
    user, password and database number (as kombu reads them); ``TLS`` is the query of
    :data:`TLS_QUERY_KEYS` (on any part), for the Sentinels and the primary alike.
    """

    nodes: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: dict[str, str] = field(default_factory=dict)

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls) and self.tls.get("ssl", "true").lower() not in ("0", "false", "no", "off")

    def kombu_url(self) -> str:
        """The URL kombu's Sentinel transport reads (no query: TLS goes to ``broker_use_ssl``)."""
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}:{self.password or ''}@"
        first, *rest = self.nodes
        parts = [f"sentinel://{auth}{_host(first[0])}:{first[1]}/{self.db}"]
        parts += [f"sentinel://{_host(h)}:{p}" for h, p in rest]
        return ";".join(parts)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_sentinel_url(url: str) -> SentinelURL:
    """``url`` (``sentinel://h:p;sentinel://h:p;...``) as a :class:`SentinelURL`; a ValueError
    that names the bad part otherwise."""
    hint = ("use Celery's form sentinel://[:PASSWORD@]HOST:PORT[/DB];sentinel://HOST:PORT;... "
            "(ASTRONN_DIST_BROKER_URL or --broker)")
    nodes: list[tuple[str, int]] = []
    db = None
    username = password = None
    tls: dict[str, str] = {}
    for part in (p.strip() for p in str(url).split(";")):
        if not part:
            continue
        if not part.lower().startswith("sentinel://"):
            raise ValueError(f"broker URL part {part!r} is not a sentinel:// address: {hint}")
        try:
            parts = urlsplit(part)
            port = parts.port or DEFAULT_SENTINEL_PORT
        except ValueError as exc:
            raise ValueError(f"broker URL part {part!r}: {exc}: {hint}") from None
        if not parts.hostname:
            raise ValueError(f"broker URL part {part!r} has no host: {hint}")
        nodes.append((parts.hostname, port))
        if username is None and password is None and (parts.username or parts.password):
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password else None
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"broker URL part {part!r}: the database {path!r} is not a number: {hint}")
            if db is not None and int(path) != db:
                raise ValueError(f"broker URL part {part!r}: database {path} differs from the "
                                 f"database {db} of an earlier part: {hint}")
            db = int(path)
        for key, values in parse_qs(parts.query, keep_blank_values=True).items():
            if key not in TLS_QUERY_KEYS:
                raise ValueError(
                    f"broker URL part {part!r}: unknown option {key!r}; a sentinel:// URL takes "
                    f"only {', '.join(TLS_QUERY_KEYS)}"
                )
            tls[key] = values[-1]
    if not nodes:
        raise ValueError(f"broker URL {url!r} names no Sentinel: {hint}")
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"broker URL names a Sentinel twice: {hint}")
    return SentinelURL(tuple(nodes), db or 0, username, password, tls)


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
