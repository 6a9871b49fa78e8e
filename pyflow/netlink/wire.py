"""Netlink messages on the wire: walk and build headers and attributes.

Everything here works on offsets into a buffer (bytes, bytearray or memoryview)
instead of slicing copies out of it: the conntrack decoder walks about ten
attribute lists per message at up to 20,000 connections a second, so a walk
returns (start, end) spans of payloads and values are unpacked in place with
precompiled ``struct.Struct`` objects.

Malformed input never raises here: a walk stops at the first header that is
too short or runs past its container, and keeps what came before it.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

from pyflow.netlink.uapi import NLA_F_NESTED, NLA_TYPE_MASK, NLMSG_HDRLEN

Buffer = bytes | bytearray | memoryview
Span = tuple[int, int]  # a payload's start and end offset in its buffer

NLMSGHDR = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
NLMSGERR = struct.Struct("=i")  # struct nlmsgerr starts with the negated errno (0: an ACK)
NLATTR = struct.Struct("=HH")  # struct nlattr: len, type

# values as the protocols carry them: rtnetlink in host order, ctnetlink in network order
U16 = struct.Struct("=H")
U32 = struct.Struct("=I")
I32 = struct.Struct("=i")
BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")


def align(n: int) -> int:
    """n rounded up to NLMSG_ALIGNTO / NLA_ALIGNTO (both 4)."""
    return (n + 3) & ~3


# -- walking ---------------------------------------------------------------------------


def messages(buf: Buffer, n: int | None = None) -> Iterator[tuple[int, int, int, int, int, int]]:
    """(type, flags, seq, pid, offset, length) of each netlink message in buf[:n].

    Stops at a header claiming less than itself or more than is left: a
    truncated datagram yields the whole messages before the cut.
    """
    end = len(buf) if n is None else n
    unpack = NLMSGHDR.unpack_from
    off = 0
    while off + NLMSG_HDRLEN <= end:
        length, mtype, flags, seq, pid = unpack(buf, off)
        if length < NLMSG_HDRLEN or off + length > end:
            return
        yield mtype, flags, seq, pid, off, length
        off += (length + 3) & ~3


def reply(buf: Buffer, n: int, seq: int) -> tuple[int, int, int] | None:
    """(type, offset, length) of the first message in buf[:n] answering request ``seq``;
    None when there is none. The walk of messages() without its generator, which costs
    a route lookup more than the rest of its decoding."""
    unpack = NLMSGHDR.unpack_from
    off = 0
    while off + NLMSG_HDRLEN <= n:
        length, mtype, _flags, mseq, _pid = unpack(buf, off)
        if length < NLMSG_HDRLEN or off + length > n:
            return None
        if mseq == seq:
            return mtype, off, length
        off += (length + 3) & ~3
    return None


def attrs(buf: Buffer, start: int, end: int) -> dict[int, Span]:
    """Attribute type (flag bits masked off) -> payload span, for the attributes in buf[start:end].

    Of a type given twice, the last one wins: that is what the kernel's own
    nla_parse() does (it fills tb[type] as it walks), so a message means the
    same to pyflow as to the kernel that parses the same bytes.
    """
    out: dict[int, Span] = {}
    unpack = NLATTR.unpack_from  # hot: names bound once per walk, not per attribute
    mask = NLA_TYPE_MASK
    pos = start
    while pos + 4 <= end:
        alen, atype = unpack(buf, pos)
        stop = pos + alen
        if alen < 4 or stop > end:
            break  # malformed: keep what was sound
        out[atype & mask] = (pos + 4, stop)
        pos += (alen + 3) & ~3
    return out


def nested(buf: Buffer, span: Span | None) -> dict[int, Span]:
    """The attributes inside a nested attribute's payload; {} when it is absent."""
    if span is None:
        return {}
    return attrs(buf, span[0], span[1])


def value(buf: Buffer, span: Span | None, codec: struct.Struct) -> int | None:
    """An integer attribute's value; None when absent or shorter than codec."""
    if span is None or span[1] - span[0] < codec.size:
        return None
    return codec.unpack_from(buf, span[0])[0]


def u8(buf: Buffer, span: Span | None) -> int | None:
    """A one-byte attribute's value; None when absent or empty."""
    return buf[span[0]] if span is not None and span[1] > span[0] else None


def payload(buf: Buffer, span: Span | None) -> bytes | None:
    """An attribute's payload as bytes (a copy); None when absent."""
    return None if span is None else bytes(buf[span[0]:span[1]])


def string(buf: Buffer, span: Span | None) -> str | None:
    """A NUL-terminated string attribute; None when absent or empty."""
    if span is None:
        return None
    return bytes(buf[span[0]:span[1]]).split(b"\0", 1)[0].decode("ascii", "replace") or None


def errno_of(buf: Buffer, off: int, length: int) -> int:
    """The positive errno an NLMSG_ERROR message at buf[off:] carries (0: an ACK).

    A message too short to hold one reads as EBADMSG rather than as success.
    """
    if length < NLMSG_HDRLEN + NLMSGERR.size:
        return errno.EBADMSG
    return -NLMSGERR.unpack_from(buf, off + NLMSG_HDRLEN)[0]


# -- building --------------------------------------------------------------------------


def nla(atype: int, data: bytes) -> bytes:
    """One attribute, padded to the attribute alignment."""
    n = 4 + len(data)
    return NLATTR.pack(n, atype) + data + bytes(-n & 3)


def nest(atype: int, *children: bytes) -> bytes:
    """A nested attribute (NLA_F_NESTED set, as strict kernel parsers require) of encoded children."""
    return nla(atype | NLA_F_NESTED, b"".join(children))


def nla_header(atype: int, size: int) -> bytes:
    """The header of an attribute with a ``size``-byte payload, for requests that pack it once
    and append the payload themselves (size a multiple of 4, so no padding follows)."""
    return NLATTR.pack(4 + size, atype)


def request(msg_type: int, flags: int, seq: int, body: bytes, pid: int = 0) -> bytes:
    """One netlink message: header (its length filled in) and body."""
    return NLMSGHDR.pack(NLMSG_HDRLEN + len(body), msg_type, flags, seq, pid) + body
