"""Hosts for tests that cross a network: network namespaces joined by veth pairs to a bridge,
and a fault-injecting TCP proxy.

:class:`Hosts` makes one network namespace per host and one more for the bridge (a switch), so
nothing is added to the root namespace: each host's ``eth0`` is one end of a veth pair whose
other end is a port of the bridge, and its address (``10.77.0.0/24``) exists only inside these
namespaces. Names carry this process's id (``adn<pid>-<host>``), so parallel runs never clash;
:meth:`Hosts.close` kills what still runs in the namespaces and deletes them all (namespaces of
runs that died without closing are swept at the next start). A link is cut by setting the bridge's
port of that host down (the cable pulled at the switch: the host's own interface stays up, its
packets vanish and its TCP connections wait to retransmit).

:func:`serve_proxy` (``python tests/_hosts.py proxy ...``) is an asyncio TCP proxy that delays
data, stalls reads and drops connections at random (seeded): the packet loss and delay of a bad
link, where this kernel has neither the netem qdisc nor iptables. Each fault it injects is one
line of its output (``proxy drop ...``, ``proxy stall ...``), and every second it prints its
totals (``proxy totals pieces=... delayed=... stalled=... dropped=...``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

PREFIX = "adn"
SUBNET = "10.77.0"  # /24; the addresses exist only inside the namespaces


class HostsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, or the kernel refuses)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale() -> list[str]:
    """Delete the namespaces of test runs whose process is gone (a run killed before its
    cleanup); returns their names."""
    swept = []
    for name in _namespaces():
        match = re.fullmatch(rf"{PREFIX}(\d+)-[\w-]+", name)
        if match and not _alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)
            swept.append(name)
    return swept


class Hosts:
    """Hosts as network namespaces on one bridge.

    Args:
        names: the hosts, e.g. ``["services", "w1", "w2"]``; the i-th gets ``10.77.0.(i+1)``.
            A name is at most 11 characters (it names the bridge's port, an interface).
    """

    def __init__(self, names: Sequence[str]) -> None:
        for name in names:
            if not re.fullmatch(r"[a-z][a-z0-9]{0,10}", name):
                raise ValueError(f"host name {name!r}: 1-11 lowercase letters and digits")
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge_ns = f"{self.tag}-br"
        self.addresses = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}
        self._made: list[str] = []

    def ns(self, host: str) -> str:
        """The namespace of ``host``."""
        return f"{self.tag}-{host}"

    def exec(self, host: str) -> list[str]:
        """The command prefix that runs a command on ``host``."""
        return ["ip", "netns", "exec", self.ns(host)]

    def address(self, host: str) -> str:
        return self.addresses[host]

    def create(self) -> Hosts:
        """Make the bridge and the hosts; raises :class:`HostsUnavailable` with the reason."""
        if shutil.which("ip") is None:
            raise HostsUnavailable("the 'ip' command (iproute2) is not installed: apt-get install iproute2")
        if os.geteuid() != 0:
            raise HostsUnavailable(
                f"network namespaces need root (this runs as uid {os.geteuid()}); CI runs as root"
            )
        sweep_stale()
        try:
            self._add_ns(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for host, address in self.addresses.items():
                ns = self.ns(host)
                self._add_ns(ns)
                # Made inside the bridge's namespace, the host's end moved at once: the pair
                # never exists in the root namespace.
                _ip("-n", self.bridge_ns, "link", "add", host, "type", "veth",
                    "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.bridge_ns, "link", "set", host, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except RuntimeError as exc:
            self.close()
            raise HostsUnavailable(f"cannot make network namespaces here: {exc}") from exc
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def cut(self, host: str) -> None:
        """Pull ``host``'s cable at the switch: nothing reaches it, nothing leaves it."""
        _ip("-n", self.bridge_ns, "link", "set", host, "down")

    def mend(self, host: str) -> None:
        _ip("-n", self.bridge_ns, "link", "set", host, "up")

    def link_up(self, host: str) -> bool:
        out = _ip("-n", self.bridge_ns, "-o", "link", "show", host).stdout
        return "state UP" in out

    @contextmanager
    def link_cut(self, host: str) -> Iterator[None]:
        """``host``'s link down inside the block, up again after it (even on failure)."""
        self.cut(host)
        try:
            yield
        finally:
            self.mend(host)

    def close(self) -> None:
        """Kill every process still in the hosts' namespaces (all started by this run) and
        delete the namespaces (the veth pairs and the bridge go with them)."""
        for ns in reversed(self._made):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        self._made.clear()


# ---------------------------------------------------------------------------------------------
# The fault-injecting proxy


class FaultPlan:
    """What the proxy does to each piece of data it forwards (one ``read`` of up to 64 KiB).

    Args:
        seed: the random generator's seed (one generator for the whole proxy).
        delay_p, delay_s: probability of delaying a piece, and the longest delay [s] (uniform).
        stall_p, stall_s: probability of stalling the connection's reads (both ways stop
            reading), and (shortest, longest) stall [s].
        drop_p: probability of closing the connection (both sides) instead of forwarding.
    """

    def __init__(self, seed: int, delay_p: float = 0.3, delay_s: float = 0.05,
                 stall_p: float = 0.01, stall_s: tuple[float, float] = (0.5, 3.0),
                 drop_p: float = 0.004) -> None:
        self.rng = random.Random(seed)
        self.delay_p, self.delay_s = delay_p, delay_s
        self.stall_p, self.stall_s = stall_p, stall_s
        self.drop_p = drop_p
        self.totals = {"pieces": 0, "delayed": 0, "stalled": 0, "dropped": 0}

    def report(self) -> str:
        return "proxy totals " + " ".join(f"{k}={v}" for k, v in self.totals.items())


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, plan: FaultPlan,
                what: str, closers: list[asyncio.StreamWriter]) -> None:
    try:
        while data := await reader.read(65536):
            draw = plan.rng.random()
            plan.totals["pieces"] += 1
            if draw < plan.drop_p:
                plan.totals["dropped"] += 1
                print(f"proxy drop {what} ({len(data)} bytes not sent)", flush=True)
                for w in closers:
                    w.transport.abort()  # RST: the connection dies as on a lossy link
                return
            if draw < plan.drop_p + plan.stall_p:
                plan.totals["stalled"] += 1
                stall = plan.rng.uniform(*plan.stall_s)
                print(f"proxy stall {what} {stall:.2f} s", flush=True)
                await asyncio.sleep(stall)
            elif draw < plan.drop_p + plan.stall_p + plan.delay_p:
                plan.totals["delayed"] += 1
                await asyncio.sleep(plan.rng.uniform(0, plan.delay_s))
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        for w in closers:
            w.close()


async def _serve(routes: list[tuple[str, int, str, int]], plan: FaultPlan) -> None:
    def handler_for(target_host: str, target_port: int):
        async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            try:
                server_r, server_w = await asyncio.open_connection(target_host, target_port)
            except OSError as exc:
                print(f"proxy refused :{target_port}: {exc}", flush=True)
                client_w.transport.abort()
                return
            closers = [client_w, server_w]
            what = f":{target_port}"
            await asyncio.gather(
                _pipe(client_r, server_w, plan, f"{what} up", closers),
                _pipe(server_r, client_w, plan, f"{what} down", closers),
            )
        return handle

    servers = []
    for listen_host, listen_port, target_host, target_port in routes:
        servers.append(await asyncio.start_server(
            handler_for(target_host, target_port), listen_host, listen_port))
        print(f"proxy listening {listen_host}:{listen_port} -> {target_host}:{target_port}", flush=True)
    print("proxy ready", flush=True)

    async def totals() -> None:  # the proxy is killed, not asked to stop: report as it goes
        while True:
            await asyncio.sleep(1.0)
            print(plan.report(), flush=True)

    await asyncio.gather(totals(), *(s.serve_forever() for s in servers))


def serve_proxy(argv: Sequence[str] | None = None) -> None:
    """``proxy --route LISTEN_HOST:PORT=TARGET_HOST:PORT ... --seed N``."""
    parser = argparse.ArgumentParser(prog="_hosts.py proxy")
    parser.add_argument("--route", action="append", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    routes = []
    for route in args.route:
        listen, target = route.split("=")
        lh, lp = listen.rsplit(":", 1)
        th, tp = target.rsplit(":", 1)
        routes.append((lh, int(lp), th, int(tp)))
    asyncio.run(_serve(routes, FaultPlan(args.seed)))


def proxy_command(routes: dict[tuple[str, int], tuple[str, int]], seed: int) -> list[str]:
    """The argv that runs the proxy (prefix it with :meth:`Hosts.exec` to run it on a host)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "proxy", "--seed", str(seed)]
    for (lh, lp), (th, tp) in routes.items():
        argv += ["--route", f"{lh}:{lp}={th}:{tp}"]
    return argv


if __name__ == "__main__":
    if sys.argv[1:2] == ["proxy"]:
        serve_proxy(sys.argv[2:])
    else:
        sys.exit("usage: _hosts.py proxy --route LISTEN_HOST:PORT=TARGET_HOST:PORT ... --seed N")
