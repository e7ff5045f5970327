"""The broker's address -> its clients: the one redis-py client factory of the project and the
connection options kombu (the Celery broker) needs, for a plain Redis URL or Redis Sentinel.

* ``redis://`` / ``rediss://``: one Redis server, as the URL says.
* ``sentinel://h:p;sentinel://h:p;...`` (Celery's form, parsed by
  :func:`astronn_dist.worker.config.parse_sentinel_url`): the Sentinels are asked for the current
  primary of ``Settings.sentinel_master``. A client from :func:`redis_client` and kombu's
  transport both use redis-py's ``SentinelConnectionPool``: every new connection asks the
  Sentinels where the primary is, and a connection to a server that is gone or was demoted
  fails (ConnectionError, or READONLY turned into one) and is dropped, so the next command, or
  the caller's retry, reaches the new primary after a failover.

Every Redis client of the project (the Celery broker, queue reads, delivery counts, the watch
state, ``status``, ``reconcile``, the metrics' queue gauge) is made here, so all of them follow
the primary the same way. Importing this module imports neither Celery nor redis.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from astronn_dist.worker.config import Settings, is_sentinel_url, parse_sentinel_url

if TYPE_CHECKING:
    import redis

# Sentinels answer "where is the primary" from memory: a Sentinel that does not answer within
# this is skipped for the next one.
SENTINEL_TIMEOUT_S = 5.0

# How long a publish keeps retrying while the Sentinels elect a new primary (their
# ``down-after-milliseconds``, 30 s by default, plus the election: seconds). Celery's default
# policy gives up after about a second, which would fail a producer in every failover.
FAILOVER_WAIT_S = 60

_CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
}


def broker_ssl_options(broker_url: str) -> dict[str, Any] | None:
    """``broker_use_ssl`` for a ``rediss://`` URL or a ``sentinel://`` URL with TLS, from its
    query (None without TLS).

    ``ssl_cert_reqs`` (required | optional | none, default required), ``ssl_ca_certs``,
    ``ssl_certfile``, ``ssl_keyfile``; on a sentinel URL ``ssl=true`` alone turns TLS on. kombu
    on its own falls back to CERT_NONE (no server verification, with a warning) when the URL does
    not say; here the default is to verify.
    """
    if is_sentinel_url(broker_url):
        address = parse_sentinel_url(broker_url)
        if not address.uses_tls:
            return None
        query = address.tls
    else:
        parts = urlsplit(broker_url)
        if parts.scheme != "rediss":
            return None
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    reqs = query.get("ssl_cert_reqs", "required").strip().lower()
    if reqs not in _CERT_REQS:
        raise ValueError(
            f"ssl_cert_reqs={reqs!r} in the broker URL: use required, optional or none"
        )
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[reqs]}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if query.get(key):
            options[key] = query[key]
    return options


def kombu_broker(settings: Settings) -> tuple[str, dict[str, Any]]:
    """(the URL Celery is given, the transport options to add to it) for ``settings``.

    For Sentinel, kombu's ``SentinelChannel`` reads ``master_name`` (it refuses to start
    without), and ``sentinel_kwargs`` for its connections to the Sentinels themselves (their
    password, TLS, timeouts); the primary's password comes from the URL and its TLS from
    ``broker_use_ssl`` (:func:`broker_ssl_options`).
    """
    address = settings.sentinel
    if address is None:
        return settings.broker_url, {}
    return address.kombu_url(), {
        "master_name": settings.sentinel_master,
        "sentinel_kwargs": _sentinel_node_kwargs(settings),
    }


def publish_retry_policy(settings: Settings) -> dict[str, Any] | None:
    """Celery's ``task_publish_retry_policy`` for ``settings``: with Sentinel, retry once a
    second for :data:`FAILOVER_WAIT_S` (each retry reconnects and asks the Sentinels for the
    primary again); None (Celery's default) for a plain Redis URL."""
    if settings.sentinel is None:
        return None
    return {"max_retries": FAILOVER_WAIT_S, "interval_start": 0, "interval_step": 0.5,
            "interval_max": 1}


def _tls_kwargs(broker_url: str) -> dict[str, Any]:
    options = broker_ssl_options(broker_url)
    return {} if options is None else {"ssl": True, **options}


def _sentinel_node_kwargs(settings: Settings) -> dict[str, Any]:
    """redis-py keyword arguments of a connection to one Sentinel."""
    kwargs: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        **_tls_kwargs(settings.broker_url),
    }
    if settings.sentinel_password:
        kwargs["password"] = settings.sentinel_password
    return kwargs


def redis_client(settings: Settings, *, timeout_s: float, connect_timeout_s: float) -> redis.Redis:
    """A redis-py client on the broker's current primary (a plain URL: that server).

    Args:
        timeout_s: seconds a command may wait for its reply before it fails.
        connect_timeout_s: seconds a connection (to the primary; to a Sentinel, at most
            :data:`SENTINEL_TIMEOUT_S`) may take.
    """
    import redis

    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": connect_timeout_s}
    address = settings.sentinel
    if address is None:
        return redis.Redis.from_url(settings.broker_url, **timeouts)
    from redis.sentinel import Sentinel

    node_kwargs = _sentinel_node_kwargs(settings)
    node_kwargs["socket_connect_timeout"] = min(SENTINEL_TIMEOUT_S, connect_timeout_s)
    sentinels = Sentinel(list(address.nodes), sentinel_kwargs=node_kwargs, **timeouts,
                         **_tls_kwargs(settings.broker_url))
    return sentinels.master_for(
        settings.sentinel_master, redis_class=redis.Redis, db=address.db,
        username=address.username, password=address.password,
    )
