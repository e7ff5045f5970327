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
