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

Every namespace is named ``tcnb-<pid>-<role>``; deleting a namespace deletes its veth ends, and
deleting either end of a veth deletes the pair. :func:`cleanup` removes leftovers of any run
(``python -m benchmarks.network --cleanup``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional

PREFIX = "tcnb-"
SUBNET = "10.77.0"
IFNAME = "tcn0"  # the rank's interface, inside its namespace


class NetnsUnavailable(RuntimeError):
    """Namespaces or tc cannot be used here (not root, tools missing, kernel refuses)."""


def _ip(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def list_namespaces() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def cleanup(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (with its interfaces)."""
    removed = []
    for ns in list_namespaces():
        if ns.startswith(prefix):
            # leftover ranks of an interrupted run keep a namespace alive: end them first
            pids = _ip("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


def check_available() -> None:
    """Raise :class:`NetnsUnavailable` with the reason if namespaces cannot be used here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise NetnsUnavailable("not root (network namespaces and tc need root)")
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise NetnsUnavailable(
            f"{' and '.join(missing)} not found: install iproute2 "
            "(`apt-get install -y iproute2` on Debian/Ubuntu)"
        )
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` failed: {r.stderr.strip()}")
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)


@dataclass
class Network:
    """Namespaces for ``world`` ranks; use as a context manager (always cleans up)."""

    world: int
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    namespaces: list[str] = field(default_factory=list)
    shaping: dict = field(default_factory=dict)
    _netem: Optional[bool] = None

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
        _ip("ip", "netns", "add", name)
        self.namespaces.append(name)
        _ip("ip", "link", "set", "lo", "up", ns=name)

    def create(self) -> None:
        if self.world < 2:
            raise ValueError("a network needs at least 2 ranks")
        for r in range(self.world):
            self._add_ns(self.ns(r))
        if self.switch is None:
            # one veth pair, created inside rank 0's namespace with its peer in rank 1's
            _ip("ip", "link", "add", IFNAME, "type", "veth", "peer", "name", IFNAME,
                "netns", self.ns(1), ns=self.ns(0))
        else:
            sw = self.switch
            self._add_ns(sw)
            _ip("ip", "link", "add", "br0", "type", "bridge", ns=sw)
            _ip("ip", "link", "set", "br0", "up", ns=sw)
            for r in range(self.world):
                _ip("ip", "link", "add", f"p{r}", "type", "veth", "peer", "name", IFNAME,
                    "netns", self.ns(r), ns=sw)
                _ip("ip", "link", "set", f"p{r}", "master", "br0", ns=sw)
                _ip("ip", "link", "set", f"p{r}", "up", ns=sw)
        for r in range(self.world):
            _ip("ip", "addr", "add", f"{self.addr(r)}/24", "dev", IFNAME, ns=self.ns(r))
            _ip("ip", "link", "set", IFNAME, "up", ns=self.ns(r))

    def close(self) -> None:
        """Delete every namespace made (and so every veth and bridge in them)."""
        # the runner ends its rank processes before this
        for name in reversed(self.namespaces):
            _ip("ip", "netns", "del", name, check=False)
        self.namespaces.clear()

    # -- limits ------------------------------------------------------------------------------

    def _netem_ok(self) -> bool:
        if self._netem is None:
            ns, dev, _ = self._egress()[0]
            r = _ip("tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem",
                    "delay", "1ms", ns=ns, check=False)
            self._netem = r.returncode == 0
            _ip("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
        return self._netem

    def shape(self, rate_mbit: Optional[float], delay_ms: float = 0.5) -> dict:
        """Limit every veth end to ``rate_mbit`` with ``delay_ms`` one way (None: no limits)."""
        for ns, dev, _ in self._egress():
            _ip("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)
        if rate_mbit is None:
            self.shaping = {"rate_mbit": None, "delay_ms": 0.0, "qdisc": "none (veth)"}
            return self.shaping
        bits = rate_mbit * 1e6
        # tbf: a bucket of 4 ms of traffic (at least 64 KiB, one GSO segment) and a queue of
        # 50 ms: enough that TCP sees the rate, not drops, at every rate here
        burst = max(65536, int(bits / 8 * 0.004))
        limit = max(2 * burst, int(bits / 8 * 0.05))
        tbf = ["tbf", "rate", f"{int(bits)}bit", "burst", str(burst), "limit", str(limit)]
        netem = delay_ms > 0 and self._netem_ok()
        for ns, dev, rank_side in self._egress():
            if netem and rank_side:
                _ip("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
                    f"{delay_ms}ms", "limit", "100000", ns=ns)
                _ip("tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf,
                    ns=ns)
            else:
                _ip("tc", "qdisc", "add", "dev", dev, "root", *tbf, ns=ns)
        self.shaping = {
            "rate_mbit": rate_mbit,
            "delay_ms": delay_ms if netem else 0.0,
            "qdisc": "netem+tbf" if netem else "tbf",
            "tbf_burst_bytes": burst,
            "tbf_limit_bytes": limit,
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
    import sys

    sink = subprocess.Popen(["ip", "netns", "exec", net.ns(1), sys.executable, "-c", _SINK,
                             net.addr(1)], stdout=subprocess.PIPE, text=True)
    try:
        if sink.stdout.readline().strip() != "ready":
            return None
        subprocess.run(["ip", "netns", "exec", net.ns(0), sys.executable, "-c", _SOURCE,
                        net.addr(1), str(seconds)], timeout=60 + seconds, check=True)
        n, dt = sink.communicate(timeout=60 + seconds)[0].split()
        return int(n) * 8 / float(dt) / 1e6
    except (subprocess.SubprocessError, ValueError):
        return None
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
