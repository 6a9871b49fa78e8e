/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Packet parsing with a cursor. Every step checks that its header lies inside
 * the packet before it reads a byte, then advances the cursor and returns the
 * next protocol (network order for ethertypes, IPPROTO_* for L4) or -1 with
 * pkt->reason saying why the packet goes to the kernel.
 *
 * "Within the frame" length checks use pkt->frame_len, which for TC is the
 * whole skb (paged data included); header reads only ever touch the linear
 * part the cursor's end describes.
 */
#ifndef PYFLOW_LIB_PARSE_H
#define PYFLOW_LIB_PARSE_H

#include "compat.h"

#include "pyflow_abi.h"

#define PYFLOW_ETH_P_8021Q 0x8100
#define PYFLOW_ETH_P_8021AD 0x88A8
#define PYFLOW_ETH_P_PPP_DISC 0x8863
#define PYFLOW_ETH_P_PPP_SES 0x8864
#define PYFLOW_PPP_IP 0x0021
#define PYFLOW_PPP_IPV6 0x0057
#define PYFLOW_VLAN_VID_MASK 0x0fff
#define PYFLOW_IP_MF 0x2000
#define PYFLOW_IP_OFFSET 0x1fff

/* Longest L2 header the datapath reads or writes: MACs, two VLAN tags, PPPoE
 * session header with the PPP protocol field. */
#define PYFLOW_L2_MAX (ETH_HLEN + 4 + 4 + 8)

#define PYFLOW_TCP_FIN 0x01
#define PYFLOW_TCP_RST 0x04

struct hdr_cursor {
	void *pos;
	void *end;
	__u32 off; /* pos - start of frame, kept as a number: the verifier cannot
		    * bound the difference of two packet pointers */
};

#define cursor_skip(c, hdr) \
	do { \
		(c)->pos = (hdr) + 1; \
		(c)->off += sizeof(*(hdr)); \
	} while (0)

struct pyflow_vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

struct pyflow_pppoe_hdr {
	__u8 ver_type;
	__u8 code;
	__be16 sid;
	__be16 length; /* PPP payload: protocol field + L3 packet */
	__be16 ppp_proto;
};

/* What the parser learnt; offsets count from the first byte of the frame. */
struct pyflow_pkt {
	__u32 frame_len;   /* bytes received (TC: skb->len) */
	__u32 l3off;       /* IP header: also the length of the L2 header in the data */
	__u32 l4off;       /* TCP/UDP header */
	__u32 l3len;       /* IP header + payload, as the IP header says */
	__u32 l4hlen;      /* TCP header with options, or the 8 bytes of UDP */
	__u32 pppoe_len;   /* PPPoE length field, host order */
	__u32 reason;      /* enum pyflow_reason when a step returned -1 */
	__be16 l3proto;    /* ETH_P_IP / ETH_P_IPV6, network order */
	__u8 inline_tags;  /* VLAN tags in the frame data (not a TC accelerated tag) */
	__u8 pppoe;        /* 1: PPPoE session header before L3 */
	__u8 tcp_flags;
	__u8 ttl;          /* TTL or hop limit */
};

static __always_inline int parse_fail(struct pyflow_pkt *pkt, __u32 reason)
{
	pkt->reason = reason;
	return -1;
}

static __always_inline int is_vlan_tpid(__be16 proto)
{
	return proto == bpf_htons(PYFLOW_ETH_P_8021Q) || proto == bpf_htons(PYFLOW_ETH_P_8021AD);
}

static __always_inline int parse_eth(struct hdr_cursor *c, struct pyflow_pkt *pkt)
{
	struct ethhdr *eth = c->pos;

	if ((void *)(eth + 1) > c->end)
		return parse_fail(pkt, PYFLOW_R_MALFORMED);
	cursor_skip(c, eth);
	return eth->h_proto;
}

/* The key's outer VLAN field: the id, with PYFLOW_KEY_VLAN_8021AD for an 802.1ad tag. */
static __always_inline __u16 key_vlan_outer(__u16 vid, __be16 tpid)
{
	return tpid == bpf_htons(PYFLOW_ETH_P_8021AD) ? vid | PYFLOW_KEY_VLAN_8021AD : vid;
}

/*
 * Up to two VLAN tags: the outer one 802.1Q or 802.1ad, the inner one 802.1Q.
 * accel_tci >= 0 is a tag the TC hook found in skb metadata (the stack moved
 * it out of the data), accel_tpid its protocol (skb->vlan_proto): it is the
 * outer tag and the data may hold only one more. The outer tag's protocol
 * goes into the key with its id, however the tag arrived.
 */
static __always_inline int parse_vlans(struct hdr_cursor *c, struct pyflow_pkt *pkt,
				       struct pyflow_flow_key *key, int proto, int accel_tci,
				       __be16 accel_tpid)
{
	int tags = 0;

	if (accel_tci >= 0) {
		__u16 vid = accel_tci & PYFLOW_VLAN_VID_MASK;

		if (!vid) /* priority tag: the kernel's business */
			return parse_fail(pkt, PYFLOW_R_L2_UNSUPPORTED);
		if (!is_vlan_tpid(accel_tpid)) /* only these two are ever moved into metadata */
			return parse_fail(pkt, PYFLOW_R_L2_UNSUPPORTED);
		key->vlan_outer = key_vlan_outer(vid, accel_tpid);
		tags = 1;
	}
#pragma unroll
	for (int i = 0; i < 3; i++) {
		struct pyflow_vlan_hdr *vh = c->pos;
		__u16 vid;

		if (!is_vlan_tpid(proto))
			break;
		/* a third tag, or an 802.1ad tag inside another tag */
		if (tags >= 2 || (tags == 1 && proto != bpf_htons(PYFLOW_ETH_P_8021Q)))
			return parse_fail(pkt, PYFLOW_R_L2_UNSUPPORTED);
		if ((void *)(vh + 1) > c->end)
			return parse_fail(pkt, PYFLOW_R_MALFORMED);
		vid = bpf_ntohs(vh->tci) & PYFLOW_VLAN_VID_MASK;
		if (!vid)
			return parse_fail(pkt, PYFLOW_R_L2_UNSUPPORTED);
		if (tags == 0)
			key->vlan_outer = key_vlan_outer(vid, proto);
		else
			key->vlan_inner = vid;
		tags++;
		pkt->inline_tags++;
		proto = vh->encap_proto;
		cursor_skip(c, vh);
	}
	return proto;
}

/* PPPoE session stage; discovery (and anything not IP inside PPP) is the
 * kernel's: NOT_IP. */
static __always_inline int parse_pppoe(struct hdr_cursor *c, struct pyflow_pkt *pkt,
				       struct pyflow_flow_key *key, int proto)
{
	struct pyflow_pppoe_hdr *ph = c->pos;

	if (proto == bpf_htons(PYFLOW_ETH_P_PPP_DISC))
		return parse_fail(pkt, PYFLOW_R_NOT_IP);
	if (proto != bpf_htons(PYFLOW_ETH_P_PPP_SES))
		return proto;
	if ((void *)(ph + 1) > c->end)
		return parse_fail(pkt, PYFLOW_R_MALFORMED);
	if (ph->ver_type != 0x11 || ph->code != 0 || !ph->sid)
		return parse_fail(pkt, PYFLOW_R_L2_UNSUPPORTED);
	key->pppoe_sid = bpf_ntohs(ph->sid);
	pkt->pppoe = 1;
	pkt->pppoe_len = bpf_ntohs(ph->length);
	cursor_skip(c, ph);
	if (ph->ppp_proto == bpf_htons(PYFLOW_PPP_IP))
		return bpf_htons(ETH_P_IP);
	if (ph->ppp_proto == bpf_htons(PYFLOW_PPP_IPV6))
		return bpf_htons(ETH_P_IPV6);
	return parse_fail(pkt, PYFLOW_R_NOT_IP);
}

static __always_inline int parse_ipv4(struct hdr_cursor *c, struct pyflow_pkt *pkt,
				      struct pyflow_flow_key *key)
{
	struct iphdr *ip = c->pos;
	__u32 tot_len;

	if ((void *)(ip + 1) > c->end)
		return parse_fail(pkt, PYFLOW_R_MALFORMED);
	if (ip->version != 4 || ip->ihl < 5)
		return parse_fail(pkt, PYFLOW_R_MALFORMED);
	if (ip->ihl != 5)
		return parse_fail(pkt, PYFLOW_R_IPV4_OPTIONS);
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < sizeof(*ip) || pkt->l3off + tot_len > pkt->frame_len)
		return parse_fail(pkt, PYFLOW_R_MALFORMED);
	/* the kernel drops these; forwarding one would make the fast path differ */
	if (!csum_ipv4_hdr_ok((const __u16 *)ip))
		return parse_fail(pkt, PYFLOW_R_IPV4_BAD_CHECKSUM);
	if (ip->frag_off & bpf_htons(PYFLOW_IP_MF | PYFLOW_IP_OFFSET))
		return parse_fail(pkt, PYFLOW_R_FRAGMENT);
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return parse_fail(pkt, PYFLOW_R_NOT_TCP_UDP);
	pkt->l3len = tot_len;
	pkt->ttl = ip->ttl;
	key->family = PYFLOW_FAMILY_IPV4;
	key->proto = ip->protocol;
	key->saddr[0] = ip->saddr;
	key->daddr[0] = ip->daddr;
	cursor_skip(c, ip);
	return ip->protocol;
}

static __always_inline int is_ipv6_ext(__u8 nexthdr)
{
	switch (nexthdr) {
	case 0:   /* hop-by-hop options */
	case 43:  /* routing */
	case 44:  /* fragment */
	case 51:  /* AH */
	case 60:  /* destination options */
	case 135: /* mobility */
	case 139: /* HIP */
	case 140: /* shim6 */
		return 1;
	}
	return 0;
}

static __always_inline int parse_ipv6(struct hdr_cursor *c, struct pyflow_pkt *pkt,
				      struct pyflow_flow_key *key)
{
	struct ipv6hdr *ip6 = c->pos;
	__u32 l3len;

	if ((void *)(ip6 + 1) > c->end)
		return parse_fail(pkt, PYFLOW_R_MALFORMED);
	if (ip6->version != 6)
		return parse_fail(pkt, PYFLOW_R_MALFORMED);
	/* payload_len 0 (jumbo / BIG TCP) lands here too: the kernel's */
	l3len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	if (pkt->l3off + l3len > pkt->frame_len)
		return parse_fail(pkt, PYFLOW_R_MALFORMED);
	if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
		return parse_fail(pkt, is_ipv6_ext(ip6->nexthdr) ? PYFLOW_R_IPV6_EXTENSION
								  : PYFLOW_R_NOT_TCP_UDP);
	pkt->l3len = l3len;
	pkt->ttl = ip6->hop_limit;
	key->family = PYFLOW_FAMILY_IPV6;
	key->proto = ip6->nexthdr;
	__builtin_memcpy(key->saddr, &ip6->saddr, sizeof(key->saddr));
	__builtin_memcpy(key->daddr, &ip6->daddr, sizeof(key->daddr));
	cursor_skip(c, ip6);
	return ip6->nexthdr;
}

/* TCP or UDP header; l4 bytes available = what the IP header says follows it. */
static __always_inline int parse_l4(struct hdr_cursor *c, struct pyflow_pkt *pkt,
				    struct pyflow_flow_key *key, int proto)
{
	__u32 avail = pkt->l3len - (pkt->l4off - pkt->l3off);

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = c->pos;
		__u32 hlen;

		if ((void *)(th + 1) > c->end)
			return parse_fail(pkt, PYFLOW_R_MALFORMED);
		hlen = th->doff * 4;
		if (hlen < sizeof(*th) || hlen > avail)
			return parse_fail(pkt, PYFLOW_R_MALFORMED);
		pkt->l4hlen = hlen;
		/* byte 13 of the TCP header: CWR ECE URG ACK PSH RST SYN FIN */
		pkt->tcp_flags = ((__u8 *)th)[13];
		key->sport = th->source;
		key->dport = th->dest;
		return 0;
	} else {
		struct udphdr *uh = c->pos;
		__u32 ulen;

		if ((void *)(uh + 1) > c->end)
			return parse_fail(pkt, PYFLOW_R_MALFORMED);
		ulen = bpf_ntohs(uh->len);
		if (ulen < sizeof(*uh) || ulen > avail)
			return parse_fail(pkt, PYFLOW_R_MALFORMED);
		/* RFC 8200 8.1: a zero UDP checksum is invalid over IPv6 */
		if (key->family == PYFLOW_FAMILY_IPV6 && !uh->check)
			return parse_fail(pkt, PYFLOW_R_MALFORMED);
		pkt->l4hlen = sizeof(*uh);
		key->sport = uh->source;
		key->dport = uh->dest;
		return 0;
	}
}

#endif /* PYFLOW_LIB_PARSE_H */
