"""Private network namespaces joined by veth pairs, with ``tc`` rate and delay limits.

Topology (everything lives in namespaces this module creates; the host's own interfaces, routes
and addresses are never touched, and nothing is routed out of the namespaces):

- 2 ranks: namespaces ``<tag>-r0`` and ``<tag>-r1`` joined by one veth pair.
- 3 or more ranks: one namespace per rank, each joined by a veth pair to a bridge inside a
  switch namespace ``<tag>-sw``.

Rank ``r`` has address ``10.77.0.(r+1)/24`` on interface ``tcn0`` of its namespace. Limits are
applied on egress of every veth end: on each rank's interface (its upload) and, with a bridge,
on the switch port facing it (its download), so each rank has a full-duplex link of the given
rate. The delay (default 0.5 ms) is added once per direction, on the rank side.

Delay needs the kernel's ``sch_netem``; rate uses ``netem``'s child ``tbf`` or, when netem is
missing (as on some container kernels), ``tbf`` alone, and the link then has no added delay:
:attr:`Network.shaping` records which was applied.

Two ways to do it: the ``ip`` and ``tc`` binaries of iproute2 where they exist, else netlink through
pyroute2 (pure Python: ``pip install pyroute2``), for machines without iproute2 such as the GPU
image of issue 16. ``TRITTER_NETNS_BACKEND=ip`` or ``=pyroute2`` forces one. With pyroute2 a
process enters a namespace through ``_nsexec.py`` (``setns`` then ``exec``), in place of
``ip netns exec``: :func:`exec_prefix` gives the command prefix for either.

Every namespace is named ``tcnb-<pid>-<role>``; deleting a namespace deletes its veth ends, and
deleting either end of a veth deletes the pair. :func:`cleanup` removes leftovers of any run
(``python -m benchmarks.network --cleanup``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

PREFIX = "tcnb-"
SUBNET = "10.77.0"
IFNAME = "tcn0"  # the rank's interface, inside its namespace


class NetnsUnavailable(RuntimeError):
    """Namespaces or tc cannot be used here (not root, tools missing, kernel refuses)."""


NETNS_DIR = "/var/run/netns"  # where both iproute2 and pyroute2 keep named namespaces
BACKEND_ENV = "TRITTER_NETNS_BACKEND"


def backend() -> str:
    """``"ip"`` (iproute2's binaries) or ``"pyroute2"`` (netlink from Python): the environment's
    choice, else ``ip`` where both ``ip`` and ``tc`` are on the PATH."""
    forced = os.environ.get(BACKEND_ENV, "").strip()
    if forced:
        if forced not in ("ip", "pyroute2"):
            raise ValueError(f"{BACKEND_ENV}={forced!r}: use 'ip' or 'pyroute2'")
        return forced
    return "ip" if shutil.which("ip") and shutil.which("tc") else "pyroute2"


def exec_prefix(ns: str) -> list[str]:
    """The command prefix that runs a command inside namespace ``ns``."""
    if backend() == "ip":
        return ["ip", "netns", "exec", ns]
    return [sys.executable, str(Path(__file__).with_name("_nsexec.py")), ns]


def _ip(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def list_namespaces() -> list[str]:
    if backend() == "pyroute2":
        try:
            return sorted(os.listdir(NETNS_DIR))
        except FileNotFoundError:
            return []
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _ns_pids(ns: str) -> list[int]:
    if backend() == "pyroute2":
        from pyroute2 import netns as pnetns

        return pnetns.ns_pids().get(ns, [])
    return [int(p) for p in _ip("ip", "netns", "pids", ns, check=False).stdout.split()
            if p.isdigit()]


def _del_ns(ns: str) -> None:
    if backend() == "pyroute2":
        from pyroute2 import netns as pnetns

        try:
            pnetns.remove(ns)
        except OSError:
            pass
    else:
        _ip("ip", "netns", "del", ns, check=False)


def cleanup(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (with its interfaces)."""
    removed = []
    for ns in list_namespaces():
        if ns.startswith(prefix):
            # leftover ranks of an interrupted run keep a namespace alive: end them first
            for pid in _ns_pids(ns):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            _del_ns(ns)
            removed.append(ns)
    return removed


def check_available() -> str:
    """The backend to use (see :func:`backend`); raise :class:`NetnsUnavailable` with the
    reason if namespaces cannot be used here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise NetnsUnavailable("not root (network namespaces and tc need root)")
    how = backend()
    if how == "ip":
        missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
        if missing:
            raise NetnsUnavailable(f"{' and '.join(missing)} not found ({BACKEND_ENV}=ip)")
    else:
        try:
            import pyroute2  # noqa: F401
        except ImportError:
            raise NetnsUnavailable(
                "neither iproute2 (`ip`, `tc`) nor pyroute2 is installed: "
                "`apt-get install -y iproute2` or `pip install pyroute2`") from None
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        # a namespace, a veth pair in it and a tbf qdisc on it: all the benchmark needs
        net = Network(2, tag=probe)
        try:
            net.create()
            net.shape(1000.0, delay_ms=0.0)
        except Exception as e:
            raise NetnsUnavailable(f"{how}: {type(e).__name__}: {e}") from None
        finally:
            net.close()
    finally:
        for ns in list_namespaces():
            if ns.startswith(probe):
                _del_ns(ns)
    return how


class _Pyroute2:
    """The few netlink operations :class:`Network` needs, one socket per namespace."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2 import netns as pnetns

        self._IPRoute, self._netns = IPRoute, pnetns
        self._socks: dict[str, object] = {}

    def ipr(self, ns: str):
        if ns not in self._socks:
            self._socks[ns] = self._IPRoute(netns=ns)
        return self._socks[ns]

    def index(self, ns: str, dev: str) -> int:
        found = self.ipr(ns).link_lookup(ifname=dev)
        if not found:
            raise RuntimeError(f"no interface {dev} in namespace {ns}")
        return found[0]

    def add_ns(self, ns: str) -> None:
        # pyroute2's netns.create forks this process to unshare; a forked copy of a runner
        # inherits its signal handlers and `finally` blocks (which delete namespaces), so the
        # unshare runs in a fresh interpreter instead
        r = subprocess.run([sys.executable, "-c", "import sys; from pyroute2 import netns; "
                            "netns._create(sys.argv[1])", ns],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"creating namespace {ns}: {r.stderr.strip()[-500:]}")
        self.up(ns, "lo")

    def del_ns(self, ns: str) -> None:
        sock = self._socks.pop(ns, None)
        if sock is not None:
            sock.close()
        _del_ns(ns)

    def up(self, ns: str, dev: str) -> None:
        self.ipr(ns).link("set", index=self.index(ns, dev), state="up")

    def veth(self, ns: str, dev: str, peer: str, peer_ns: str) -> None:
        self.ipr(ns).link("add", ifname=dev, kind="veth",
                          peer={"ifname": peer, "net_ns_fd": peer_ns})

    def bridge(self, ns: str, dev: str) -> None:
        self.ipr(ns).link("add", ifname=dev, kind="bridge")

    def master(self, ns: str, dev: str, master: str) -> None:
        self.ipr(ns).link("set", index=self.index(ns, dev), master=self.index(ns, master))

    def addr(self, ns: str, dev: str, cidr: str) -> None:
        a, n = cidr.split("/")
        self.ipr(ns).addr("add", index=self.index(ns, dev), address=a, prefixlen=int(n))

    def qdisc_del(self, ns: str, dev: str) -> None:
        try:
            self.ipr(ns).tc("del", index=self.index(ns, dev), root=True)
        except Exception:  # nothing to delete: EINVAL/ENOENT
            pass

    def netem(self, ns: str, dev: str, delay_ms: float) -> None:
        # pyroute2 takes the delay in microseconds; handle 1: as with `tc ... handle 1: netem`
        self.ipr(ns).tc("add", "netem", index=self.index(ns, dev), handle="1:",
                        delay=int(round(delay_ms * 1000)), limit=100000)

    def tbf(self, ns: str, dev: str, bits: float, burst: int, limit: int,
            parent: Optional[str] = None) -> None:
        kw = {"parent": parent, "handle": "10:"} if parent else {"handle": "1:"}
        self.ipr(ns).tc("add", "tbf", index=self.index(ns, dev), rate=f"{int(bits)}bit",
                        burst=burst, limit=limit, **kw)

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


class _Iproute2:
    """The same operations through iproute2's ``ip`` and ``tc``."""

    def add_ns(self, ns: str) -> None:
        _ip("ip", "netns", "add", ns)
        self.up(ns, "lo")

    def del_ns(self, ns: str) -> None:
        _ip("ip", "netns", "del", ns, check=False)

    def up(self, ns: str, dev: str) -> None:
        _ip("ip", "link", "set", dev, "up", ns=ns)

    def veth(self, ns: str, dev: str, peer: str, peer_ns: str) -> None:
        _ip("ip", "link", "add", dev, "type", "veth", "peer", "name", peer, "netns", peer_ns,
            ns=ns)

    def bridge(self, ns: str, dev: str) -> None:
        _ip("ip", "link", "add", dev, "type", "bridge", ns=ns)

    def master(self, ns: str, dev: str, master: str) -> None:
        _ip("ip", "link", "set", dev, "master", master, ns=ns)

    def addr(self, ns: str, dev: str, cidr: str) -> None:
        _ip("ip", "addr", "add", cidr, "dev", dev, ns=ns)

    def qdisc_del(self, ns: str, dev: str) -> None:
        _ip("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)

    def netem(self, ns: str, dev: str, delay_ms: float) -> None:
        _ip("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
            f"{delay_ms}ms", "limit", "100000", ns=ns)

    def tbf(self, ns: str, dev: str, bits: float, burst: int, limit: int,
            parent: Optional[str] = None) -> None:
        where = ["parent", parent, "handle", "10:"] if parent else ["root"]
        _ip("tc", "qdisc", "add", "dev", dev, *where, "tbf", "rate", f"{int(bits)}bit",
            "burst", str(burst), "limit", str(limit), ns=ns)

    def close(self) -> None:
        pass


def _ops():
    return _Iproute2() if backend() == "ip" else _Pyroute2()


@dataclass
class Network:
    """Namespaces for ``world`` ranks; use as a context manager (always cleans up)."""

    world: int
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    namespaces: list[str] = field(default_factory=list)
    shaping: dict = field(default_factory=dict)
    _netem: Optional[bool] = None
    _ops: object = None

    # -- names -------------------------------------------------------------------------------

    def ns(self, rank: int) -> str:
        return f"{self.tag}-r{rank}"

    @property
    def switch(self) -> Optional[str]:
        return f"{self.tag}-sw" if self.world > 2 else None

    @staticmethod
    def addr(rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"

    def _egress(self) -> list[tuple[str, str, bool]]:
        """(namespace, interface, rank side) of every veth end."""
        ends = [(self.ns(r), IFNAME, True) for r in range(self.world)]
        if self.switch:
            ends += [(self.switch, f"p{r}", False) for r in range(self.world)]
        return ends

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Network":
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        self.namespaces.append(name)  # before: a half-made namespace is still deleted
        self._ops.add_ns(name)

    def create(self) -> None:
        if self.world < 2:
            raise ValueError("a network needs at least 2 ranks")
        self._ops = _ops()
        ops = self._ops
        for r in range(self.world):
            self._add_ns(self.ns(r))
        if self.switch is None:
            # one veth pair, created inside rank 0's namespace with its peer in rank 1's
            ops.veth(self.ns(0), IFNAME, IFNAME, self.ns(1))
        else:
            sw = self.switch
            self._add_ns(sw)
            ops.bridge(sw, "br0")
            ops.up(sw, "br0")
            for r in range(self.world):
                ops.veth(sw, f"p{r}", IFNAME, self.ns(r))
                ops.master(sw, f"p{r}", "br0")
                ops.up(sw, f"p{r}")
        for r in range(self.world):
            ops.addr(self.ns(r), IFNAME, f"{self.addr(r)}/24")
            ops.up(self.ns(r), IFNAME)

    def close(self) -> None:
        """Delete every namespace made (and so every veth and bridge in them)."""
        # the runner ends its rank processes before this
        ops = self._ops or _ops()
        for name in reversed(self.namespaces):
            ops.del_ns(name)
        self.namespaces.clear()
        ops.close()
        self._ops = None

    # -- limits ------------------------------------------------------------------------------

    def _netem_ok(self) -> bool:
        if self._netem is None:
            ns, dev, _ = self._egress()[0]
            self._ops.qdisc_del(ns, dev)
            try:
                self._ops.netem(ns, dev, 1.0)
                self._netem = True
            except Exception:  # sch_netem missing (ENOENT from the kernel)
                self._netem = False
            self._ops.qdisc_del(ns, dev)
        return self._netem

    def shape(self, rate_mbit: Optional[float], delay_ms: float = 0.5) -> dict:
        """Limit every veth end to ``rate_mbit`` with ``delay_ms`` one way (None: no limits)."""
        ops = self._ops
        for ns, dev, _ in self._egress():
            ops.qdisc_del(ns, dev)
        if rate_mbit is None:
            self.shaping = {"rate_mbit": None, "delay_ms": 0.0, "qdisc": "none (veth)"}
            return self.shaping
        bits = rate_mbit * 1e6
        # tbf: a bucket of 4 ms of traffic (at least 64 KiB, one GSO segment) and a queue of
        # 50 ms: enough that TCP sees the rate, not drops, at every rate here
        burst = max(65536, int(bits / 8 * 0.004))
        limit = max(2 * burst, int(bits / 8 * 0.05))
        netem = delay_ms > 0 and self._netem_ok()
        for ns, dev, rank_side in self._egress():
            if netem and rank_side:
                ops.netem(ns, dev, delay_ms)
                ops.tbf(ns, dev, bits, burst, limit, parent="1:1")
            else:
                ops.tbf(ns, dev, bits, burst, limit)
        self.shaping = {
            "rate_mbit": rate_mbit,
            "delay_ms": delay_ms if netem else 0.0,
            "qdisc": "netem+tbf" if netem else "tbf",
            "tbf_burst_bytes": burst,
            "tbf_limit_bytes": limit,
            "via": backend(),
        }
        if delay_ms > 0 and not netem:
            self.shaping["note"] = (
                f"netem is not available in this kernel (sch_netem): rate limited with tbf, "
                f"without the {delay_ms} ms delay"
            )
        return self.shaping


_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5201)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.perf_counter()
    n += len(b)
print(n, time.perf_counter() - t0, flush=True)
"""

_SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5201)); buf = bytes(1 << 20)
end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end: c.sendall(buf)
c.close()
"""


def goodput_mbit(net: Network, seconds: float = 1.0) -> Optional[float]:
    """TCP goodput from rank 0 to rank 1 over the current limits (Mbit/s), or None."""
    sink = subprocess.Popen(exec_prefix(net.ns(1)) + [sys.executable, "-c", _SINK, net.addr(1)],
                            stdout=subprocess.PIPE, text=True)
    try:
        if sink.stdout.readline().strip() != "ready":
            return None
        subprocess.run(exec_prefix(net.ns(0)) + [sys.executable, "-c", _SOURCE, net.addr(1),
                        str(seconds)], timeout=60 + seconds, check=True)
        n, dt = sink.communicate(timeout=60 + seconds)[0].split()
        return int(n) * 8 / float(dt) / 1e6
    except (subprocess.SubprocessError, ValueError):
        return None
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
