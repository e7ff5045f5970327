"""Settings: the metrics address (ASTRONN_DIST_METRICS_ADDR / --metrics-addr) is checked."""

from __future__ import annotations

import dataclasses

import pytest

from astronn_dist.worker.config import DEFAULT_METRICS_ADDR, Settings


@pytest.fixture(autouse=True)
def _no_caller_settings(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith("ASTRONN_DIST_"):
            monkeypatch.delenv(name)


def test_the_metrics_address_defaults_to_every_interface():
    assert DEFAULT_METRICS_ADDR == "0.0.0.0"
    assert Settings().metrics_addr == Settings.from_env().metrics_addr == "0.0.0.0"


@pytest.mark.parametrize(
    "value, address",
    [("127.0.0.1", "127.0.0.1"), (" 10.1.2.3 ", "10.1.2.3"), ("::", "::"), ("[::1]", "::1"), ("", "0.0.0.0")],
)
def test_the_metrics_address_comes_from_the_environment(monkeypatch, value: str, address: str):
    monkeypatch.setenv("ASTRONN_DIST_METRICS_ADDR", value)
    assert Settings.from_env().metrics_addr == address


@pytest.mark.parametrize("value", ["localhost", "0.0.0.0:9808", "256.0.0.1", "http://127.0.0.1", "all"])
def test_a_metrics_address_that_is_not_an_ip_is_refused(monkeypatch, value: str):
    monkeypatch.setenv("ASTRONN_DIST_METRICS_ADDR", value)
    with pytest.raises(ValueError, match=r"is not an IP address: use 0\.0\.0\.0 .*127\.0\.0\.1"):
        Settings.from_env()
    # A flag goes through dataclasses.replace: checked the same way.
    with pytest.raises(ValueError, match="ASTRONN_DIST_METRICS_ADDR or --metrics-addr"):
        dataclasses.replace(Settings(), metrics_addr=value)


# ------------------------------------------------------------------------- Redis Sentinel


def test_sentinel_settings_come_from_the_environment(monkeypatch, tmp_path):
    from astronn_dist.worker.config import DEFAULT_SENTINEL_MASTER

    assert Settings().sentinel_master == DEFAULT_SENTINEL_MASTER == "mymaster"
    assert Settings().sentinel is None  # a plain Redis URL
    secret = tmp_path / "sentinel-password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("ASTRONN_DIST_BROKER_URL", "sentinel://:pw@a:26379/2;sentinel://b;sentinel://c:26380")
    monkeypatch.setenv("ASTRONN_DIST_SENTINEL_MASTER", "broker1")
    monkeypatch.setenv("ASTRONN_DIST_SENTINEL_PASSWORD_FILE", str(secret))
    s = Settings.from_env()
    assert (s.sentinel_master, s.sentinel_password) == ("broker1", "s3cret")
    assert "s3cret" not in repr(s)
    address = s.sentinel
    assert address.nodes == (("a", 26379), ("b", 26379), ("c", 26380))
    assert (address.db, address.username, address.password, address.uses_tls) == (2, None, "pw", False)
    assert address.kombu_url() == "sentinel://:pw@a:26379/2;sentinel://b:26379;sentinel://c:26380"


@pytest.mark.parametrize("url, message", [
    ("sentinel://a:26379;redis://b:6379", "is not a sentinel:// address"),
    ("sentinel://:26379", "has no host"),
    ("sentinel://a:26379/zero", "is not a number"),
    ("sentinel://a:port", "Port could not be cast"),
    ("sentinel://a:26379?master=x", "unknown option 'master'"),
    ("sentinel://a:26379;sentinel://a:26379", "names a Sentinel twice"),
    ("sentinel://a:26379/1;sentinel://b:26379/2", "differs from the database 1"),
])
def test_a_bad_sentinel_url_is_refused_clearly(url: str, message: str):
    with pytest.raises(ValueError, match=message) as error:
        Settings(broker_url=url)
    assert "sentinel://[:PASSWORD@]HOST:PORT" in str(error.value) or "only ssl" in str(error.value)


@pytest.mark.parametrize("master", ["", "  ", "my master"])
def test_a_bad_sentinel_master_name_is_refused(master: str):
    with pytest.raises(ValueError, match="ASTRONN_DIST_SENTINEL_MASTER or --sentinel-master"):
        dataclasses.replace(Settings(), sentinel_master=master)


def test_the_celery_app_and_the_clients_get_the_sentinel_options():
    """kombu's Sentinel transport needs master_name (else "'master_name' transport option must
    be specified"); the Sentinels' password and TLS go to sentinel_kwargs, the primary's TLS to
    broker_use_ssl; a publish retries through a failover."""
    import ssl

    from astronn_dist.worker.service.app import make_app
    from astronn_dist.worker.service.broker import FAILOVER_WAIT_S, broker_ssl_options, redis_client

    url = "sentinel://:pw@h1:26379/1;sentinel://h2:26379?ssl_cert_reqs=optional&ssl_ca_certs=/ca.pem"
    settings = Settings(broker_url=url, sentinel_master="broker1", sentinel_password="spw")
    app = make_app(settings)
    options = app.conf.broker_transport_options
    assert app.conf.broker_url == "sentinel://:pw@h1:26379/1;sentinel://h2:26379"
    assert options["master_name"] == "broker1"
    assert options["visibility_timeout"] == settings.visibility_timeout_s
    tls = {"ssl_cert_reqs": ssl.CERT_OPTIONAL, "ssl_ca_certs": "/ca.pem"}
    assert options["sentinel_kwargs"] == {"password": "spw", "ssl": True, "socket_timeout": 5.0,
                                          "socket_connect_timeout": 5.0, **tls}
    assert app.conf.broker_use_ssl == tls == broker_ssl_options(url)
    assert app.conf.task_publish_retry_policy["max_retries"] == FAILOVER_WAIT_S
    assert broker_ssl_options("sentinel://h1:26379?ssl=false") is None
    assert broker_ssl_options("sentinel://h1:26379?ssl=true") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}

    client = redis_client(settings, timeout_s=3, connect_timeout_s=2)  # connects lazily
    pool = client.connection_pool
    assert (pool.service_name, pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (
        "broker1", 1, "pw")
    node = pool.sentinel_manager.sentinels[0].connection_pool.connection_kwargs
    assert (node["host"], node["port"], node["password"]) == ("h1", 26379, "spw")
    plain = make_app(Settings(broker_url="redis://localhost:6379/0"))
    assert "master_name" not in plain.conf.broker_transport_options
