"""The netlink wire layer: message and attribute walk/encode, NLMSG_ERROR, sockets and
the UAPI numbers against the kernel's own headers. No root needed."""

from __future__ import annotations

import errno
import glob
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from pyflow.netlink import uapi
from pyflow.netlink.errors import error_text
from pyflow.netlink.sock import NetlinkSocket, group_mask
from pyflow.netlink.wire import (
    BE16,
    BE32,
    U32,
    attrs,
    errno_of,
    messages,
    nest,
    nested,
    nla,
    nla_header,
    payload,
    request,
    string,
    u8,
    value,
)


def _walk(data: bytes) -> dict[int, bytes]:
    """attrs() with payloads copied out, for readable assertions."""
    return {t: data[s:e] for t, (s, e) in attrs(data, 0, len(data)).items()}


# -- attributes ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 7, 8, 16, 255])
def test_attribute_round_trip_pads_to_four(size: int) -> None:
    data = bytes(range(size))
    enc = nla(7, data) + nla(9, b"\xaa")
    assert len(nla(7, data)) % 4 == 0
    assert struct.unpack_from("=HH", enc) == (4 + size, 7)  # the length excludes the padding
    assert _walk(enc) == {7: data, 9: b"\xaa"}


def test_duplicate_attribute_last_wins() -> None:
    enc = nla(3, b"first") + nla(4, b"x") + nla(3, b"second")
    assert _walk(enc) == {3: b"second", 4: b"x"}


def test_flag_bits_are_masked_off_the_type() -> None:
    enc = nla(2 | uapi.NLA_F_NET_BYTEORDER, BE16.pack(80)) + nest(5, nla(1, b"a"))
    a = attrs(enc, 0, len(enc))
    assert set(a) == {2, 5}
    assert value(enc, a[2], BE16) == 80
    assert struct.unpack_from("=H", enc, len(nla(2, b"xx")) + 2)[0] == 5 | uapi.NLA_F_NESTED


def test_nested_attributes_round_trip() -> None:
    inner = nest(2, nla(1, b"\x06"), nla(2, BE16.pack(1234)), nla(3, BE16.pack(80)))
    enc = nla(9, b"before") + nest(1, nest(1, nla(1, socket.inet_aton("198.18.0.1"))), inner)
    top = attrs(enc, 0, len(enc))
    t = nested(enc, top[1])
    assert set(t) == {1, 2}
    ip = nested(enc, t[1])
    assert payload(enc, ip[1]) == socket.inet_aton("198.18.0.1")
    proto = nested(enc, t[2])
    assert u8(enc, proto[1]) == 6
    assert value(enc, proto[2], BE16) == 1234 and value(enc, proto[3], BE16) == 80
    assert payload(enc, top[9]) == b"before"
    assert nested(enc, None) == {}


def test_attribute_walk_of_a_span_stays_inside_it() -> None:
    enc = nla(1, b"abcd") + nla(2, b"efgh")
    first_only = attrs(enc, 0, 8)
    assert set(first_only) == {1}


def test_truncated_attribute_stops_and_keeps_what_was_sound() -> None:
    enc = nla(1, b"good") + nla(2, b"0123456789")
    cut = enc[:-3]  # the second attribute claims more than is left
    assert _walk(cut) == {1: b"good"}
    bad_len = nla(1, b"good") + struct.pack("=HH", 2, 5) + nla(6, b"lost")  # shorter than a header
    assert _walk(bad_len) == {1: b"good"}
    assert _walk(b"\x08\x00") == {}  # not even a header
    assert attrs(b"", 0, 0) == {}


def test_value_readers_refuse_short_or_missing_payloads() -> None:
    enc = nla(1, b"\x01\x02") + nla(2, b"") + nla(3, b"ftp\0junk") + nla(4, b"\0")
    a = attrs(enc, 0, len(enc))
    assert value(enc, a[1], BE32) is None  # two bytes cannot be a u32
    assert value(enc, a[1], BE16) == 0x0102
    assert value(enc, None, U32) is None
    assert u8(enc, a[2]) is None and u8(enc, None) is None
    assert payload(enc, a[2]) == b"" and payload(enc, None) is None
    assert string(enc, a[3]) == "ftp"
    assert string(enc, a[4]) is None and string(enc, None) is None


def test_nla_header_matches_nla() -> None:
    assert nla_header(1, 4) + b"\x01\x02\x03\x04" == nla(1, b"\x01\x02\x03\x04")


# -- messages --------------------------------------------------------------------------


def test_message_round_trip_and_iteration() -> None:
    a = request(26, uapi.NLM_F_REQUEST, 7, b"\x02" + bytes(11) + nla(1, b"\x0a\0\0\x01"), pid=42)
    b = request(3, 0, 8, b"\0\0\0\0")
    odd = request(30, 0, 9, b"\x01")  # 17 bytes: the next message starts aligned
    buf = bytearray(a + odd + bytes(-len(odd) & 3) + b)
    got = list(messages(buf))
    assert [(t, f, s, p) for t, f, s, p, _o, _n in got] == [
        (26, uapi.NLM_F_REQUEST, 7, 42), (30, 0, 9, 0), (3, 0, 8, 0)]
    off, length = got[0][4], got[0][5]
    assert (off, length) == (0, len(a))
    assert buf[got[1][4] + 16] == 1
    assert list(messages(buf, len(a))) == got[:1]  # n bounds the walk
    body = attrs(buf, 16 + 12, length)
    assert payload(buf, body[1]) == b"\x0a\0\0\x01"


def test_truncated_or_malformed_messages_stop_cleanly() -> None:
    whole = request(16, 0, 1, bytes(16))
    second = request(16, 0, 2, bytes(40))
    cut = whole + second[:30]  # the second message's header claims 56 bytes
    assert [m[2] for m in messages(cut)] == [1]
    short_len = whole + struct.pack("=IHHII", 8, 16, 0, 3, 0) + bytes(8)  # claims less than a header
    assert [m[2] for m in messages(short_len)] == [1]
    assert list(messages(b"\x10\0\0")) == []
    assert list(messages(b"")) == []


# -- NLMSG_ERROR -----------------------------------------------------------------------


def _error(code: int, seq: int = 5) -> bytes:
    echoed = struct.pack("=IHHII", 16, 26, 1, seq, 0)  # the request's header, echoed back
    return request(uapi.NLMSG_ERROR, 0, seq, struct.pack("=i", -code) + echoed)


def test_nlmsg_error_decodes_errno_and_ack() -> None:
    buf = _error(errno.ENETUNREACH) + _error(0, seq=6)
    got = list(messages(buf))
    assert [m[0] for m in got] == [uapi.NLMSG_ERROR, uapi.NLMSG_ERROR]
    assert errno_of(buf, got[0][4], got[0][5]) == errno.ENETUNREACH
    assert errno_of(buf, got[1][4], got[1][5]) == 0
    short = request(uapi.NLMSG_ERROR, 0, 1, b"")
    assert errno_of(short, 0, len(short)) == errno.EBADMSG  # never read as success
    assert error_text(errno.ENETUNREACH) == "Network is unreachable (ENETUNREACH)"


# -- sockets (NETLINK_ROUTE needs no privilege for these reads) ------------------------


def test_group_mask() -> None:
    assert group_mask() == 0
    assert group_mask(1, 3) == 0b101
    assert group_mask(uapi.RTNLGRP_IPV6_NETCONF) == 1 << 24


def _getlink(ifindex: int) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0)  # struct ifinfomsg


def test_request_answer_and_refusal() -> None:
    nl = NetlinkSocket(uapi.NETLINK_ROUTE)
    try:
        lo = socket.if_nametoindex("lo")
        answer = nl.request(18, 0, _getlink(lo))  # RTM_GETLINK
        assert answer is not None
        length, mtype = struct.unpack_from("=IH", answer)
        assert mtype == uapi.RTM_NEWLINK and length == len(answer)
        a = attrs(answer, 16 + 16, length)
        assert string(answer, a[uapi.IFLA_IFNAME]) == "lo"
        with pytest.raises(OSError) as exc:
            nl.request(18, 0, _getlink(0x7FFFFFF0))
        assert exc.value.errno == errno.ENODEV
        # with NLM_F_ACK the answer comes first, then the ACK: ack() skips to the ACK
        assert nl.ack(18, 0, _getlink(lo)) == 0
        assert nl.ack(18, 0, _getlink(0x7FFFFFF0)) == errno.ENODEV
        seqs = {nl.next_seq() for _ in range(3)}
        assert len(seqs) == 3 and 0 not in seqs
    finally:
        nl.close()


def test_dump_yields_every_answer_until_done() -> None:
    nl = NetlinkSocket(uapi.NETLINK_ROUTE)
    try:
        names = []
        for mtype, _flags, off, length in nl.dump(18, uapi.NLM_F_DUMP, _getlink(0)):
            assert mtype == uapi.RTM_NEWLINK
            names.append(string(nl.buf, attrs(nl.buf, off + 32, off + length).get(uapi.IFLA_IFNAME)))
        assert "lo" in names
    finally:
        nl.close()


def test_socket_is_nonblocking_cloexec_with_a_sized_buffer() -> None:
    nl = NetlinkSocket(uapi.NETLINK_ROUTE, group_mask(uapi.RTNLGRP_LINK), rcvbuf=1 << 20)
    try:
        s = nl.sock
        assert not s.get_inheritable() and s.getblocking() is False
        # the kernel doubles what it is asked (or caps it at rmem_max without CAP_NET_ADMIN)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 4096
        with pytest.raises(BlockingIOError):
            nl.recv()
        with pytest.raises(TimeoutError):
            nl.recv_within(0.01)
    finally:
        nl.close()


# -- the UAPI numbers, checked against the kernel's headers ----------------------------

_HEADERS = ["asm/socket.h", "linux/netlink.h", "linux/rtnetlink.h", "linux/neighbour.h", "linux/if_bridge.h",
            "linux/if_link.h", "linux/if.h", "linux/if_arp.h", "linux/if_ether.h", "linux/netconf.h",
            "linux/netfilter/nfnetlink.h", "linux/netfilter/nfnetlink_conntrack.h",
            "linux/netfilter/nf_conntrack_tcp.h", "linux/pkt_sched.h", "linux/pkt_cls.h",
            "linux/ethtool_netlink.h", "linux/tc_act/tc_mirred.h"]


@pytest.mark.parametrize("include", ["/usr/include"] + sorted(
    glob.glob("/usr/src/linux-headers-*-common/include/uapi")))
def test_uapi_numbers_match_the_kernel_headers(include: str, tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path(include, "linux/netlink.h").exists():
        pytest.skip("needs a C compiler and the kernel's UAPI headers")
    names = [n for n in dir(uapi) if n.isupper()]
    src = "#include <stdio.h>\n" + "".join(f"#include <{h}>\n" for h in _HEADERS)
    src += "int main(void) {\n" + "".join(
        f'    printf("{n} %lld\\n", (long long)({n}));\n' for n in names) + "    return 0;\n}\n"
    (tmp_path / "uapi.c").write_text(src)
    # The kernel tree's uapi headers are not sanitized for user space: they include two
    # kernel-only headers (empty stand-ins do) and use sparse annotations (defined away).
    stub = tmp_path / "stub" / "linux"
    stub.mkdir(parents=True)
    for name in ("compiler.h", "compiler_types.h"):
        (stub / name).write_text("")
    cmd = [cc, "-w", "-D__force=", "-D__user=", "-D__iomem=", "-D__bitwise=", f"-I{include}",
           f"-I{stub.parent}", "-o", str(tmp_path / "uapi"), str(tmp_path / "uapi.c")]
    subprocess.run(cmd, check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "uapi")], check=True, capture_output=True, text=True).stdout
    kernel = {n: int(v) for n, v in (line.split() for line in out.splitlines())}
    kernel["NLA_TYPE_MASK"] &= 0xFFFF  # C computes it as a negative int
    ours = {n: getattr(uapi, n) for n in names}
    assert ours == kernel


# -- both adapters read duplicated attributes the one way ------------------------------


def test_ctnetlink_and_rtnetlink_decoders_keep_the_last_duplicate() -> None:
    from pyflow.control import conntrack, paths
    from pyflow.control.model import Conn, Tuple

    t = Tuple("198.18.0.1", "198.18.0.2", 1000, 80)
    orig = conntrack._tuple_attr(uapi.CTA_TUPLE_ORIG, Conn(socket.AF_INET, 6, t, t))
    reply = conntrack._tuple_attr(uapi.CTA_TUPLE_REPLY, Conn(socket.AF_INET, 6, t, t))
    msg = bytearray(conntrack._request(conntrack._MSG_NEW, 0, 0, socket.AF_INET, orig + reply
                                       + nla(uapi.CTA_MARK, BE32.pack(1)) + nla(uapi.CTA_MARK, BE32.pack(2))))
    conn = conntrack._parse(msg, 0, len(msg))
    assert conn is not None and conn.mark == 2 and conn.orig == t

    rtmsg = struct.pack("=BBBBBBBBI", socket.AF_INET, 32, 0, 0, 254, 0, 0, uapi.RTN_UNICAST, 0)
    route = request(uapi.RTM_NEWROUTE, 0, 1, rtmsg + nla(uapi.RTA_OIF, U32.pack(3))
                    + nla(uapi.RTA_OIF, U32.pack(4)))
    assert paths.parse_route(route).oif == 4
