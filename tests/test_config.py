"""Configuration: defaults < TOML file < PIGEON_* variables < command-line flags."""

from __future__ import annotations

import pytest

from server import ConfigError, load_config


def test_defaults():
    config = load_config(env={})
    assert config.data == "./pigeon-data" and config.listen == ["127.0.0.1:7600"]
    assert config.store.sync is True and config.store.retention_days == 90


def test_precedence_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "pigeon.toml"
    path.write_text('data = "/from/file"\nmax_calls = 7\n[store]\nretention_days = 30\nmap_size_mb = 64\n')
    env = {"PIGEON_DATA": "/from/env", "PIGEON_STORE__MAP_SIZE_MB": "128", "PIGEON_LISTEN": "127.0.0.1:1, unix:/tmp/p.sock"}
    config = load_config(str(path), env=env, overrides={"data": "/from/flag"})
    assert config.data == "/from/flag"
    assert config.max_calls == 7
    assert config.store.retention_days == 30 and config.store.map_size_mb == 128
    assert config.listen == ["127.0.0.1:1", "unix:/tmp/p.sock"]


def test_config_file_from_environment_and_from_the_working_folder(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.toml"
    path.write_text("max_calls = 9\n")
    assert load_config(env={"PIGEON_CONFIG": str(path)}).max_calls == 9
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pigeon.toml").write_text("max_calls = 11\n")
    assert load_config(env={}).max_calls == 11


def test_bad_value_names_key_and_source(tmp_path):
    with pytest.raises(ConfigError, match=r"'store.map_size_mb' \(from environment variable PIGEON_STORE__MAP_SIZE_MB\)"):
        load_config(env={"PIGEON_STORE__MAP_SIZE_MB": "lots"})
    path = tmp_path / "p.toml"
    path.write_text("max_calls = 0\n")
    with pytest.raises(ConfigError, match=r"'max_calls' \(from .*p.toml\).*>= 1"):
        load_config(str(path), env={})


def test_the_registration_cap_is_a_setting():
    assert load_config(env={}).store.max_registrations == 50
    assert load_config(env={"PIGEON_STORE__MAX_REGISTRATIONS": "5"}).store.max_registrations == 5
    with pytest.raises(ConfigError, match=r"'store.max_registrations' \(from environment variable .*\).*>= 1"):
        load_config(env={"PIGEON_STORE__MAX_REGISTRATIONS": "0"})


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[store]\nretention_dayz = 3\n")
    with pytest.raises(ConfigError, match=r"unknown configuration key 'store.retention_dayz' \(from .*p.toml\)"):
        load_config(str(path), env={})


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        load_config(str(tmp_path / "missing.toml"), env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("data = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad), env={})


def test_tls_needs_both_files(tmp_path):
    from server import Server

    with pytest.raises(ConfigError, match="both tls_cert and tls_key"):
        Server(load_config(env={}, overrides={"data": str(tmp_path), "tls_cert": "x.pem"}))


def test_unknown_environment_variables_are_ignored_with_a_warning(caplog):
    config = load_config(env={"PIGEON_DISABLED_PLUGINS": "x", "PIGEON_STORE__COLOUR": "blue", "PIGEON_DATA": "/d"})
    assert config.data == "/d"
    assert "PIGEON_DISABLED_PLUGINS" in caplog.text and "PIGEON_STORE__COLOUR" in caplog.text


def test_limits_that_cannot_work_are_refused():
    with pytest.raises(ConfigError, match="'listen'"):
        load_config(env={"PIGEON_LISTEN": ""})
    with pytest.raises(ConfigError, match="'max_frame'.*>= 1024"):
        load_config(env={"PIGEON_MAX_FRAME": "64"})


def test_the_ingest_budget_has_defaults_and_keys():
    config = load_config(env={})
    assert (config.ingest.backlog_events, config.ingest.backlog_mb) == (50_000, 32)
    config = load_config(env={"PIGEON_INGEST__BACKLOG_EVENTS": "7", "PIGEON_INGEST__BACKLOG_MB": "1"})
    assert (config.ingest.backlog_events, config.ingest.backlog_mb) == (7, 1)
    with pytest.raises(ConfigError, match=r"'ingest.backlog_events'"):
        load_config(env={"PIGEON_INGEST__BACKLOG_EVENTS": "0"})
