"""Private Redis and PostgreSQL servers for tests that must stop, restart or flush them.

Each server runs on a free loopback port, with its files in a temporary folder of its own, in its
own process group, and is killed (the whole group) when the test ends, even if it fails. Nothing
here touches the machine's shared Redis (6379) or PostgreSQL (5432).

Both can run on another host of the tests (tests/_hosts.py): ``bind`` is then that host's
address and ``prefix`` the command that runs there (``ip netns exec NS``); the test process,
which stays in the root namespace, reaches them through their Unix socket (a file, which no
network namespace hides), as a process on that host would.

* :class:`RedisServer`: ``redis-server --appendonly yes`` (every write is in the append-only file
  before the client gets its reply with ``appendfsync always``), so a restart keeps the queue.
* :class:`PostgresServer`: ``initdb`` + ``pg_ctl``. PostgreSQL refuses to run as root; when the
  tests run as root, its commands run as the ``postgres`` OS user (``runuser``) in a folder that
  user owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and everything in its group."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# ---------------------------------------------------------------------------------------------
# Redis


class RedisServer:
    """A private ``redis-server`` with append-only persistence.

    Args:
        folder: where the append-only file and the log go (created).
        port: TCP port (default: a free one on 127.0.0.1; kept across restarts).
        bind: the address it listens on (default 127.0.0.1).
        prefix: command prefix that runs it on another host (e.g. ``ip netns exec NS``); it
            then also listens on the Unix socket ``folder/redis.sock``, which :meth:`ready` uses.
    """

    def __init__(self, folder: Path, port: int | None = None, password: str | None = None,
                 extra_args: tuple[str, ...] = (), *, bind: str = "127.0.0.1",
                 prefix: list[str] | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server is not on PATH (apt-get install redis-server)")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.password = password  # requirepass: every client must AUTH
        self.extra_args = tuple(extra_args)  # more redis-server options (e.g. --replicaof)
        self.bind = bind
        self.prefix = list(prefix or [])
        self.socket = self.folder / "redis.sock" if self.prefix else None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.bind}:{self.port}/{db}"

    def socket_url(self, db: int = 0) -> str:
        """The Unix socket's URL (only with ``prefix``): reachable from the test's process."""
        assert self.socket is not None, "a RedisServer without prefix has no Unix socket"
        auth = f":{self.password}@" if self.password else ""
        return f"unix://{auth}{self.socket}?db={db}"

    def start(self, timeout: float = 30.0) -> RedisServer:
        """Start the server and wait until it answers PING (and has loaded its data)."""
        argv = [
            *self.prefix, self.binary, "--port", str(self.port), "--bind", self.bind,
            "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--protected-mode", "no", "--daemonize", "no",
            "--logfile", str(self.folder / "redis.log"),
            *(["--requirepass", self.password] if self.password else []),
            *(["--unixsocket", str(self.socket), "--unixsocketperm", "700"] if self.socket else []),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        _wait(self.ready, timeout, f"redis-server on port {self.port}")
        return self

    def ready(self) -> bool:
        import redis

        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"redis-server exited ({self.proc.returncode}): "
                + (self.folder / "redis.log").read_text(errors="replace")[-2000:]
            )
        where = ({"unix_socket_path": str(self.socket)} if self.socket
                 else {"host": "127.0.0.1", "port": self.port})
        client = redis.Redis(**where, password=self.password, socket_timeout=1)
        try:
            return bool(client.ping())  # a server still loading its AOF answers LOADING (error)
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop (SIGTERM: the server flushes its append-only file and exits)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
        _wait(self._closed, 10, f"port {self.port} to close")

    def _closed(self) -> bool:
        """The server no longer listens (on another host: its process is gone, since its port
        cannot be seen from here)."""
        if self.prefix:
            return self.proc is None or self.proc.poll() is not None
        return not port_open(self.port)

    def kill(self) -> None:
        """SIGKILL: the machine dies; what was written to the append-only file survives."""
        _kill_group(self.proc)
        _wait(self._closed, 10, f"port {self.port} to close")

    def restart(self, down_s: float = 0.0, *, hard: bool = False) -> float:
        """Stop (or kill), stay down ``down_s`` seconds, start again; returns the seconds the
        port was closed."""
        if hard:
            self.kill()
        else:
            self.stop()
        t_down = time.monotonic()
        time.sleep(down_s)
        self.start()
        self.restarts += 1
        return time.monotonic() - t_down

    def close(self) -> None:
        """Kill the server (the test is over)."""
        _kill_group(self.proc)
        self.proc = None


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bindir() -> Path | None:
    """The folder with initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(candidates[-1]).parent if candidates else None


class PostgresServer:
    """A private PostgreSQL cluster (trust authentication, user ``postgres``) on 127.0.0.1
    (or ``bind``).

    Its folder is a fresh ``tempfile.mkdtemp`` (owned by the ``postgres`` user when running as
    root), removed by :meth:`close`; it holds the Unix socket too.

    Args:
        port: TCP port (default: a free one on 127.0.0.1).
        bind: the address it listens on (default 127.0.0.1).
        prefix: command prefix that runs it on another host (e.g. ``ip netns exec NS``);
            :meth:`ready` then logs in through the Unix socket.
    """

    def __init__(self, port: int | None = None, *, bind: str = "127.0.0.1",
                 prefix: list[str] | None = None) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
        self.bindir = bindir
        self.port = port or free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="astronn-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse root
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.restarts = 0
        self._initialized = False
        self.bind = bind
        self.prefix = list(prefix or [])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@{self.bind}:{self.port}/{database}"

    def socket_url(self, database: str = "postgres") -> str:
        """The same database through the Unix socket (reachable from any namespace)."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.folder}&port={self.port}"

    def _run(self, *argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*self.prefix, *self._as, *argv], capture_output=True, text=True, timeout=timeout,
            cwd=self.folder, start_new_session=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
                + (f"\nlog:\n{self.log.read_text(errors='replace')[-2000:]}" if self.log.exists() else "")
            )
        return result

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """initdb (first time only), then start the server and wait until it accepts logins."""
        if not self._initialized:
            self._run(
                str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C",
            )
            if self.bind != "127.0.0.1":  # clients come from the other hosts of the subnet
                with open(self.data / "pg_hba.conf", "a") as hba:
                    hba.write("host all all samenet trust\n")
            self._initialized = True
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses={self.bind} -c fsync=off "
            "-c full_page_writes=off -c max_connections=50"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
            "-o", options, "-w", "-t", str(int(timeout)), "start", timeout=timeout + 10,
        )
        _wait(self.ready, timeout, f"PostgreSQL on port {self.port}")
        return self

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host=str(self.folder) if self.prefix else "127.0.0.1", port=self.port,
                user="postgres", dbname="postgres", connect_timeout=2,
            ) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast`` (clients disconnected, clean shutdown) or ``immediate``."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        _wait(lambda: not (self.data / "postmaster.pid").exists() if self.prefix
              else not port_open(self.port), 30, f"port {self.port} to close")

    def restart(self, down_s: float = 0.0, mode: str = "fast") -> None:
        self.stop(mode)
        time.sleep(down_s)
        self.start()
        self.restarts += 1

    def close(self) -> None:
        """Stop the server at once (whatever state it is in) and remove its folder."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "-w", "stop", timeout=30)
            except (RuntimeError, subprocess.TimeoutExpired):
                try:  # the postmaster's pid is the file's first line
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    pass
        shutil.rmtree(self.folder, ignore_errors=True)


def listening_addresses(port: int) -> set[str]:
    """The addresses a TCP socket of this host listens on at ``port`` (Linux /proc/net/tcp*)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            found.add(str(ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))))
    return found
