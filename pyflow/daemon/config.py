"""pyflowd's configuration: a TOML file, typed defaults, strict validation.

Every key has a default and a type; an unknown key or a wrong type is an error that
names the key (``daemon.socket_gruop: unknown key``), raised before the daemon
touches any device, so a typo never half-applies. Command-line flags override the
file's values after validation (:func:`Config.with_overrides`).

The keys, their types and defaults are the dataclasses below; README ("Running pyflowd")
and packaging/pyflowd.toml show the file with every key.
"""

from __future__ import annotations

import errno
import ipaddress
import math
import os
import re
import stat
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
MAX_CONFIG_BYTES = 1 << 20  # far above any real config; a bigger file is a mistake or an attack
SUN_PATH_MAX = 107  # a Unix socket path, in bytes, without the terminating NUL
# bpffs_dir reaches the datapath's compile flags (a -D define): only characters that need
# no quoting there
SAFE_PATH = re.compile(r"/[A-Za-z0-9._/-]*")
# per key, the accepted range (seconds); finite, and small enough that nanoseconds fit
# int64 and that conntrack's timeout (u32 seconds, times HZ in the kernel) stays sane
OFFLOAD_BOUNDS: dict[str, tuple[float, float]] = {
    "idle_timeout": (0.1, 86400.0),
    "conntrack_timeout": (1, 604800),
    "keepalive_interval": (0.01, 60.0),
}


# the flow map's entries (two per connection): at least 512 connections; at most 16M entries,
# which is 16M x (48-byte key + 112-byte value) = 2.5 GiB of kernel memory before hash overhead
FLOW_MAP_ENTRIES = (1024, 1 << 24)


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
    flow_map_entries: int = 262144  # the flow map's size, set when the map is made (2 per connection)
    # while a device is managed, keep a table that makes conntrack track forwarded traffic
    # (pyflow.daemon.tracking); false: the ruleset must use conntrack itself
    ensure_conntrack: bool = True


@dataclass(frozen=True)
class OffloadConfig:
    idle_timeout: float = 30.0
    conntrack_timeout: int = 86400  # held while offloaded, written again when half is gone
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
        given: dict[str, Any] = {k: v for k, v in daemon_values.items() if v is not None}
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


def short(value: Any, width: int = 40) -> str:
    """repr of a value cut to ``width`` characters: errors echo what they refuse, but
    a 60k-character name must not become a 60k-character message."""
    text = repr(value)
    return text if len(text) <= width else text[:width] + f"... ({len(text)} characters)"


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
            raise ConfigError(f"{where}: {section}.{short(key)[1:-1]}: unknown key")
        want = {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{where}: {section}.{key}: must be {_type_name(want)}, "
                              f"not {type(value).__name__} {short(value)}")
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
    low, high = FLOW_MAP_ENTRIES
    if not low <= d.flow_map_entries <= high:
        raise ConfigError(f"{where}: daemon.flow_map_entries: must be between {low} and {high}, "
                          f"not {short(d.flow_map_entries)}")
    if d.metrics_address:
        try:
            parse_address(d.metrics_address)
        except ValueError as exc:
            raise ConfigError(f"{where}: daemon.metrics_address: {exc}") from None
    for key in ("socket", "state_dir", "bpffs_dir"):
        value = getattr(d, key)
        if not value.startswith("/"):
            raise ConfigError(f"{where}: daemon.{key}: must be an absolute path, not {short(value)}")
        if any(not c.isprintable() for c in value) or ".." in value.split("/"):
            raise ConfigError(f"{where}: daemon.{key}: {short(value)}: no control characters or "
                              "'..' in a path")
    if not SAFE_PATH.fullmatch(d.bpffs_dir):
        raise ConfigError(f"{where}: daemon.bpffs_dir: {short(d.bpffs_dir)}: only letters, digits "
                          "and . _ - / in the pin dir's path")
    if len(d.socket.encode()) > SUN_PATH_MAX:
        raise ConfigError(f"{where}: daemon.socket: longer than a Unix socket path may be "
                          f"({SUN_PATH_MAX} bytes)")
    if d.socket_group:
        import grp

        try:
            grp.getgrnam(d.socket_group)
        except KeyError:
            raise ConfigError(f"{where}: daemon.socket_group: no such group {d.socket_group!r}") from None


def _check_offload(o: OffloadConfig, where: str) -> None:
    for key, (low, high) in OFFLOAD_BOUNDS.items():
        value = getattr(o, key)
        # nan fails every comparison, so it is named first; inf and huge integers fail the range
        if not math.isfinite(value) or not low <= value <= high:
            raise ConfigError(f"{where}: offload.{key}: must be between {low:g} and {high:g} (seconds), "
                              f"not {short(value)}")
    for key in ("exclude_mark_mask", "offload_mark"):
        value = getattr(o, key)
        if not 0 <= value <= 0xFFFFFFFF:
            raise ConfigError(f"{where}: offload.{key}: must fit 32 bits (0..0xffffffff), not {value}")
    if o.offload_mark & o.exclude_mark_mask:
        raise ConfigError(f"{where}: offload.offload_mark: shares bits with exclude_mark_mask "
                          "(every offloaded connection would opt itself out)")


def valid_ifname(name: str) -> bool:
    """The kernel's dev_valid_name(): 1..IFNAMSIZ-1 bytes, not . or .., no '/', ':' or
    whitespace; control characters (NUL first) are refused too, since no tool shows them."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:  # a lone surrogate from JSON: not a name the kernel could hold
        return False
    if not 0 < size < IFNAMSIZ or name in (".", ".."):
        return False
    return not any(c in "/:" or c.isspace() or not c.isprintable() for c in name)


def check_device(name: Any, mode: Any, where: str) -> DeviceConfig:
    """A device entry, validated (also used for runtime add-device requests)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name: must be a non-empty string")
    if not valid_ifname(name):
        raise ConfigError(f"{where}: name: {short(name)} is not a valid interface name (1..{IFNAMSIZ - 1} "
                          "bytes, no '/', ':', whitespace or control characters, not . or ..)")
    if not isinstance(mode, str) or mode not in DEVICE_MODES:
        raise ConfigError(f"{where}: mode: {short(mode)} is not one of {', '.join(DEVICE_MODES)}")
    return DeviceConfig(name, mode)


def parse(text: str, where: str) -> Config:
    """Config from TOML text; ``where`` names the source in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(f"{where}: not valid TOML: nested too deeply") from None
    for key in data:
        if key not in ("daemon", "offload", "device"):
            raise ConfigError(f"{where}: {short(key)[1:-1]}: unknown key")
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
    (built-in defaults then); a file named explicitly must exist.

    The file configures a root daemon, so it must be a regular file (not a symbolic link,
    which is not followed) owned by root (or by the user running check-config) and
    writable by nobody else: anyone who can write it can make pyflowd attach devices."""
    target = path or DEFAULT_CONFIG
    try:
        # O_NONBLOCK: a FIFO planted as the config must not block the open
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if path is None:
            return Config()
        raise ConfigError(f"{target}: no such file") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(f"{target}: is a symbolic link (not followed): name the file itself") from None
        raise ConfigError(f"{target}: cannot read: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        _check_trusted_file(st, target)
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{target}: larger than {MAX_CONFIG_BYTES} bytes")
        data = os.read(fd, MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{target}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{target}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{target}: not UTF-8 text") from None
    return parse(text, os.fspath(target))


def _check_trusted_file(st: os.stat_result, target: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{target}: not a regular file")
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{target}: owned by uid {st.st_uid}, not root: refusing a file another "
                          "user can change")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{target}: writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}): "
                          "refusing it (chmod go-w)")
