"""pyflowd's configuration: a TOML file, typed defaults, strict validation.

Every key has a default and a type; an unknown key or a wrong type is an error that
names the key (``daemon.socket_gruop: unknown key``), raised before the daemon
touches any device, so a typo never half-applies. Command-line flags override the
file's values after validation (:func:`Config.with_overrides`).

The keys, their types and defaults are the dataclasses below; README ("Running pyflowd")
and packaging/pyflowd.toml show the file with every key.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from pyflow.errors import PyflowError

DEFAULT_CONFIG = "/etc/pyflow/pyflowd.toml"
DEFAULT_METRICS_PORT = 9469
DEVICE_MODES = ("auto", "native", "generic", "tc", "hw")
LOG_LEVELS = ("debug", "info", "warning", "error")
STOP_ACTIONS = ("hand-back", "keep")
# prebuilt: the BPF object compiled at build time, loaded with libbpf (no compiler on the
# router); bcc: compiled from ebpf/ at start (development)
DATAPATH_BUILDS = ("prebuilt", "bcc")
IFNAMSIZ = 16  # the kernel's limit, including the terminating NUL


class ConfigError(PyflowError):
    """The configuration is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class DaemonConfig:
    socket: str = "/run/pyflow/pyflowd.sock"
    socket_group: str = ""
    metrics_address: str = f"127.0.0.1:{DEFAULT_METRICS_PORT}"
    state_dir: str = "/var/lib/pyflow"
    bpffs_dir: str = "/sys/fs/bpf/pyflow"
    log_level: str = "info"
    on_stop: str = "hand-back"
    datapath_build: str = "prebuilt"


@dataclass(frozen=True)
class OffloadConfig:
    idle_timeout: float = 30.0
    conntrack_timeout: int = 120
    keepalive_interval: float = 1.0
    exclude_mark_mask: int = 0
    offload_mark: int = 0
    hw_skip_hw: bool = False


@dataclass(frozen=True)
class DeviceConfig:
    name: str
    mode: str = "auto"


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    devices: tuple[DeviceConfig, ...] = ()
    path: str | None = None  # the file it was read from (None: built-in defaults)

    def with_overrides(self, **daemon_values: str | None) -> Config:
        """The config with daemon-section values from the command line (None: not given)."""
        given = {k: v for k, v in daemon_values.items() if v is not None}
        if not given:
            return self
        merged = replace(self.daemon, **given)
        _check_daemon(merged, "command line")
        return replace(self, daemon=merged)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [V6HOST]:PORT -> (host, port); ValueError with the reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be 1..65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{text!r}: host must be an IP address") from None
    return host, int(port_text)


def _type_name(t: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[t]


def _typed(section: str, cls: type, table: Any, where: str) -> dict[str, Any]:
    """The values of one TOML table checked against cls's fields (names and types)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {section}: must be a table")
    known = {f.name: f for f in fields(cls)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"{where}: {section}.{key}: unknown key")
        want = {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{where}: {section}.{key}: must be {_type_name(want)}, "
                              f"not {type(value).__name__} {value!r}")
        out[key] = value
    return out


def _check_daemon(d: DaemonConfig, where: str) -> None:
    if d.log_level not in LOG_LEVELS:
        raise ConfigError(f"{where}: daemon.log_level: {d.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if d.on_stop not in STOP_ACTIONS:
        raise ConfigError(f"{where}: daemon.on_stop: {d.on_stop!r} is not one of {', '.join(STOP_ACTIONS)}")
    if d.datapath_build not in DATAPATH_BUILDS:
        raise ConfigError(f"{where}: daemon.datapath_build: {d.datapath_build!r} is not one of "
                          f"{', '.join(DATAPATH_BUILDS)}")
    if d.metrics_address:
        try:
            parse_address(d.metrics_address)
        except ValueError as exc:
            raise ConfigError(f"{where}: daemon.metrics_address: {exc}") from None
    for key in ("socket", "state_dir", "bpffs_dir"):
        value = getattr(d, key)
        if not value.startswith("/"):
            raise ConfigError(f"{where}: daemon.{key}: must be an absolute path, not {value!r}")
    if d.socket_group:
        import grp

        try:
            grp.getgrnam(d.socket_group)
        except KeyError:
            raise ConfigError(f"{where}: daemon.socket_group: no such group {d.socket_group!r}") from None


def _check_offload(o: OffloadConfig, where: str) -> None:
    positive = {"idle_timeout": o.idle_timeout, "conntrack_timeout": o.conntrack_timeout,
                "keepalive_interval": o.keepalive_interval}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: offload.{key}: must be positive, not {value}")
    for key in ("exclude_mark_mask", "offload_mark"):
        value = getattr(o, key)
        if not 0 <= value <= 0xFFFFFFFF:
            raise ConfigError(f"{where}: offload.{key}: must fit 32 bits (0..0xffffffff), not {value}")
    if o.offload_mark & o.exclude_mark_mask:
        raise ConfigError(f"{where}: offload.offload_mark: shares bits with exclude_mark_mask "
                          "(every offloaded connection would opt itself out)")


def check_device(name: Any, mode: Any, where: str) -> DeviceConfig:
    """A device entry, validated (also used for runtime add-device requests)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name: must be a non-empty string")
    if len(name) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name) or name in (".", ".."):
        raise ConfigError(f"{where}: name: {name!r} is not a valid interface name")
    if not isinstance(mode, str) or mode not in DEVICE_MODES:
        raise ConfigError(f"{where}: mode: {mode!r} is not one of {', '.join(DEVICE_MODES)}")
    return DeviceConfig(name, mode)


def parse(text: str, where: str) -> Config:
    """Config from TOML text; ``where`` names the source in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    for key in data:
        if key not in ("daemon", "offload", "device"):
            raise ConfigError(f"{where}: {key}: unknown key")
    daemon = DaemonConfig(**_typed("daemon", DaemonConfig, data.get("daemon", {}), where))
    offload = OffloadConfig(**_typed("offload", OffloadConfig, data.get("offload", {}), where))
    _check_daemon(daemon, where)
    _check_offload(offload, where)
    entries = data.get("device", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: device: must be an array of tables ([[device]])")
    devices: list[DeviceConfig] = []
    seen: set[str] = set()
    for n, entry in enumerate(entries):
        label = f"device[{n}]"
        values = _typed(label, DeviceConfig, entry, where)
        if "name" not in values:
            raise ConfigError(f"{where}: {label}.name: missing")
        dev = check_device(values["name"], values.get("mode", "auto"), f"{where}: {label}")
        if dev.name in seen:
            raise ConfigError(f"{where}: {label}.name: {dev.name} is listed twice")
        seen.add(dev.name)
        devices.append(dev)
    return Config(daemon, offload, tuple(devices), where)


def load(path: str | None) -> Config:
    """Read and validate ``path``. None means the default file, which may be absent
    (built-in defaults then); a file named explicitly must exist."""
    target = path or DEFAULT_CONFIG
    try:
        with open(target, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(f"{target}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{target}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{target}: not UTF-8 text") from None
    return parse(text, os.fspath(target))
