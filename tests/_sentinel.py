"""A private Redis Sentinel deployment for tests: a primary, replicas and Sentinels on free
loopback ports, each in its own folder and process group (tests/_servers.py), all killed when the
test ends.

* The primary and the replicas are :class:`_servers.RedisServer` (append-only, ``appendfsync
  always``); a replica runs with ``--replicaof`` the primary.
* A Sentinel is ``redis-server sentinel.conf --sentinel``: Sentinel rewrites its configuration
  file as it learns (replicas, other Sentinels, a new primary), so the file is its own, in its
  folder. ``down-after-milliseconds`` and ``failover-timeout`` are small so that a failover
  completes in seconds, not the default half minute.
* :class:`TlsRedisServer` and :class:`TlsSentinel` answer on TLS ports only, with a self-signed
  certificate (:func:`self_signed_certificate`, made by ``openssl``).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from _servers import RedisServer, _kill_group, _wait, free_port, port_open

MASTER = "mymaster"


class SentinelServer:
    """One ``redis-server --sentinel`` watching ``master`` at ``primary_port``."""

    def __init__(self, folder: Path, primary_port: int, *, master: str = MASTER, quorum: int = 2,
                 down_after_ms: int = 3000, failover_timeout_ms: int = 5000,
                 password: str | None = None, primary_password: str | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None
        lines = [
            f"port {self.port}", "bind 127.0.0.1", "protected-mode no", "daemonize no",
            f"dir {self.folder}", f"logfile {self.folder / 'sentinel.log'}",
            f"sentinel monitor {master} 127.0.0.1 {primary_port} {quorum}",
            f"sentinel down-after-milliseconds {master} {down_after_ms}",
            f"sentinel failover-timeout {master} {failover_timeout_ms}",
            f"sentinel parallel-syncs {master} 1",
        ]
        if primary_password:
            lines.append(f"sentinel auth-pass {master} {primary_password}")
        if password:
            lines.append(f"requirepass {password}")
        self.config = self.folder / "sentinel.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, binary: str, timeout: float = 30.0) -> SentinelServer:
        self.proc = subprocess.Popen(
            [binary, str(self.config), "--sentinel"], stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        _wait(lambda: self._alive() and port_open(self.port), timeout, f"sentinel on port {self.port}")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"sentinel exited ({self.proc.returncode}): " + self.log()[-2000:])
        return True

    def log(self) -> str:
        path = self.folder / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=2, decode_responses=True)

    def close(self) -> None:
        _kill_group(self.proc)
        self.proc = None


class SentinelCluster:
    """A primary, ``replicas`` replicas and ``sentinels`` Sentinels (quorum: a majority).

    Args:
        folder: parent of every server's own folder (created).
        password: the primary's and replicas' ``requirepass`` (also their ``masterauth``).
        sentinel_password: the Sentinels' own ``requirepass``.
    """

    def __init__(self, folder: Path, *, replicas: int = 1, sentinels: int = 3,
                 password: str | None = None, sentinel_password: str | None = None,
                 down_after_ms: int = 3000, failover_timeout_ms: int = 5000) -> None:
        self.folder = Path(folder)
        auth = ("--masterauth", password) if password else ()
        self.primary = RedisServer(self.folder / "primary", password=password, extra_args=auth)
        self.replicas = [
            RedisServer(self.folder / f"replica{i}", password=password,
                        extra_args=("--replicaof", "127.0.0.1", str(self.primary.port), *auth))
            for i in range(replicas)
        ]
        self.sentinels = [
            SentinelServer(self.folder / f"sentinel{i}", self.primary.port,
                           quorum=sentinels // 2 + 1, down_after_ms=down_after_ms,
                           failover_timeout_ms=failover_timeout_ms, password=sentinel_password,
                           primary_password=password)
            for i in range(sentinels)
        ]
        self.password = password
        self.sentinel_password = sentinel_password

    def url(self, db: int = 0) -> str:
        """The broker URL in Celery's form (the primary's password in the first part)."""
        auth = f":{self.password}@" if self.password else ""
        first, *rest = self.sentinels
        return ";".join([f"sentinel://{auth}127.0.0.1:{first.port}/{db}"]
                        + [f"sentinel://127.0.0.1:{s.port}" for s in rest])

    def start(self, timeout: float = 60.0) -> SentinelCluster:
        """Start everything and wait until the replicas are in sync and every Sentinel knows
        every replica and every other Sentinel (else it could not fail over)."""
        self.primary.start()
        for replica in self.replicas:
            replica.start()
        for sentinel in self.sentinels:
            sentinel.start(self.primary.binary)
        _wait(self.ready, timeout, "the replicas in sync and the Sentinels aware of each other",
              interval=0.1)
        return self

    def ready(self) -> bool:
        import redis

        try:
            for replica in self.replicas:
                if self._info(replica.port).get("master_link_status") != "up":
                    return False
            for sentinel in self.sentinels:
                with sentinel.client() as client:
                    if len(client.sentinel_slaves(MASTER)) < len(self.replicas):
                        return False
                    if len(client.sentinel_sentinels(MASTER)) < len(self.sentinels) - 1:
                        return False
        except redis.RedisError:
            return False
        return True

    def _info(self, port: int) -> dict:
        import redis

        with redis.Redis(host="127.0.0.1", port=port, password=self.password, socket_timeout=2) as c:
            return {k: v for k, v in c.info("replication").items()}

    def primary_port(self) -> int:
        """The port the Sentinels' majority reports as the primary's now."""
        import redis

        votes: dict[int, int] = {}
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    addr = client.sentinel_get_master_addr_by_name(MASTER)
            except redis.RedisError:
                continue
            if addr:
                votes[int(addr[1])] = votes.get(int(addr[1]), 0) + 1
        port, count = max(votes.items(), key=lambda kv: kv[1], default=(0, 0))
        return port if count > len(self.sentinels) // 2 else 0

    def is_primary(self, port: int) -> bool:
        """``port`` answers as a primary (ROLE master) and accepts a write."""
        import redis

        try:
            with redis.Redis(host="127.0.0.1", port=port, password=self.password,
                             socket_timeout=1, socket_connect_timeout=1) as c:
                return c.info("replication").get("role") == "master" and bool(
                    c.set("astronn-dist:test:failover-probe", "1"))
        except redis.RedisError:
            return False

    def wait_failover(self, old_port: int, timeout: float = 120.0) -> tuple[int, float]:
        """Wait until the Sentinels name a new primary and it answers a write: (its port, the
        seconds it took from this call)."""
        t0 = time.monotonic()
        found: list[int] = []

        def promoted() -> bool:
            port = self.primary_port()
            if port and port != old_port and self.is_primary(port):
                found.append(port)
                return True
            return False

        _wait(promoted, timeout, f"a new primary after port {old_port}", interval=0.02)
        return found[0], time.monotonic() - t0

    def server(self, port: int) -> RedisServer:
        return next(s for s in [self.primary, *self.replicas] if s.port == port)

    def logs(self) -> str:
        """Every Sentinel's log (for a failed test's message)."""
        return "\n".join(f"--- sentinel {s.port}\n{s.log()[-3000:]}" for s in self.sentinels)

    def close(self) -> None:
        for server in [*self.sentinels, *self.replicas, self.primary]:
            server.close()


# ---------------------------------------------------------------------------------------------
# TLS


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1 and localhost, valid a day; the certificate is its own CA."""
    binary = shutil.which("openssl")
    if binary is None:
        raise FileNotFoundError("openssl is not on PATH (apt-get install openssl)")
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [binary, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


def _tls_options(cert: Path, key: Path) -> list[str]:
    """redis-server options: TLS with this certificate, clients need none of their own."""
    return ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
            str(cert), "--tls-auth-clients", "no"]


class TlsRedisServer(RedisServer):
    """A :class:`RedisServer` that answers on a TLS port only."""

    def __init__(self, folder: Path, cert: Path, key: Path) -> None:
        self.tls_port = free_port()
        self.cert = cert
        super().__init__(folder, extra_args=("--port", "0", "--tls-port", str(self.tls_port),
                                             *_tls_options(cert, key)))

    def ready(self) -> bool:
        import redis

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited ({self.proc.returncode}): "
                               + (self.folder / "redis.log").read_text(errors="replace")[-2000:])
        try:
            with redis.Redis(host="127.0.0.1", port=self.tls_port, ssl=True,
                             ssl_ca_certs=str(self.cert), socket_timeout=1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False


class TlsSentinel(SentinelServer):
    """A Sentinel on a TLS port that reaches the primary over TLS too (``tls-replication``)."""

    def __init__(self, folder: Path, primary_port: int, cert: Path, key: Path) -> None:
        super().__init__(folder, primary_port, quorum=1)
        self.cert = cert
        tls = _tls_options(cert, key)
        lines = ["port 0", f"tls-port {self.port}", "tls-replication yes"]
        lines += [f"{tls[i].lstrip('-')} {tls[i + 1]}" for i in range(0, len(tls), 2)]
        self.config.write_text(self.config.read_text().replace(f"port {self.port}\n", "")
                               + "\n".join(lines) + "\n")

    def start(self, binary: str, timeout: float = 30.0) -> TlsSentinel:
        super().start(binary, timeout)
        _wait(self._knows_primary, timeout, f"TLS sentinel on port {self.port} to reach the primary")
        return self

    def _knows_primary(self) -> bool:
        import redis

        try:
            with redis.Redis(host="127.0.0.1", port=self.port, ssl=True, ssl_ca_certs=str(self.cert),
                             socket_timeout=1, decode_responses=True) as client:
                state = client.sentinel_master(MASTER)
                return state.get("is_disconnected") is False and state.get("is_sdown") is False
        except redis.RedisError:
            return False
