"""The Prometheus collector: names, suffixes, units, labels; a failing snapshot means pyflow_up 0."""

from __future__ import annotations

from prometheus_client import generate_latest

from pyflow.control.stats import ConntrackStats, EngineCounters, FlowMapStats, Latency, LoopStats, Traffic
from pyflow.daemon.metrics import declared, registry_for
from pyflow.daemon.stats import DeviceCounts, ShapedDevice, Stats

STATS = Stats.of(
    LoopStats(
        offloaded={"ipv4": {"software": 3, "hardware": 1}, "ipv6": {"software": 0, "hardware": 0}},
        flow_map=FlowMapStats.of(6, 1024, 229376),
        fast_path=Traffic(10, 15000),
        slow_path={"miss": Traffic(4, 400)},
        conntrack=ConntrackStats(events={"new": 5, "update": 7, "destroy": 2}, lost_events=1,
                                 discarded_events=9, resyncs=2, refreshes=11, malformed_messages=3,
                                 rcvbuf_grown=1),
        engine=EngineCounters(offloads=4, removed={"idle": 1}, refused={"tcp_not_established": 3},
                              hw_offloads=1, fdb_keepalive={"refreshed": 12, "moved": 1, "failed": 0},
                              fdb_keepalive_rounds=3),
        latency=Latency(((0.001, 2), (0.01, 3), (float("inf"), 3)), 0.012, 3),
    ),
    DeviceCounts(managed=2, by_mode={"tc": 2},
                 shaped=(ShapedDevice("wan", "egress", "tc_only"),
                         ShapedDevice("wan2", "ingress_redirect", "kernel_path"))),
)


def scrape(snapshot) -> dict[str, float]:
    text = generate_latest(registry_for(snapshot)).decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_samples_carry_the_snapshot():
    m = scrape(lambda: STATS)
    assert m["pyflow_up"] == 1
    assert m['pyflow_offloaded_flows{family="ipv4",placement="hardware"}'] == 1
    assert m["pyflow_fastpath_bytes_total"] == 15000
    assert m["pyflow_flow_map_memory_bytes"] == 229376
    assert m['pyflow_slowpath_packets_total{reason="miss"}'] == 4
    assert m['pyflow_conntrack_events_total{type="destroy"}'] == 2
    assert m["pyflow_conntrack_event_overruns_total"] == 1 and m["pyflow_resyncs_total"] == 2
    assert m["pyflow_conntrack_malformed_messages_total"] == 3
    assert m["pyflow_conntrack_event_buffer_grown_total"] == 1
    assert m['pyflow_offload_removals_total{cause="idle"}'] == 1
    assert m['pyflow_fdb_keepalive_entries_total{outcome="refreshed"}'] == 12
    assert m['pyflow_fdb_keepalive_entries_total{outcome="moved"}'] == 1
    assert m['pyflow_fdb_keepalive_entries_total{outcome="failed"}'] == 0
    assert m["pyflow_fdb_keepalive_rounds_total"] == 3
    assert m['pyflow_offload_latency_seconds_bucket{le="0.001"}'] == 2
    assert m['pyflow_offload_latency_seconds_bucket{le="+Inf"}'] == 3
    assert m["pyflow_offload_latency_seconds_sum"] == 0.012
    assert m["pyflow_flow_map_pressure_ratio"] == round(6 / 1024, 6)
    assert m['pyflow_managed_devices{mode="tc"}'] == 2
    assert m['pyflow_shaped_devices{device="wan",shaping="egress",treatment="tc_only"}'] == 1
    assert m['pyflow_shaped_devices{device="wan2",shaping="ingress_redirect",treatment="kernel_path"}'] == 1


def test_a_failed_snapshot_is_reported_not_raised():
    def broken():
        raise TimeoutError("the control loop did not answer in time")

    assert scrape(broken) == {"pyflow_up": 0}


def test_names_follow_the_conventions():
    for name, kind in declared().items():
        assert name.startswith("pyflow_")
        assert not name.endswith("_total")  # the client adds it to counters
        assert kind in ("counter", "gauge", "histogram")
    assert declared()["pyflow_offload_latency_seconds"] == "histogram"


def test_pyflowctl_stats_reads_the_same_snapshot():
    """The stats answer: the sections and names pyflowctl prints, from the snapshot /metrics read."""
    js = STATS.to_json()
    assert set(js) == {"offloaded", "flow_map", "fast_path", "slow_path", "conntrack", "engine", "devices",
                       "tracking"}
    assert js["flow_map"] == {"entries": 6, "capacity": 1024, "pressure": round(6 / 1024, 6),
                              "memory_bytes": 229376}
    assert js["slow_path"] == {"miss": {"packets": 4, "bytes": 400}}
    assert js["fast_path"] == {"packets": 10, "bytes": 15000}
    assert js["conntrack"] == {"events": {"new": 5, "update": 7, "destroy": 2}, "lost_events": 1,
                               "discarded_events": 9, "resyncs": 2, "refreshes": 11,
                               "malformed_messages": 3, "rcvbuf_grown": 1}
    assert js["engine"] == {"offloads": 4, "removed": {"idle": 1}, "refused": {"tcp_not_established": 3},
                            "pending": 0, "install_errors": 0, "rewritten": 0, "hw_offloads": 1,
                            "returning": 0, "reoffloaded": 0, "returns_abandoned": {},
                            "hw_failures": 0, "fdb_keepalive": {"refreshed": 12, "moved": 1, "failed": 0},
                            "fdb_keepalive_rounds": 3}
    assert js["devices"] == {"managed": 2, "failed": 0, "by_mode": {"tc": 2}, "shaped": (
        {"device": "wan", "shaping": "egress", "treatment": "tc_only"},
        {"device": "wan2", "shaping": "ingress_redirect", "treatment": "kernel_path"})}


def test_every_declared_metric_is_exposed_as_declared():
    exposed = {m.name: m.type for m in registry_for(lambda: STATS).collect()}
    assert exposed == declared()
