"""Helpers for tests of the HTTP endpoints: a proxied cluster (partitions without root) and GETs."""
from __future__ import annotations

import contextlib
import re
import urllib.error
import urllib.request
from collections.abc import Iterator

from kvstore.jepsen.proxy import ProxyNetwork, free_port
from kvstore.launcher import LocalCluster


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body) of a GET; (0, reason) if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def metric(text: str, name: str, labels: str = "") -> float | None:
    """The value of one sample in Prometheus text (labels as printed, e.g. '{To="2"}')."""
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


@contextlib.contextmanager
def proxied_cluster(base_dir: str, extra_args=(), node_args: dict[int, list[str]] | None = None,
                    nodes: int = 3) -> Iterator[tuple[LocalCluster, ProxyNetwork]]:
    """A cluster whose peer links run through proxies the test can cut, with HTTP endpoints on."""
    ids = list(range(1, nodes + 1))
    with ProxyNetwork(ids) as net:
        args = {n: ["--initial-cluster", ",".join(f"{m}={a}" for m, a in sorted(net.peer_addrs_for(n).items())),
                    *(node_args or {}).get(n, [])] for n in ids}
        lc = LocalCluster(base_dir, nodes, extra_args=list(extra_args),
                          client_addrs={n: f"127.0.0.1:{net.client_port(n)}" for n in ids},
                          peer_addrs={n: net.listen_peer_addr(n) for n in ids},
                          metrics_addrs={n: f"127.0.0.1:{free_port()}" for n in ids},
                          node_args=args)
        with lc:
            lc.wait_for_leader(60)
            yield lc, net
