"""config: flags, the optional file, and defaults that form the local cluster."""
import pytest

from kvstore.server.config import OPTIONS, parse_args, parse_members


def test_defaults_are_member_1_of_the_local_cluster():
    cfg = parse_args([])
    assert cfg.id == 1
    assert cfg.clients == {1: "127.0.0.1:2379", 2: "127.0.0.1:2479", 3: "127.0.0.1:2579"}
    assert cfg.peers == {1: "127.0.0.1:2380", 2: "127.0.0.1:2480", 3: "127.0.0.1:2580"}
    assert cfg.listen_client_addr == "127.0.0.1:2379"
    assert cfg.data_dir.endswith("node1")
    assert (cfg.max_key_bytes, cfg.max_value_bytes, cfg.max_request_bytes) == (511, 1 << 20, 3 << 19)
    assert (cfg.max_txn_ops, cfg.max_batch_ops, cfg.snapshot_count) == (128, 1024, 10000)
    assert not cfg.testing_unsafe_local_reads and not cfg.testing_ack_before_commit


def test_id_selects_addresses():
    cfg = parse_args(["--id", "3"])
    assert cfg.listen_peer_addr == "127.0.0.1:2580"


def test_unknown_member_refused():
    with pytest.raises(SystemExit):
        parse_args(["--id", "4"])


def test_bad_member_spec():
    with pytest.raises(ValueError):
        parse_members("1=nohostport")


def test_config_file_and_flags_override(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('id = 2\nsnapshot-count = 50\ntesting_unsafe_local_reads = true\n')
    cfg = parse_args(["--config", str(f), "--snapshot-count", "70"])
    assert cfg.id == 2 and cfg.snapshot_count == 70 and cfg.testing_unsafe_local_reads


def test_config_file_unknown_key(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text("no_such_setting = 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(f)])


def test_every_option_has_help():
    assert all(o.help for o in OPTIONS)


def test_state_machine_sync_mode(capsys):
    assert parse_args([]).state_machine_sync == "boot"
    assert parse_args(["--state-machine-sync", "commit"]).state_machine_sync == "commit"
    with pytest.raises(SystemExit):
        parse_args(["--state-machine-sync", "never"])
    assert "--state-machine-sync must be one of boot, commit, not 'never'" in capsys.readouterr().err


def test_backend_batch_interval(capsys):
    assert parse_args([]).backend_batch_interval_s == 0.01
    assert parse_args(["--backend-batch-interval", "2s"]).backend_batch_interval_s == 2.0
    with pytest.raises(SystemExit):
        parse_args(["--backend-batch-interval", "soon"])
    assert "--backend-batch-interval: 'soon' is not a duration" in capsys.readouterr().err
