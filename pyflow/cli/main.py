"""pyflowctl: talk to pyflowd over its control socket.

``pyflowctl [--socket PATH] [--json] COMMAND``; commands: add-device, del-device, devices,
flows, stats, status, flush. Human output is an aligned table; ``--json`` prints the
``result`` object of the daemon's answer (schema in the README, "Running pyflowd").
Exit status: 0 success, 1 operational error (one line on stderr), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from typing import Any

from pyflow import __version__
from pyflow.daemon.api import PROTOCOL_VERSION
from pyflow.daemon.config import DEVICE_MODES, DaemonConfig

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
TIMEOUT = 60.0


class CtlError(Exception):
    """An operational error: its message is the one line pyflowctl prints."""


def request(path: str, command: str, args: dict[str, Any] | None = None,
            timeout: float = TIMEOUT) -> dict[str, Any]:
    """One request to the daemon at ``path``; returns its result or raises CtlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, NotADirectoryError):
            raise CtlError(f"pyflowd is not running (no socket at {path})") from None
        except ConnectionRefusedError:
            raise CtlError(f"pyflowd is not running (nothing listens on {path})") from None
        except PermissionError:
            raise CtlError(f"permission denied: cannot connect to {path} "
                           "(root or the socket's group only)") from None
        line = json.dumps({"version": PROTOCOL_VERSION, "command": command, "args": args or {}})
        try:
            sock.sendall(line.encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon answered before reading (a refusal): read that answer
        with sock.makefile("rb") as f:
            answer = f.readline()
    except TimeoutError:
        raise CtlError(f"pyflowd did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise CtlError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not answer:
        raise CtlError("pyflowd closed the connection without an answer")
    try:
        resp = json.loads(answer)
    except ValueError:
        raise CtlError("pyflowd sent an answer that is not JSON") from None
    if not resp.get("ok"):
        err = resp.get("error") or {}
        raise CtlError(str(err.get("message") or "pyflowd refused the request"))
    result = resp.get("result")
    return result if isinstance(result, dict) else {}


# ---- output ---------------------------------------------------------------------------------

def table(header: list[str], rows: list[list[Any]]) -> str:
    """Columns padded to their widest cell (the last one not padded), two spaces apart."""
    cells = [header] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        out = []
        for key in obj:
            out += _flatten(obj[key], f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(obj, list):
        return [(prefix, ",".join(str(x) for x in obj) or "-")]
    return [(prefix, obj)]


def _shaping(d: dict[str, Any]) -> str:
    """What shapes the device and pyflow's treatment, in a word or two: "egress cake 4Mbit:
    tc only", "ingress to ifb4wan: kernel path"; "-" for none."""
    sh = d.get("shaping") or {}
    parts = []
    if sh.get("egress"):
        parts.append(f"egress {'+'.join(sh['egress'])}: {sh['treatment']['egress'].replace('_', ' ')}")
    if sh.get("ingress_redirect"):
        target = sh["ingress_redirect"].split(" to ", 1)[-1].split(" (", 1)[0]
        parts.append(f"ingress to {target}: kernel path")
    return "; ".join(parts) or "-"


def show_devices(res: dict[str, Any]) -> str:
    rows = []
    for d in res["devices"]:
        state = d["state"] if d["state"] == "attached" else f"{d['state']}: {d['error'] or d['reason']}"
        rows.append([d["name"], d["ifindex"], d["mode"], d["requested_mode"], d["source"], d["slot"],
                     d["prog_id"], _shaping(d), state])
    out = table(["DEVICE", "IFINDEX", "MODE", "REQUESTED", "SOURCE", "SLOT", "PROG", "SHAPING", "STATE"],
                rows)
    why = next((d.get("xdp_ruled_out") for d in res["devices"] if d.get("xdp_ruled_out")), None)
    if why:
        out += f"\nno XDP on any device: {why}"
    return out


def show_flows(res: dict[str, Any]) -> str:
    rows = []
    for f in res["flows"]:
        o, r = f["original"], f["reply"]
        flag = "[HW_OFFLOAD]" if f["placement"] == "hardware" else "[OFFLOAD]"
        rows.append([f["proto"], _endpoint(o["src"], o["sport"]), _endpoint(o["dst"], o["dport"]),
                     _endpoint(r["src"], r["sport"]), _endpoint(r["dst"], r["dport"]),
                     f"{o['in_device']}>{o['out_device']}", o["packets"], o["bytes"], r["packets"],
                     r["bytes"], f"{f['idle_seconds']:.1f}", flag])
    out = table(["PROTO", "SRC", "DST", "REPLY-SRC", "REPLY-DST", "DEVICES", "ORIG-PACKETS", "ORIG-BYTES",
                 "REPLY-PACKETS", "REPLY-BYTES", "IDLE", "FLAGS"], rows)
    if res.get("truncated"):
        out += f"\n({len(res['flows'])} of {res['total']} flows shown)"
    return out


def show_pairs(res: dict[str, Any]) -> str:
    return table(["NAME", "VALUE"], [[k, v] for k, v in _flatten(res)])


def show_added(res: dict[str, Any]) -> str:
    return f"{res['name']}: attached in {res['mode']} mode (slot {res['slot']}): {res['reason']}"


def show_removed(res: dict[str, Any]) -> str:
    return f"{res['name']}: removed, {res['flows_handed_back']} flow(s) handed back to the kernel path"


def show_flushed(res: dict[str, Any]) -> str:
    return f"{res['flows_handed_back']} flow(s) handed back to the kernel path"


# ---- the command line ----------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    default_socket = DaemonConfig().socket
    common = argparse.ArgumentParser(add_help=False)
    # accepted after the command too; SUPPRESS keeps a later default from hiding an earlier value
    common.add_argument("--socket", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"pyflowd's control socket (default {default_socket})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the answer as JSON")
    p = argparse.ArgumentParser(prog="pyflowctl", parents=[common],
                                description="control pyflowd, the flow-offload daemon")
    p.add_argument("--version", action="version", version=f"pyflowctl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add = sub.add_parser("add-device", parents=[common], help="run the fast path on a device")
    add.add_argument("name", metavar="IFACE")
    add.add_argument("--mode", choices=DEVICE_MODES, default="auto")
    rm = sub.add_parser("del-device", parents=[common],
                        help="hand a device's flows back to the kernel and detach it")
    rm.add_argument("name", metavar="IFACE")
    sub.add_parser("devices", parents=[common], help="managed devices")
    fl = sub.add_parser("flows", parents=[common], help="offloaded connections")
    fl.add_argument("--limit", type=_count, metavar="N", help="show at most N flows")
    fl.add_argument("--proto", choices=("tcp", "udp"))
    fl.add_argument("--addr", metavar="ADDR[/LEN]", help="an address (or prefix) of either direction")
    fl.add_argument("--port", type=_port, metavar="PORT", help="a port of either direction")
    fl.add_argument("--device", metavar="IFACE", help="in or out device of either direction")
    sub.add_parser("stats", parents=[common], help="datapath and control-plane counters")
    sub.add_parser("status", parents=[common], help="daemon status")
    sub.add_parser("flush", parents=[common], help="hand every flow back to the kernel path")
    return p


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1..65535)")
    return int(text)


SHOW = {"add-device": show_added, "del-device": show_removed, "devices": show_devices,
        "flows": show_flows, "stats": show_pairs, "status": show_pairs, "flush": show_flushed}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    path = getattr(args, "socket", DaemonConfig().socket)
    req: dict[str, Any] = {}
    if args.command == "add-device":
        req = {"name": args.name, "mode": args.mode}
    elif args.command == "del-device":
        req = {"name": args.name}
    elif args.command == "flows":
        req = {k: getattr(args, k) for k in ("limit", "proto", "addr", "port", "device")
               if getattr(args, k) is not None}
    try:
        result = request(path, args.command, req)
    except CtlError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILURE
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(SHOW[args.command](result))
    return EXIT_OK

