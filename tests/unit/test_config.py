"""pyflowd's config: typed defaults, rejection naming the key, command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyflow.daemon.config import DEVICE_MODES, Config, ConfigError, load, parse, parse_address

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "pyflowd.toml"


def test_the_example_file_shows_the_defaults():
    cfg = parse(EXAMPLE.read_text(), str(EXAMPLE))
    assert cfg.daemon == Config().daemon
    assert cfg.offload == Config().offload
    assert all(d.mode in DEVICE_MODES for d in cfg.devices)


def test_empty_file_means_defaults_and_ints_are_accepted_for_floats():
    assert parse("", "f").daemon.metrics_address == "127.0.0.1:9469"
    assert parse("[offload]\nidle_timeout = 5\n", "f").offload.idle_timeout == 5.0


@pytest.mark.parametrize("text, message", [
    ("[daemon]\nsocket_gruop = 'x'\n", "f: daemon.socket_gruop: unknown key"),
    ("[deamon]\n", "f: deamon: unknown key"),
    ("[offload]\nidle_timeout = 'long'\n", "f: offload.idle_timeout: must be a number, not str 'long'"),
    ("[offload]\nconntrack_timeout = 1.5\n", "f: offload.conntrack_timeout: must be an integer"),
    ("[offload]\nconntrack_timeout = true\n", "f: offload.conntrack_timeout: must be an integer"),
    ("[offload]\nhw_skip_hw = 1\n", "f: offload.hw_skip_hw: must be true or false"),
    ("[offload]\nidle_timeout = 0\n", "f: offload.idle_timeout: must be between 0.1 and 86400"),
    ("[offload]\noffload_mark = 0x100000000\n", "f: offload.offload_mark: must fit 32 bits"),
    ("[offload]\noffload_mark = 1\nexclude_mark_mask = 3\n", "f: offload.offload_mark: shares bits"),
    ("[daemon]\nlog_level = 'loud'\n", "f: daemon.log_level: 'loud' is not one of"),
    ("[daemon]\nmetrics_address = '9469'\n", "f: daemon.metrics_address:"),
    ("[daemon]\nmetrics_address = '::1:9469'\n", "f: daemon.metrics_address:"),
    ("[daemon]\nsocket = 'relative.sock'\n", "f: daemon.socket: must be an absolute path"),
    ("[daemon]\nsocket_group = 'no-such-group-pyflow'\n", "f: daemon.socket_group: no such group"),
    ("[[device]]\nmode = 'tc'\n", "f: device[0].name: missing"),
    ("[[device]]\nname = 'eth1'\nmode = 'fast'\n", "f: device[0]: mode: 'fast' is not one of"),
    ("[[device]]\nname = 'eth1'\nspeed = 1\n", "f: device[0].speed: unknown key"),
    ("[[device]]\nname = 'a-name-far-too-long'\n", "is not a valid interface name"),
    ("[[device]]\nname = 'eth1'\n[[device]]\nname = 'eth1'\n", "f: device[1].name: eth1 is listed twice"),
    ("device = 'eth1'\n", "f: device: must be an array of tables"),
    ("[daemon\n", "f: not valid TOML"),
])
def test_bad_config_is_rejected_naming_the_key(text, message):
    with pytest.raises(ConfigError) as err:
        parse(text, "f")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_are_validated_too():
    cfg = parse("", "f").with_overrides(socket="/tmp/x.sock", metrics_address=None)
    assert cfg.daemon.socket == "/tmp/x.sock" and cfg.daemon.metrics_address == "127.0.0.1:9469"
    with pytest.raises(ConfigError, match="command line: daemon.metrics_address"):
        cfg.with_overrides(metrics_address="nowhere")
    assert cfg.with_overrides(metrics_address="").daemon.metrics_address == ""


def test_missing_default_file_is_defaults_but_a_named_file_must_exist(tmp_path, monkeypatch):
    monkeypatch.setattr("pyflow.daemon.config.DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert load(None) == Config()
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "absent.toml"))


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:9469", ("127.0.0.1", 9469)), ("[::1]:80", ("::1", 80)), ("localhost:1", ("localhost", 1)),
])
def test_parse_address(text, want):
    assert parse_address(text) == want


@pytest.mark.parametrize("text", ["127.0.0.1", ":9469", "127.0.0.1:0", "127.0.0.1:70000", "host:80",
                                  "::1:80"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError):
        parse_address(text)
