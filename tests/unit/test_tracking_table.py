"""pyflowd's conntrack table (pyflow.daemon.tracking) against a fake nft: when it is added
and removed, how "tracking is on" is read from a ruleset, what happens without nft, and
the config knob and metrics that show it."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import generate_latest

from pyflow.control.stats import LoopStats
from pyflow.daemon import tracking as T
from pyflow.daemon.config import ConfigError, load
from pyflow.daemon.metrics import registry_for
from pyflow.daemon.stats import Stats

OPERATOR = [  # the operator's table: a forward counter that does not use conntrack
    {"table": {"family": "inet", "name": "fw", "handle": 1}},
    {"chain": {"family": "inet", "table": "fw", "name": "forward", "handle": 1, "type": "filter",
               "hook": "forward", "prio": 0, "policy": "accept"}},
    {"rule": {"family": "inet", "table": "fw", "chain": "forward", "handle": 2,
              "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                       {"counter": {"packets": 0, "bytes": 0}}]}},
]


def _rule(expr, table="fw"):
    return {"rule": {"family": "inet", "table": table, "chain": "forward", "handle": 9, "expr": expr}}


class FakeNft(T.Nft):
    """nft over a list of ruleset objects: `-f -` with pyflowd's script adds its table,
    `delete table` removes one; every call is recorded."""

    def __init__(self, items=None, *, fail_add: str | None = None):
        super().__init__(binary="/nonexistent/nft")
        self.items = list(OPERATOR if items is None else items)
        self.calls: list[list[str]] = []
        self.fail_add = fail_add

    def run(self, args, stdin=None):
        self.calls.append(args)
        if args[:3] == ["-j", "list", "ruleset"]:
            return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *self.items]})
        if args == ["-f", "-"]:
            assert stdin == T.RULESET
            if self.fail_add:
                raise T.NftError(self.fail_add)
            self._drop()
            self.items += [
                {"table": {"family": "inet", "name": T.TABLE, "handle": 5}},
                {"chain": {"family": "inet", "table": T.TABLE, "name": "forward", "handle": 1,
                           "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
                {"rule": {"family": "inet", "table": T.TABLE, "chain": "forward", "handle": 2,
                          "comment": T.COMMENT,
                          "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                              "right": "new"}}]}},
            ]
            return ""
        if args == ["delete", "table", "inet", T.TABLE]:
            self._drop()
            return ""
        raise AssertionError(f"unexpected nft call {args}")

    def _drop(self):
        self.items = [i for i in self.items
                      if not any(isinstance(b, dict) and b.get("family") == "inet"
                                 and (b.get("name") if k == "table" else b.get("table")) == T.TABLE
                                 for k, b in i.items())]

    def writes(self):
        return [c for c in self.calls if c[0] != "-j"]


def test_added_while_a_device_is_managed_and_removed_after():
    nft = FakeNft()
    tr = T.Tracking(nft=nft)
    st = tr.sync(active=True)
    assert st == T.TrackingState(wanted=True, ensured=True, on=True, source=T.ENSURED)
    assert nft.writes() == [["-f", "-"]]
    assert tr.sync() == st and nft.writes() == [["-f", "-"]]  # in place: nothing written again
    st = tr.sync(active=False)  # the last device went
    assert st == T.TrackingState(wanted=True, ensured=False, on=False, source=T.NONE)
    assert nft.items == OPERATOR  # the operator's table as it was
    assert tr.release() == st and nft.writes() == [["-f", "-"], ["delete", "table", "inet", T.TABLE]]


def test_a_table_flushed_away_is_put_back_at_the_next_check():
    nft = FakeNft()
    tr = T.Tracking(nft=nft)
    tr.sync(active=True)
    nft.items = list(OPERATOR)  # nft flush ruleset + the operator's file again
    assert tr.sync().ensured and nft.writes() == [["-f", "-"], ["-f", "-"]]


def test_a_predecessors_table_is_replaced_or_removed_never_doubled():
    nft = FakeNft()
    T.Tracking(nft=nft).sync(active=True)  # a crashed pyflowd's table
    tr = T.Tracking(nft=nft)
    assert tr.sync(active=True).ensured
    assert sum(1 for i in nft.items if "table" in i and i["table"]["name"] == T.TABLE) == 1
    assert nft.writes() == [["-f", "-"]]  # found in place: not written again
    # a start with no device (or opted out) removes what a predecessor left
    assert not T.Tracking(nft=nft, wanted=False).sync(active=True).ensured
    assert nft.items == OPERATOR


def test_opted_out_adds_nothing_and_says_whether_the_ruleset_tracks(caplog):
    nft = FakeNft()
    with caplog.at_level(logging.WARNING, logger="pyflow.daemon.tracking"):
        st = T.Tracking(nft=nft, wanted=False).sync(active=True)
    assert st == T.TrackingState(wanted=False, ensured=False, on=False, source=T.NONE)
    assert nft.writes() == []
    assert any("nothing will be offloaded" in r.getMessage() for r in caplog.records)
    nft.items.append(_rule([{"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                       "right": ["established", "related"]}}, {"accept": None}]))
    st = T.Tracking(nft=nft, wanted=False).sync(active=True)
    assert (st.on, st.source, st.ensured) == (True, T.RULESET_USES, False)


def test_a_table_of_that_name_pyflowd_did_not_write_is_left_alone():
    foreign = [{"table": {"family": "inet", "name": T.TABLE, "handle": 7}},
               _rule([{"counter": {"packets": 1, "bytes": 2}}], table=T.TABLE)]
    nft = FakeNft(OPERATOR + foreign)
    tr = T.Tracking(nft=nft)
    st = tr.sync(active=True)
    assert not st.ensured and st.on is False and "did not write" in st.error
    tr.sync(active=False)
    assert nft.writes() == [] and nft.items == OPERATOR + foreign


def test_without_nft_it_says_so_and_carries_on(caplog):
    tr = T.Tracking(nft=T.Nft(binary=""))
    with caplog.at_level(logging.WARNING, logger="pyflow.daemon.tracking"):
        st = tr.sync(active=True)
        tr.sync(active=True)
    assert (st.ensured, st.on, st.source) == (False, None, T.UNKNOWN)
    assert "nft command is not installed" in st.error
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "nothing is offloaded" in warnings[0]  # said once, not every check


def test_a_kernel_without_nf_tables_is_an_error_in_status():
    nft = FakeNft(fail_add="nft -f -: Error: Could not process rule: Operation not supported")
    st = T.Tracking(nft=nft).sync(active=True)
    assert (st.ensured, st.on, st.source) == (False, False, T.NONE)
    assert "Operation not supported" in st.error


def test_a_real_nft_binary_that_fails_is_reported(tmp_path):
    fake = tmp_path / "nft"
    fake.write_text("#!/bin/sh\necho 'Error: no nf_tables here' >&2\nexit 1\n")
    fake.chmod(0o755)
    st = T.Tracking(nft=T.Nft(binary=str(fake))).sync(active=True)
    assert st.on is None and "no nf_tables here" in st.error


@pytest.mark.parametrize("item, uses", [
    (_rule([{"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": 1}}]), True),
    (_rule([{"masquerade": None}]), True),
    (_rule([{"snat": {"addr": "198.18.0.1"}}]), True),
    (_rule([{"flow": {"op": "add", "flowtable": "@ft"}}]), True),
    (_rule([{"xt": {"type": "match", "name": "conntrack"}}]), True),
    (_rule([{"xt": {"type": "target", "name": "LOG"}}]), False),
    (_rule([{"counter": {"packets": 1, "bytes": 2}}, {"drop": None}]), False),
    ({"chain": {"family": "ip", "table": "nat", "name": "post", "type": "nat", "hook": "postrouting",
                "prio": 100, "policy": "accept"}}, True),
    ({"ct helper": {"family": "inet", "table": "fw", "name": "ftp", "type": "ftp"}}, True),
    ({"flowtable": {"family": "inet", "table": "fw", "name": "ft", "hook": "ingress"}}, False),
])
def test_what_in_a_ruleset_takes_a_conntrack_reference(item, uses):
    assert T.survey([*OPERATOR, item]) == (False, False, uses)


def test_the_knob_is_validated_like_the_others(tmp_path):
    path = tmp_path / "pyflowd.toml"
    path.write_text("[daemon]\nensure_conntrack = false\n")
    path.chmod(0o600)
    assert load(str(path)).daemon.ensure_conntrack is False
    assert load(None).daemon.ensure_conntrack is True
    path.write_text('[daemon]\nensure_conntrack = "no"\n')
    with pytest.raises(ConfigError, match="daemon.ensure_conntrack: must be true or false"):
        load(str(path))


@pytest.mark.parametrize("state, on, ensured", [
    (T.TrackingState(wanted=True, ensured=True, on=True, source=T.ENSURED), 1, 1),
    (T.TrackingState(wanted=False, ensured=False, on=True, source=T.RULESET_USES), 1, 0),
    (T.TrackingState(wanted=False, ensured=False, on=False, source=T.NONE), 0, 0),
    (T.TrackingState(wanted=True, on=None, source=T.UNKNOWN, error="no nft"), 0, 0),
])
def test_metrics_say_whether_tracking_is_on_and_whose_doing(state, on, ensured):
    stats = Stats.of(LoopStats(), Stats().devices, state)
    text = generate_latest(registry_for(lambda: stats)).decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples["pyflow_conntrack_tracking"]) == on
    assert float(samples["pyflow_conntrack_tracking_ensured"]) == ensured
    assert stats.to_json()["tracking"] == state.to_json()
