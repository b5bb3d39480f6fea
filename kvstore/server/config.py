"""A node's configuration: command-line flags, optionally a TOML/YAML file.

Every setting is declared once, in `OPTIONS`, and both `kvstore serve` and
`python -m kvstore.server.main` parse flags from it, so a flag documented in
`--help` is a flag the deploy files may use. A file given with `--config`
supplies defaults (keys are flag names, with dashes or underscores); flags on
the command line win.

The defaults describe member 1 of the default local cluster, so a bare
`kvstore serve --id N` for N in 1..3 forms a working cluster.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from kvstore.storage.sessions import DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_TTL_MS

# The default local cluster (what `Client()` with no endpoints talks to).
DEFAULT_NODES = 3
DEFAULT_BASE_CLIENT_PORT = 2379
DEFAULT_BASE_PEER_PORT = 2380
PORT_STRIDE = 100


def default_client_addr(i: int, host: str = "127.0.0.1", base: int = DEFAULT_BASE_CLIENT_PORT) -> str:
    return f"{host}:{base + PORT_STRIDE * (i - 1)}"


def default_peer_addr(i: int, host: str = "127.0.0.1", base: int = DEFAULT_BASE_PEER_PORT) -> str:
    return f"{host}:{base + PORT_STRIDE * (i - 1)}"


def format_members(addrs: dict[int, str]) -> str:
    return ",".join(f"{i}={a}" for i, a in sorted(addrs.items()))


DEFAULT_INITIAL_CLUSTER = format_members({i: default_peer_addr(i) for i in range(1, DEFAULT_NODES + 1)})
DEFAULT_INITIAL_CLUSTER_CLIENTS = format_members({i: default_client_addr(i) for i in range(1, DEFAULT_NODES + 1)})

MiB = 1 << 20
STATE_MACHINE_SYNC_MODES = ("boot", "commit")
LOG_FORMATS = ("text", "json")  # see logs.py


@dataclass(frozen=True)
class Option:
    flag: str  # "--max-key-bytes"
    type: type
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS: list[Option] = [
    # identity and addresses
    Option("--id", int, 1, "this member's id (1..N, a key of --initial-cluster)"),
    Option("--name", str, "", "a human-readable member name (default: node<id>)"),
    Option("--data-dir", str, "", "where the WAL, the LMDB state machine and snapshots live (default: ./data/node<id>)"),
    Option("--initial-cluster", str, DEFAULT_INITIAL_CLUSTER,
           "every member's peer address, advertised to the others: 'ID=HOST:PORT,...'"),
    Option("--initial-cluster-clients", str, DEFAULT_INITIAL_CLUSTER_CLIENTS,
           "every member's client address, used in leader redirects: 'ID=HOST:PORT,...'"),
    Option("--listen-client-addr", str, "",
           "address the client API binds (default: this member's entry in --initial-cluster-clients)"),
    Option("--listen-peer-addr", str, "",
           "address the peer API binds (default: this member's entry in --initial-cluster)"),
    Option("--listen-metrics-addr", str, "",
           "address of the HTTP endpoints /metrics, /health, /livez and /readyz, e.g. 127.0.0.1:2381 "
           "(default: none)"),
    Option("--cluster-id", int, 0, "an id shared by all members; peer messages from another cluster are refused"),
    # membership (etcd's flags)
    Option("--initial-cluster-state", str, "new",
           "'new': bootstrap a cluster of --initial-cluster; 'existing': join a running cluster this member "
           "was added to with `kvstore member add` (its member list is asked from --initial-cluster-clients)"),
    Option("--force-new-cluster", bool, False,
           "disaster recovery: make this member, with its data, the only member of its cluster; add the "
           "others back with `kvstore member add`"),
    Option("--max-learner-lag", int, 1000, "a learner is promoted only when at most this many entries behind"),
    Option("--strict-reconfig-check", bool, True,
           "refuse a membership change after which fewer members than a quorum have been heard from lately"),
    # timing
    Option("--tick-ms", int, 100, "length of one raft tick in milliseconds"),
    Option("--election-ticks", int, 10, "ticks without a leader before a follower campaigns"),
    Option("--heartbeat-ticks", int, 1, "ticks between leader heartbeats"),
    # snapshots and the log
    Option("--snapshot-count", int, 10000, "applied entries between snapshots"),
    Option("--snapshot-catchup-entries", int, 5000, "entries kept in the log after a snapshot, for slow followers"),
    Option("--backend-batch-interval", str, "10ms",
           "pause between one checkpoint of LMDB (its durable base) and the next while writes are applied; "
           "the file grows by the pages written from one to the next (etcd's name)"),
    Option("--wal-segment-bytes", int, 64 * MiB, "size of one WAL segment file"),
    Option("--state-machine-sync", str, "boot",
           "when LMDB commits are synced: 'boot' (left to the page cache; after an OS crash the state "
           "machine is rebuilt from the newest snapshot and the WAL) or 'commit' (one fdatasync per "
           "applied batch). The WAL is fsynced before every acknowledgement either way"),
    # limits (etcd-like)
    Option("--max-key-bytes", int, 511, "largest key accepted (at most 511: the LMDB key limit)"),
    Option("--max-value-bytes", int, 1 * MiB, "largest value accepted"),
    Option("--max-request-bytes", int, 3 * MiB // 2, "largest client request accepted"),
    Option("--max-txn-ops", int, 128, "most operations in one txn branch (and compares)"),
    Option("--max-batch-ops", int, 1024, "most operations in one Batch request"),
    Option("--max-stream-in-flight", int, 1024,
           "most requests unanswered on one client session stream; at the bound the member stops reading it"),
    Option("--request-timeout-ms", int, 10000, "how long a request may wait for commit when the client sets no deadline"),
    # exactly-once sessions: the same on every member (the state machine decides by them)
    Option("--session-ttl-ms", int, DEFAULT_SESSION_TTL_MS,
           "a client session idle this long (in log time, which follows the leaders' monotonic clocks) "
           "is dropped; its later requests are refused, never applied twice"),
    Option("--max-sessions", int, DEFAULT_MAX_SESSIONS,
           "most client sessions kept; one more evicts the least recently used (refused likewise)"),
    # TLS (etcd's flag names). https:// in the URLs above asks for it too.
    Option("--cert-file", str, "", "client API: this member's TLS certificate (PEM); clients then need TLS"),
    Option("--key-file", str, "", "client API: the key of --cert-file (PEM)"),
    Option("--trusted-ca-file", str, "", "client API: CA certificates that sign client certificates (PEM)"),
    Option("--client-cert-auth", bool, False,
           "client API: refuse clients without a certificate signed by --trusted-ca-file"),
    Option("--peer-cert-file", str, "",
           "peer API: this member's certificate, presented as server and as client (always mutual TLS)"),
    Option("--peer-key-file", str, "", "peer API: the key of --peer-cert-file (PEM)"),
    Option("--peer-trusted-ca-file", str, "", "peer API: the CA that signs every member's peer certificate (PEM)"),
    # authentication (etcd's flag name)
    Option("--auth-token-ttl", int, 300, "seconds an auth token stays valid after Authenticate"),
    # ops
    Option("--log-level", str, "info", "debug, info, warning or error"),
    Option("--log-format", str, "text", "text, or json: one object per line (ts, level, member, term, event, msg)"),
    Option("--corrupt-check-time", str, "0",
           "how often the leader compares every member's key/value hash and raises a CORRUPT alarm about "
           "one that differs, e.g. 30s or 5m (0: never)"),
    # history, watches and space (etcd's flag names)
    Option("--auto-compaction-mode", str, "periodic",
           "'periodic': keep --auto-compaction-retention of time (e.g. 1h); 'revision': keep that many "
           "revisions"),
    Option("--auto-compaction-retention", str, "0",
           "how much history auto-compaction keeps: a duration (periodic; a bare number is hours, as in "
           "etcd) or a revision count (revision); 0: never compact automatically"),
    Option("--auto-compaction-interval", str, "5m",
           "how often 'revision' mode compacts (etcd's fixed 5m); 'periodic' compacts every tenth of its "
           "retention, at most hourly"),
    Option("--quota-backend-bytes", int, 0,
           "space the store may use (0: 2 GiB, as etcd; at most 8 GiB); past it, writes that add data are "
           "refused and the NOSPACE alarm is raised until deletes and compaction free space"),
    Option("--watch-progress-notify-interval", str, "10m",
           "how often an idle watch that asked for progress notifications is told the revision reached"),
    # test-only modes that deliberately break guarantees (the Jepsen harness's teeth tests)
    Option("--testing-unsafe-local-reads", bool, False,
           "TESTING ONLY, UNSAFE: every member answers linearizable reads locally without ReadIndex"),
    Option("--testing-ack-before-commit", bool, False,
           "TESTING ONLY, UNSAFE: the leader acknowledges a write as soon as it is proposed"),
    Option("--testing-wall-clock-sessions", bool, False,
           "TESTING ONLY, UNSAFE: session expiry follows the leader's wall clock (one leader's clock "
           "jump expires every session)"),
    Option("--testing-peer-skip-client-verify", bool, False,
           "TESTING ONLY, UNSAFE: the peer API accepts TLS connections without checking the peer's certificate"),
    Option("--testing-auth-skip-txn-check", bool, False,
           "TESTING ONLY, UNSAFE: the ops inside a txn are not checked against the user's permissions"),
    Option("--testing-lease-deadlines-from-apply", bool, False,
           "TESTING ONLY, UNSAFE: every member starts a lease's clock when it applies it and a new leader "
           "keeps those clocks, forgetting the keep-alives its predecessor took (leases expire early)"),
    Option("--testing-corrupt-state", bool, False,
           "TESTING ONLY, UNSAFE: at start, write a key no log entry made, so this member's state diverges"),
]

URL_SCHEMES = ("http://", "https://")


def split_scheme(url: str) -> tuple[str, str]:
    """'https://h:p' -> ('https', 'h:p'); 'h:p' -> ('', 'h:p')."""
    url = url.strip()
    for scheme in URL_SCHEMES:
        if url.startswith(scheme):
            return scheme[:-3], url[len(scheme):].rstrip("/")
    return "", url


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """'30s', '5m', '1h', '500ms' or plain seconds ('0') -> seconds; ValueError otherwise."""
    t = str(text).strip()
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].replace(".", "", 1).isdigit():
            return float(t[: -len(unit)]) * _DURATION_UNITS[unit]
    if t.replace(".", "", 1).isdigit():
        return float(t)
    raise ValueError(f"{text!r} is not a duration (e.g. 30s, 5m, 1h, 500ms)")


def parse_members(spec: str) -> dict[int, str]:
    """'1=h:p,2=https://h:p' -> {1: 'h:p', 2: 'h:p'} (see `member_schemes` for the schemes)."""
    members: dict[int, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        ident, sep, addr = part.partition("=")
        addr = split_scheme(addr)[1]
        if not sep or not ident.strip().isdigit() or ":" not in addr:
            raise ValueError(f"bad member {part!r}: expected ID=HOST:PORT (or ID=https://HOST:PORT)")
        members[int(ident)] = addr
    return members


def member_schemes(spec: str) -> set[str]:
    """The URL schemes written in a member list ('' for a bare HOST:PORT)."""
    return {split_scheme(part.partition("=")[2])[0] for part in spec.split(",") if part.strip()}


@dataclass
class ServerConfig:
    id: int = 1
    name: str = ""
    data_dir: str = ""
    peers: dict[int, str] = field(default_factory=dict)  # id -> advertised peer addr
    clients: dict[int, str] = field(default_factory=dict)  # id -> advertised client addr
    listen_client_addr: str = ""
    listen_peer_addr: str = ""
    listen_metrics_addr: str = ""
    cluster_id: int = 0
    initial_cluster_state: str = "new"
    force_new_cluster: bool = False
    max_learner_lag: int = 1000
    strict_reconfig_check: bool = True
    tick_ms: int = 100
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    snapshot_count: int = 10000
    snapshot_catchup_entries: int = 5000
    backend_batch_interval: str = "10ms"
    wal_segment_bytes: int = 64 * MiB
    state_machine_sync: str = "boot"
    max_key_bytes: int = 511
    max_value_bytes: int = 1 * MiB
    max_request_bytes: int = 3 * MiB // 2
    max_txn_ops: int = 128
    max_batch_ops: int = 1024
    max_stream_in_flight: int = 1024
    request_timeout_ms: int = 10000
    session_ttl_ms: int = DEFAULT_SESSION_TTL_MS
    max_sessions: int = DEFAULT_MAX_SESSIONS
    log_level: str = "info"
    log_format: str = "text"
    corrupt_check_time: str = "0"
    auto_compaction_mode: str = "periodic"
    auto_compaction_retention: str = "0"
    auto_compaction_interval: str = "5m"
    watch_progress_notify_interval: str = "10m"
    quota_backend_bytes: int = 0
    testing_unsafe_local_reads: bool = False
    cert_file: str = ""
    key_file: str = ""
    trusted_ca_file: str = ""
    client_cert_auth: bool = False
    peer_cert_file: str = ""
    peer_key_file: str = ""
    peer_trusted_ca_file: str = ""
    testing_ack_before_commit: bool = False
    testing_wall_clock_sessions: bool = False
    testing_peer_skip_client_verify: bool = False
    testing_corrupt_state: bool = False
    auth_token_ttl: int = 300
    testing_auth_skip_txn_check: bool = False
    testing_lease_deadlines_from_apply: bool = False

    @property
    def corrupt_check_s(self) -> float:
        """--corrupt-check-time in seconds (0: no periodic check)."""
        return parse_duration(self.corrupt_check_time)

    @property
    def backend_batch_interval_s(self) -> float:
        """--backend-batch-interval in seconds."""
        return parse_duration(self.backend_batch_interval)

    @property
    def member_ids(self) -> list[int]:
        return sorted(self.peers)


def _load_file(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml  # optional dependency, only for YAML config files

        data = yaml.safe_load(raw) or {}
    else:
        import tomllib

        data = tomllib.loads(raw.decode())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser(prog: str = "kvstore serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run one kvstore node.")
    p.add_argument("--config", default=None, help="a TOML or YAML file of settings (flags override it)")
    for opt in OPTIONS:
        if opt.type is bool and opt.default:  # on by default: --no-... turns it off
            p.add_argument(opt.flag, dest=opt.dest, action=argparse.BooleanOptionalAction, default=None,
                           help=opt.help)
        elif opt.type is bool:
            p.add_argument(opt.flag, dest=opt.dest, action="store_true", default=None, help=opt.help)
        else:
            p.add_argument(opt.flag, dest=opt.dest, type=opt.type, default=None, help=help_with_default(opt))
    return p


def help_with_default(opt: Option) -> str:
    """The flag's help naming its default once: a help that describes a derived default keeps its own."""
    if "(default:" in opt.help:
        return opt.help
    return f"{opt.help} (default: {'none' if opt.default == '' else repr(opt.default)})"


def parse_args(argv: list[str] | None = None, prog: str = "kvstore serve") -> ServerConfig:
    """Flags (and the optional file) -> a validated ServerConfig. Raises SystemExit on bad input."""
    parser = build_parser(prog)
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {opt.dest: opt.default for opt in OPTIONS}
    known = set(values)
    if ns.config:
        try:
            from_file = _load_file(ns.config)
        except (OSError, ValueError) as e:
            parser.error(f"--config {ns.config}: {e}")
        unknown = set(from_file) - known
        if unknown:
            parser.error(f"--config {ns.config}: unknown settings: {', '.join(sorted(unknown))}")
        values.update(from_file)
    for opt in OPTIONS:
        v = getattr(ns, opt.dest)
        if v is not None:
            values[opt.dest] = v
    try:
        return make_config(values)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable


def _check_tls(cfg: ServerConfig, peer_schemes: set[str], client_schemes: set[str]) -> None:
    """TLS is on for a listener when its cert file is set; the URLs' schemes must agree with that."""
    if cfg.cert_file or cfg.key_file:
        if not (cfg.cert_file and cfg.key_file):
            raise ValueError("client TLS needs both --cert-file and --key-file")
        if "http" in client_schemes:
            raise ValueError("--cert-file is set, so client URLs must be https://, not http://")
    elif "https" in client_schemes:
        raise ValueError("https:// client URLs need --cert-file and --key-file")
    if cfg.client_cert_auth and not cfg.trusted_ca_file:
        raise ValueError("--client-cert-auth needs --trusted-ca-file (the CA that signs client certificates)")
    if cfg.trusted_ca_file and not cfg.cert_file:
        raise ValueError("--trusted-ca-file needs --cert-file and --key-file (client TLS)")
    peer_files = (cfg.peer_cert_file, cfg.peer_key_file, cfg.peer_trusted_ca_file)
    if any(peer_files):
        if not all(peer_files):
            raise ValueError("peer TLS is mutual: it needs --peer-cert-file, --peer-key-file and --peer-trusted-ca-file")
        if "http" in peer_schemes:
            raise ValueError("--peer-cert-file is set, so peer URLs must be https://, not http://")
    elif "https" in peer_schemes:
        raise ValueError("https:// peer URLs need --peer-cert-file, --peer-key-file and --peer-trusted-ca-file")


def make_config(values: dict[str, Any]) -> ServerConfig:
    peer_schemes = member_schemes(values["initial_cluster"])
    client_schemes = member_schemes(values["initial_cluster_clients"])
    peers = parse_members(values.pop("initial_cluster"))
    clients = parse_members(values.pop("initial_cluster_clients"))
    for key, schemes in (("listen_peer_addr", peer_schemes), ("listen_client_addr", client_schemes)):
        if values.get(key):
            scheme, values[key] = split_scheme(values[key])
            schemes.add(scheme)
    cfg = ServerConfig(peers=peers, clients=clients, **values)
    _check_tls(cfg, peer_schemes, client_schemes)
    if cfg.id not in peers:
        raise ValueError(f"--id {cfg.id} is not a member of --initial-cluster ({sorted(peers)})")
    if set(clients) != set(peers):
        raise ValueError("--initial-cluster and --initial-cluster-clients must name the same members")
    if cfg.initial_cluster_state not in ("new", "existing"):
        raise ValueError(f"--initial-cluster-state must be 'new' or 'existing', not {cfg.initial_cluster_state!r}")
    if cfg.max_learner_lag < 0:
        raise ValueError(f"--max-learner-lag must be >= 0, not {cfg.max_learner_lag}")
    if cfg.tick_ms <= 0 or cfg.heartbeat_ticks <= 0 or cfg.election_ticks <= cfg.heartbeat_ticks:
        raise ValueError("need --tick-ms > 0 and --election-ticks > --heartbeat-ticks > 0")
    if cfg.snapshot_count <= 0 or cfg.snapshot_catchup_entries < 0:
        raise ValueError("need --snapshot-count > 0 and --snapshot-catchup-entries >= 0")
    if cfg.session_ttl_ms <= 0 or cfg.max_sessions <= 0:
        raise ValueError("need --session-ttl-ms > 0 and --max-sessions > 0")
    try:
        parse_duration(cfg.corrupt_check_time)
    except ValueError as e:
        raise ValueError(f"--corrupt-check-time: {e}") from None
    from .auto_compaction import check_auto_compaction

    check_auto_compaction(cfg.auto_compaction_mode, cfg.auto_compaction_retention, cfg.auto_compaction_interval)
    from kvstore.storage.quota import MAX_QUOTA_BYTES

    if not 0 <= cfg.quota_backend_bytes <= MAX_QUOTA_BYTES:
        raise ValueError(f"--quota-backend-bytes must be between 0 (the 2 GiB default) and {MAX_QUOTA_BYTES}, "
                         f"not {cfg.quota_backend_bytes}")
    try:
        parse_duration(cfg.watch_progress_notify_interval)
    except ValueError as e:
        raise ValueError(f"--watch-progress-notify-interval: {e}") from None
    try:
        parse_duration(cfg.backend_batch_interval)
    except ValueError as e:
        raise ValueError(f"--backend-batch-interval: {e}") from None
    if cfg.listen_metrics_addr and ":" not in cfg.listen_metrics_addr:
        raise ValueError(f"--listen-metrics-addr {cfg.listen_metrics_addr!r}: expected HOST:PORT")
    if cfg.state_machine_sync not in STATE_MACHINE_SYNC_MODES:
        raise ValueError(f"--state-machine-sync must be one of {', '.join(STATE_MACHINE_SYNC_MODES)}, "
                         f"not {cfg.state_machine_sync!r}")
    if cfg.auth_token_ttl < 1:
        raise ValueError(f"--auth-token-ttl must be >= 1 (seconds), not {cfg.auth_token_ttl}")
    if cfg.max_stream_in_flight < 1:
        raise ValueError(f"--max-stream-in-flight must be >= 1, not {cfg.max_stream_in_flight}")
    if cfg.log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {cfg.log_format!r}")
    from kvstore.storage.keys import MAX_KEY_BYTES

    if not 0 < cfg.max_key_bytes <= MAX_KEY_BYTES:
        raise ValueError(f"--max-key-bytes must be between 1 and {MAX_KEY_BYTES} (the storage's key limit)")
    if not cfg.name:
        cfg.name = f"node{cfg.id}"
    if not cfg.data_dir:
        cfg.data_dir = os.path.join("data", f"node{cfg.id}")
    if not cfg.listen_client_addr:
        cfg.listen_client_addr = clients[cfg.id]
    if not cfg.listen_peer_addr:
        cfg.listen_peer_addr = peers[cfg.id]
    return cfg
