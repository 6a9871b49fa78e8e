/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
 * The only place in the datapath that does checksum math.
 *
 * All values are 16-bit words exactly as they sit in the packet (network
 * order read as native integers): the ones' complement sum does not depend on
 * byte order as long as every word is read the same way, so nothing here swaps.
 *
 * A "diff" is a running sum of (~old + new) over the words that changed; it is
 * what RFC 1624 eqn. 3 adds to a checksum (HC' = ~(~HC + ~m + m')), what the
 * kernel calls a csum diff (bpf_l4_csum_replace with size 0), and, applied to
 * skb->csum with bpf_csum_update, keeps a CHECKSUM_COMPLETE sum right.
 */
#ifndef PYFLOW_LIB_CSUM_H
#define PYFLOW_LIB_CSUM_H

#include <linux/types.h>

static __always_inline __u16 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Add the change old -> new of one 16-bit word to a diff. A diff stays far
 * below 2^32: the datapath changes at most a few dozen words per packet. */
static __always_inline __u32 csum_diff16(__u32 diff, __u16 old, __u16 new)
{
	return diff + (__u16)~old + new;
}

/* The same for a 32-bit field (an IPv4 address or an IPv6 address word). */
static __always_inline __u32 csum_diff32(__u32 diff, __u32 old, __u32 new)
{
	diff = csum_diff16(diff, (__u16)old, (__u16)new);
	return csum_diff16(diff, (__u16)(old >> 16), (__u16)(new >> 16));
}

/* The ones' complement negation of a diff, folded. */
static __always_inline __u16 csum_neg(__u32 diff)
{
	return (__u16)~csum_fold32(diff);
}

/* RFC 1624 eqn. 3: the checksum field after the words in diff changed. */
static __always_inline __u16 csum_replace(__u16 check, __u32 diff)
{
	return (__u16)~csum_fold32((__u32)(__u16)~check + diff);
}

/* UDP: checksum 0 means "none" over IPv4 and stays 0 (the sender chose not
 * to checksum, and the kernel does not verify it either; over IPv6 the parser
 * already refused it). A computed 0 is sent as 0xffff, its other ones'
 * complement spelling (RFC 768). */
static __always_inline __u16 csum_replace_udp(__u16 check, __u32 diff)
{
	__u16 c;

	if (!check)
		return 0;
	c = csum_replace(check, diff);
	return c ? c : 0xffff;
}

/* Whether a 20-byte IPv4 header (no options: the parser checked IHL) sums to
 * all ones, i.e. its header checksum is right. */
static __always_inline int csum_ipv4_hdr_ok(const __u16 *hdr)
{
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += hdr[i];
	return csum_fold32(sum) == 0xffff;
}

#endif /* PYFLOW_LIB_CSUM_H */
