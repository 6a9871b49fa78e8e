"""Config values that used to pass check-config and then end the daemon (nan, inf, numbers
beyond what the loop or conntrack can take, nesting deep enough to overflow the parser's
stack), input that reached the kernel or the datapath's build unchecked (device names,
bpffs_dir), and a config file that someone other than root can change."""

from __future__ import annotations

import json
import os

import pytest

from pyflow.daemon import main as pyflowd
from pyflow.daemon.config import FLOW_MAP_ENTRIES, OFFLOAD_BOUNDS, ConfigError, check_device, load, parse


@pytest.mark.parametrize("key, value", [
    ("idle_timeout", "nan"), ("idle_timeout", "inf"), ("idle_timeout", "-inf"), ("idle_timeout", "1e19"),
    ("idle_timeout", "86401"), ("keepalive_interval", "nan"), ("keepalive_interval", "0.001"),
    ("keepalive_interval", "3600"), ("conntrack_timeout", "4294967296"), ("conntrack_timeout", "604801"),
    ("conntrack_timeout", "9223372036854775807"), ("conntrack_timeout", "0"),
])
def test_numbers_are_finite_and_bounded(key, value):
    with pytest.raises(ConfigError, match=f"^f: offload.{key}: must be between"):
        parse(f"[offload]\n{key} = {value}\n", "f")


def test_the_bounds_themselves_are_accepted():
    for key, (low, high) in OFFLOAD_BOUNDS.items():
        for value in (low, high):
            assert getattr(parse(f"[offload]\n{key} = {value}\n", "f").offload, key) == value


@pytest.mark.parametrize("value", ["0", "1023", "16777217", "-1", "1e6", "true"])
def test_flow_map_entries_is_a_bounded_integer(value):
    with pytest.raises(ConfigError, match="^f: daemon.flow_map_entries: must be"):
        parse(f"[daemon]\nflow_map_entries = {value}\n", "f")


def test_flow_map_entries_bounds_are_accepted_and_reach_the_datapath():
    for value in FLOW_MAP_ENTRIES:
        assert parse(f"[daemon]\nflow_map_entries = {value}\n", "f").daemon.flow_map_entries == value
    daemon = pyflowd.Daemon.__new__(pyflowd.Daemon)  # only the config is read
    daemon.config = parse("[daemon]\nflow_map_entries = 4096\n", "f")
    assert daemon._datapath_options()["defines"] == {"PYFLOW_MAX_FLOWS": 4096}


@pytest.mark.parametrize("text", [
    "x = " + "[" * 5000 + "]" * 5000 + "\n",
    "[[device]]\nname = " + "[" * 60000 + "\n",
    "x = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n",
])
def test_deep_nesting_is_a_config_error(text):
    with pytest.raises(ConfigError, match="^f: not valid TOML"):
        parse(text, "f")


def test_check_config_reports_deep_nesting_instead_of_a_traceback(tmp_path, capsys):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    assert pyflowd.main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"pyflowd: {path}: not valid TOML")


@pytest.mark.parametrize("name", [
    "a\0b", "\0", "[" * 60000, "x" * 16, "é" * 8, "a b", "a\tb", "a/b", "a:b", ".", "..", "\ud800", "a\x7fb",
])
def test_device_names_follow_the_kernel(name):
    with pytest.raises(ConfigError, match="is not a valid interface name") as err:
        check_device(name, "auto", "add-device")
    assert len(str(err.value)) < 200  # a 60k name is not echoed whole


def test_valid_device_names_pass():
    for name in ("eth0", "x" * 15, "é" * 7, "br-lan.10", "wg_0", "veth@x"):
        assert check_device(name, "tc", "f").name == name


@pytest.mark.parametrize("path", ['/sys/fs/bpf/a"b', "/sys/fs/bpf/a b", "/sys/fs/bpf/$(x)",
                                  "/sys/fs/bpf/a\\b", "/sys/fs/bpf/../x", "/sys/fs/bpf/a\nb"])
def test_bpffs_dir_is_a_path_of_safe_characters(path):
    with pytest.raises(ConfigError, match="daemon.bpffs_dir"):
        parse(f"[daemon]\nbpffs_dir = {json.dumps(path)}\n", "f")  # a JSON string is a TOML one
    with pytest.raises(ConfigError, match="command line: daemon.bpffs_dir"):
        parse("", "f").with_overrides(bpffs_dir=path)


@pytest.mark.parametrize("key", ["socket", "state_dir"])
def test_paths_refuse_nul_and_control_characters(key):
    with pytest.raises(ConfigError, match=f"command line: daemon.{key}"):
        parse("", "f").with_overrides(**{key: "/run/a\0b"})


def test_socket_path_must_fit_sun_path():
    with pytest.raises(ConfigError, match="daemon.socket: longer than"):
        parse("", "f").with_overrides(socket="/" + "s" * 107)


def test_a_config_writable_by_others_is_refused(tmp_path):
    path = tmp_path / "pyflowd.toml"
    path.write_text('[[device]]\nname = "eth1"\n')
    for mode in (0o666, 0o646, 0o664):
        os.chmod(path, mode)
        with pytest.raises(ConfigError, match="writable by group or others"):
            load(str(path))
    os.chmod(path, 0o644)
    assert load(str(path)).devices[0].name == "eth1"


def test_a_symlinked_config_is_not_followed(tmp_path):
    real = tmp_path / "real.toml"
    real.write_text("")
    link = tmp_path / "pyflowd.toml"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="symbolic link"):
        load(str(link))


def test_a_fifo_or_an_oversized_config_is_refused(tmp_path):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(ConfigError, match="not a regular file"):
        load(str(fifo))
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load(str(big))


class _Ops:
    """The daemon's operations as reload sees them: a loop that runs the call at once."""

    def __init__(self) -> None:
        self.cp = self
        self.config = None
        self.reloaded: list = []

    def call(self, fn):
        return fn()

    def reload(self, new) -> None:
        self.reloaded.append(new)
        self.config = new


def _daemon(path) -> pyflowd.Daemon:
    daemon = pyflowd.Daemon(parse("", "f"), str(path), {}, pyflowd.Notifier({}))
    daemon.ops = _Ops()
    return daemon


@pytest.mark.parametrize("text", ["[offload]\nidle_timeout = nan\n", "[offload]\nkeepalive_interval = inf\n",
                                  "x = " + "[" * 5000 + "]" * 5000 + "\n"])
def test_reload_of_a_bad_config_keeps_the_running_one(tmp_path, caplog, text):
    path = tmp_path / "pyflowd.toml"
    path.write_text(text)
    daemon = _daemon(path)
    before = daemon.config
    daemon.reload()
    assert daemon.ops.reloaded == [] and daemon.config is before
    assert "reload refused, keeping the running config" in caplog.text


def test_any_failure_to_load_is_an_error_not_the_end(tmp_path, caplog, capsys, monkeypatch):
    def broken(_path):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(pyflowd, "load", broken)
    daemon = _daemon(tmp_path / "pyflowd.toml")
    daemon.reload()
    assert daemon.ops.reloaded == [] and "RecursionError" in caplog.text
    assert pyflowd.main(["--config", str(tmp_path / "pyflowd.toml")]) == 2
    assert "pyflowd: cannot load the config: RecursionError" in capsys.readouterr().err
