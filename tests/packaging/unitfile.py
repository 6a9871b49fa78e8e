"""Reading packaging/systemd/pyflowd.service, so that tests and the demo run the daemon
with exactly the unit's settings rather than a copy of them."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "pyflowd.service"


def settings(text: str | None = None) -> dict[str, list[str]]:
    """Key -> values (a key may repeat) of the unit, comments and section headers dropped."""
    out: dict[str, list[str]] = {}
    for line in (UNIT.read_text() if text is None else text).splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def capabilities() -> list[str]:
    """The unit's CapabilityBoundingSet=, e.g. ["CAP_NET_ADMIN", "CAP_BPF"]."""
    values = settings().get("CapabilityBoundingSet")
    if not values:
        raise ValueError(f"{UNIT} sets no CapabilityBoundingSet=")
    return values[-1].split()


def setpriv_argv(caps: list[str]) -> list[str]:
    """setpriv's options for running a command as the unit runs pyflowd: uid 0 with only
    ``caps`` (bounding set), nothing inheritable, no new privileges."""
    bounding = ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in caps)])
    return ["setpriv", "--inh-caps=-all", f"--bounding-set={bounding}", "--no-new-privs"]
