"""Control-socket input that must be refused or bounded: a JSON ``true`` as the protocol
version, and a ``flows`` request without a limit on a large table."""

from __future__ import annotations

import socket

import pytest

from pyflow.control.model import Tuple
from pyflow.control.stats import Direction, FlowRecord, Traffic
from pyflow.daemon import views
from pyflow.daemon.api import parse_request
from pyflow.daemon.config import Config
from pyflow.daemon.devices import DeviceList
from pyflow.daemon.operations import Operations
from pyflow.errors import RequestError


@pytest.mark.parametrize("version", ["true", "1.0", '"1"'])
def test_version_must_be_the_integer(version):
    with pytest.raises(RequestError) as err:
        parse_request(b'{"version": %s, "command": "status"}' % version.encode())
    assert err.value.code == "bad_version"
    assert parse_request(b'{"version": 1, "command": "status"}') == ("status", {})


def _record(port: int) -> FlowRecord:
    orig = Tuple("198.18.0.2", "198.19.0.7", port, 443)
    reply = Tuple("198.19.0.7", "192.0.2.1", 443, port)
    seen = Traffic(1, 60)
    return FlowRecord(family=socket.AF_INET, proto=socket.IPPROTO_TCP, hardware=False,
                      original=Direction(orig, 2, 3, seen), reply=Direction(reply, 3, 2, seen),
                      mark=0, zone=0, age_ns=1, idle_ns=1)


def test_flows_without_a_limit_are_bounded():
    records = [_record(1024 + n) for n in range(1005)]
    res = views.flow_list(records, {}, {})
    assert len(res["flows"]) == 1000  # the documented default
    assert (res["total"], res["truncated"]) == (len(records), True)
    assert len(views.flow_list(records, {}, {"limit": len(records)})["flows"]) == len(records)
    for bad in (views.MAX_FLOW_LIMIT + 1, None, True):
        with pytest.raises(RequestError) as err:
            views.flow_list([], {}, {"limit": bad})
        assert err.value.code == "bad_request"


def test_deeply_nested_json_is_a_bad_request():
    with pytest.raises(RequestError) as err:
        parse_request(b"[" * 60000)
    assert err.value.code == "bad_request" and "nested too deeply" in str(err.value)


def _operations(tmp_path) -> Operations:
    """Operations without a datapath: these requests must be refused before touching one."""
    ops = Operations.__new__(Operations)
    ops.config = Config(path="f")
    ops.devices = DeviceList([], tmp_path)
    return ops


@pytest.mark.parametrize("name", ["a\0b", "[" * 60000, "x" * 16, "a:b"])
def test_device_requests_refuse_names_the_kernel_would(tmp_path, name):
    ops = _operations(tmp_path)
    for call in (lambda: ops.add_device(name, "auto"), lambda: ops.del_device(name)):
        with pytest.raises(RequestError) as err:
            call()
        assert err.value.code == "bad_request" and len(str(err.value)) < 200
