"""pyflowd's own state without a datapath (no root): the wanted device list and its file,
the reload rules, and the JSON views rendered from typed records."""

from __future__ import annotations

import json
import logging
import socket

import pytest

from pyflow.control.model import Tuple
from pyflow.control.stats import Direction, FlowRecord, Traffic
from pyflow.daemon import views
from pyflow.daemon.config import Config, DaemonConfig, DeviceConfig, OffloadConfig
from pyflow.daemon.devices import DEVICES_FILE, DeviceList
from pyflow.daemon.operations import reloadable
from pyflow.errors import RequestError


def test_runtime_devices_survive_and_the_config_wins(tmp_path):
    devices = DeviceList([DeviceConfig("lan0", "tc")], tmp_path)
    devices.runtime["wan0"] = "native"
    devices.save()
    saved = json.loads((tmp_path / DEVICES_FILE).read_text())
    assert saved == {"version": 1, "devices": [{"name": "wan0", "mode": "native"}]}
    again = DeviceList([DeviceConfig("lan0", "tc")], tmp_path)
    assert again.wanted() == {"lan0": ("tc", "config"), "wan0": ("native", "runtime")}
    again.set_configured([DeviceConfig("wan0", "auto")])  # a reload: the file owns it now
    assert again.wanted() == {"wan0": ("auto", "config")} and again.runtime == {}
    assert again.origin("eth7") == ("auto", "adopted")


def test_an_unreadable_device_file_is_ignored(tmp_path, caplog):
    (tmp_path / DEVICES_FILE).write_text('{"version": 7, "devices": []}')
    with caplog.at_level(logging.ERROR):
        assert DeviceList([], tmp_path).runtime == {}
    assert "version 7, expected 1" in caplog.text


def test_reload_keeps_what_needs_a_restart(caplog):
    old = Config(daemon=DaemonConfig(socket="/run/a.sock"), offload=OffloadConfig(offload_mark=1))
    new = Config(daemon=DaemonConfig(socket="/run/b.sock", log_level="debug"),
                 offload=OffloadConfig(offload_mark=2, idle_timeout=5.0))
    with caplog.at_level(logging.WARNING):
        got = reloadable(old, new)
    assert (got.daemon.socket, got.daemon.log_level) == ("/run/a.sock", "debug")
    assert (got.offload.offload_mark, got.offload.idle_timeout) == (1, 5.0)
    assert "daemon.socket changed" in caplog.text and "offload.offload_mark changed" in caplog.text


def test_reload_keeps_the_datapath_build_until_a_restart(caplog):
    old = Config(daemon=DaemonConfig(datapath_build="prebuilt"))
    new = Config(daemon=DaemonConfig(datapath_build="bcc"))
    with caplog.at_level(logging.WARNING):
        got = reloadable(old, new)
    assert got.daemon.datapath_build == "prebuilt"
    assert "daemon.datapath_build changed; it takes effect at the next restart" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        reloadable(old, old)
    assert "datapath_build" not in caplog.text


def _record(hardware: bool = False) -> FlowRecord:
    orig = Tuple("198.18.0.2", "198.19.0.7", 40000, 443)
    reply = Tuple("198.19.0.7", "192.0.2.1", 443, 40000)
    counters = None if hardware else Traffic(5, 700)
    return FlowRecord(family=socket.AF_INET, proto=socket.IPPROTO_TCP, hardware=hardware,
                      original=Direction(orig, 2, 3, counters), reply=Direction(reply, 3, 2, counters),
                      mark=0, zone=0, age_ns=2_500_000_000, idle_ns=1_000_400)


def test_flows_view_and_filter():
    names = {2: "lan0"}  # ifindex 3 unknown: shown by number
    res = views.flow_list([_record(), _record(hardware=True)], names, {"limit": 1, "port": 443})
    assert (res["total"], res["truncated"], len(res["flows"])) == (2, True, 1)
    flow = res["flows"][0]
    assert (flow["family"], flow["proto"], flow["placement"]) == ("ipv4", "tcp", "software")
    assert flow["original"] == {"src": "198.18.0.2", "dst": "198.19.0.7", "sport": 40000, "dport": 443,
                                "in_device": "lan0", "out_device": "3", "packets": 5, "bytes": 700}
    assert (flow["age_seconds"], flow["idle_seconds"]) == (2.5, 0.001)
    hw = views.flow(_record(hardware=True), names)
    assert hw["placement"] == "hardware" and hw["reply"]["packets"] is None
    assert views.flow_list([_record()], names, {"addr": "192.0.2.0/24", "device": "3"})["total"] == 1
    assert views.flow_list([_record()], names, {"proto": "udp"})["total"] == 0
    for bad in ({"limit": -1}, {"proto": "icmp"}, {"addr": "nowhere"}, {"port": 0}, {"device": 3}):
        with pytest.raises(RequestError) as err:
            views.flow_list([], names, bad)
        assert err.value.code == "bad_request"
