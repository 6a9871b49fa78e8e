"""packaging/grafana/pyflow-dashboard.json asks only for series pyflowd exposes, in the right way."""

from __future__ import annotations

import json
import re

from pyflow.daemon.metrics import declared
from tests.packaging.unitfile import REPO

DASHBOARD = REPO / "packaging" / "grafana" / "pyflow-dashboard.json"
GRID_WIDTH = 24


def families() -> dict[str, str]:
    """Metric family -> Counter | Gauge | Histogram, as pyflow/daemon/metrics.py's collector exposes them."""
    found = {name: kind.capitalize() for name, kind in declared().items()}
    assert len(found) > 10, "the metrics collector exposes fewer families than the dashboard was built on"
    return found


def expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def test_every_series_exists_with_its_suffix():
    known = families()
    for expr in expressions():
        for series in re.findall(r"pyflow_\w+", expr):
            for suffix, kind in (("_total", "Counter"), ("_bucket", "Histogram"), ("", "Gauge")):
                family = series.removesuffix(suffix) if suffix else series
                if series.endswith(suffix) and known.get(family) == kind:
                    break
            else:
                raise AssertionError(f"{series} in {expr!r} is not a series pyflowd exposes")


def test_counters_are_read_as_rates():
    for expr in expressions():
        if re.search(r"pyflow_\w+(_total|_bucket)\b", expr):
            assert "rate(" in expr or "increase(" in expr, expr


def test_layout_is_sound():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= GRID_WIDTH, p["title"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{p['title']} overlaps another panel"
        cells |= area
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}"
