"""A private network of Linux namespaces, so partitions are real and stay contained.

Layout (needs root; ``ip`` from iproute2 and ``iptables``)::

    netns kvj-<tag>-ctl   bridge kvj-br, address 10.77.0.1/24     (the harness: clients, nemesis)
      |- veth kvj-n1 <-> eth0 in netns kvj-<tag>-n1, 10.77.0.11/24  (node 1)
      |- veth kvj-n2 <-> eth0 in netns kvj-<tag>-n2, 10.77.0.12/24  (node 2)
      `- ...                                       node i at 10.77.0.(10+i)

Every address of the range (10.77.0.0/24 by default) exists only inside the
namespaces made here: nothing is added to the root namespace (no link, no
address, no route, no rule), so the host's own networks are never touched and
two runs, each in its own set of namespaces, cannot see each other even though
they reuse the same addresses.

Partitions are what Jepsen does: inside the namespace of a node that holds a
grudge, an iptables rule drops every packet *from* each node it is cut off
from (chain ``kvj-grudge``, jumped to from INPUT). Packets vanish, connections
stall and time out — the failure real networks produce. The harness's control
address is never blocked: clients keep reaching every node, as in Jepsen.

Everything is named with the ``kvj-`` prefix; :func:`cleanup` finds and removes
whatever an interrupted run left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

PREFIX = "kvj-"
GRUDGE_CHAIN = "kvj-grudge"
BRIDGE = "kvj-br"
DEFAULT_SUBNET = "10.77.0.0/24"
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/var/run/netns"


class NetworkError(RuntimeError):
    """A namespace, link or rule could not be set up or removed."""


def netns_supported() -> str | None:
    """None when namespaces can be used here, else why not (for a clear skip message)."""
    if os.geteuid() != 0:
        return "network namespaces need root (use the TCP proxy mode instead)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces"
    return None


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetworkError(f"setns failed: {os.strerror(errno)}")


@contextlib.contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """Run the calling *thread* inside netns ``name``, then return it to where it was.

    Only sockets this thread creates (and threads it starts) live in the
    namespace. The runner enters the control namespace this way from its main
    thread before any gRPC channel exists, so every gRPC thread inherits it.
    """
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(os.path.join(_NETNS_DIR, name), os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(original)
    finally:
        os.close(target)
        os.close(original)


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the network namespaces starting with ``prefix``."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def list_root_links(prefix: str = PREFIX) -> list[str]:
    """Links in the current namespace whose names start with ``prefix``."""
    out = _run(["ip", "-o", "link", "show"], check=False).stdout
    links = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            name = parts[1].strip().split("@", 1)[0]
            if name.startswith(prefix):
                links.append(name)
    return sorted(links)


def list_root_rules() -> list[str]:
    """iptables rules/chains in the current namespace that mention the prefix."""
    if shutil.which("iptables") is None:
        return []
    out = _run(["iptables", "-w", "-S"], check=False).stdout
    return [line for line in out.splitlines() if PREFIX in line.lower()]


def cleanup(prefix: str = PREFIX) -> list[str]:
    """Remove every namespace and link named ``prefix*``, and our iptables chain here.

    Deleting a namespace destroys its veth ends and iptables rules with it. The
    harness never creates anything in the root namespace, but an interrupted
    run or an older version might have: those are removed too. Returns what was
    removed, for the person running ``kvstore jepsen cleanup``.
    """
    removed = []
    for name in list_namespaces(prefix):
        # Kill what still runs inside (a node the run could not stop), or the
        # namespace lingers until it exits.
        pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.kill(int(pid), 9)
        _run(["ip", "netns", "del", name], check=False)
        removed.append(f"netns {name}" + (f" (killed {len(pids)} processes)" if pids else ""))
    for link in list_root_links(prefix):
        _run(["ip", "link", "del", link], check=False)
        removed.append(f"link {link}")
    for rule in list_root_rules():
        if rule.startswith("-A "):
            _run(["iptables", "-w", "-D", *rule[3:].split()], check=False)
            removed.append(f"rule {rule}")
    if shutil.which("iptables") is not None:
        _run(["iptables", "-w", "-F", GRUDGE_CHAIN], check=False)
        if _run(["iptables", "-w", "-X", GRUDGE_CHAIN], check=False).returncode == 0:
            removed.append(f"chain {GRUDGE_CHAIN}")
    return removed


Grudge = Mapping[int, Iterable[int]]


@dataclass
class NamespaceNetwork:
    """One control namespace with a bridge, and one namespace per node (1-based).

    Use as a context manager: the network is torn down on exit even when the
    body raised. ``tag`` makes the names unique per run.
    """

    nodes: int
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = DEFAULT_SUBNET
    created: bool = False
    _grudge: dict[int, frozenset[int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.subnet)
        if net.num_addresses < 16 + self.nodes:
            raise ValueError(f"subnet {self.subnet} too small for {self.nodes} nodes")
        self._net = net
        if len(f"{PREFIX}{self.tag}-ctl") > 32:
            raise ValueError("tag too long")

    # ----------------------------------------------------------------- names
    @property
    def control_namespace(self) -> str:
        return f"{PREFIX}{self.tag}-ctl"

    def namespace(self, node: int) -> str:
        self._check_node(node)
        return f"{PREFIX}{self.tag}-n{node}"

    @property
    def control_ip(self) -> str:
        return str(self._net.network_address + 1)

    def ip(self, node: int) -> str:
        self._check_node(node)
        return str(self._net.network_address + 10 + node)

    def exec_prefix(self, node: int) -> list[str]:
        """Prefix a command with this to run it inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(node)]

    def _check_node(self, node: int) -> None:
        if not 1 <= node <= self.nodes:
            raise ValueError(f"node {node} is not in 1..{self.nodes}")

    # ------------------------------------------------------------- lifecycle
    def create(self) -> NamespaceNetwork:
        """Build the namespaces, bridge and veths; on any failure, undo what was done."""
        why = netns_supported()
        if why:
            raise NetworkError(why)
        prefix_len = self._net.prefixlen
        ctl = self.control_namespace
        self.created = True
        try:
            _run(["ip", "netns", "add", ctl])
            _run(["ip", "-n", ctl, "link", "set", "lo", "up"])
            _run(["ip", "-n", ctl, "link", "add", BRIDGE, "type", "bridge"])
            _run(["ip", "-n", ctl, "addr", "add", f"{self.control_ip}/{prefix_len}", "dev", BRIDGE])
            _run(["ip", "-n", ctl, "link", "set", BRIDGE, "up"])
            for node in range(1, self.nodes + 1):
                ns, hub_end = self.namespace(node), f"{PREFIX}n{node}"
                _run(["ip", "netns", "add", ns])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                # Both ends are born inside our namespaces: nothing touches the root one.
                _run(["ip", "-n", ctl, "link", "add", hub_end, "type", "veth",
                      "peer", "name", "eth0", "netns", ns])
                _run(["ip", "-n", ctl, "link", "set", hub_end, "master", BRIDGE])
                _run(["ip", "-n", ctl, "link", "set", hub_end, "up"])
                _run(["ip", "-n", ns, "addr", "add", f"{self.ip(node)}/{prefix_len}", "dev", "eth0"])
                _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
                self._iptables(node, "-N", GRUDGE_CHAIN)
                self._iptables(node, "-I", "INPUT", "-j", GRUDGE_CHAIN)
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Remove every namespace of this network (their links and rules go with them)."""
        if not self.created:
            return
        cleanup(f"{PREFIX}{self.tag}-")
        self.created = False
        self._grudge.clear()

    def __enter__(self) -> NamespaceNetwork:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def enter_control(self) -> contextlib.AbstractContextManager[None]:
        """Run the calling thread in the control namespace (see :func:`in_namespace`)."""
        return in_namespace(self.control_namespace)

    # ------------------------------------------------------------ partitions
    def _iptables(self, node: int, *args: str) -> None:
        _run([*self.exec_prefix(node), "iptables", "-w", *args])

    def partition(self, grudge: Grudge) -> None:
        """Replace the current partition: node ``a`` drops all packets from each node in
        ``grudge[a]``. Pass symmetric grudges for a clean cut; a one-sided grudge
        blocks TCP both ways anyway (the handshake needs packets in both directions).
        """
        wanted = {a: frozenset(bs) for a, bs in grudge.items() if bs}
        for a, bs in wanted.items():
            self._check_node(a)
            for b in bs:
                self._check_node(b)
                if a == b:
                    raise ValueError(f"node {a} cannot hold a grudge against itself")
        with self._lock:
            for node in range(1, self.nodes + 1):
                if self._grudge.get(node, frozenset()) == wanted.get(node, frozenset()):
                    continue
                self._iptables(node, "-F", GRUDGE_CHAIN)
                for other in sorted(wanted.get(node, ())):
                    self._iptables(node, "-A", GRUDGE_CHAIN, "-s", self.ip(other), "-j", "DROP",
                                   "-m", "comment", "--comment", f"{PREFIX}grudge n{node}<-n{other}")
            self._grudge = dict(wanted)

    def heal(self) -> None:
        """Drop every grudge: full connectivity again."""
        self.partition({})

    @property
    def grudge(self) -> dict[int, frozenset[int]]:
        """The partition in force (empty when healed)."""
        with self._lock:
            return dict(self._grudge)

    def rules(self, node: int) -> list[str]:
        """The grudge rules in a node's namespace as iptables prints them (for tests, reports)."""
        out = _run([*self.exec_prefix(node), "iptables", "-w", "-S", GRUDGE_CHAIN]).stdout
        return [line for line in out.splitlines() if line.startswith("-A ")]
