/* SPDX-License-Identifier: GPL-2.0 */
/*
 * L3/L4 rewrite of a forwarded packet: NAT as the action's flags say (SNAT:
 * source address and port, DNAT: destination address and port) and TTL / hop
 * limit minus one, with incremental checksum updates. Nothing else changes:
 * not DSCP, not ECN, not the IPv6 flow label.
 *
 * *acc collects the diff of every 16-bit word written here (TC keeps
 * CHECKSUM_COMPLETE's skb->csum right with it; XDP ignores it).
 */
#ifndef PYFLOW_LIB_NAT_H
#define PYFLOW_LIB_NAT_H

#include "context.h"
#include "csum.h"
#include "parse.h"

#define PYFLOW_L3_MAX_OFF 64 /* bound for the verifier: the L2 header is at most 30 bytes */

/* Ports first (both TCP and UDP start with source, destination), then the
 * checksum, whose offset depends on the protocol. */
static __always_inline int l4_rewrite(void *ctx, const int is_tc, __u32 l4off, __u8 proto,
				      const struct pyflow_flow_action *act, __u32 pseudo,
				      __u32 *acc)
{
	void *data = ctx_data(ctx, is_tc);
	void *data_end = ctx_data_end(ctx, is_tc);
	__be16 *ports = data + l4off;
	__u32 pdiff = 0;
	const int is_udp = proto == IPPROTO_UDP;

	if (!(act->flags & (PYFLOW_ACT_SNAT | PYFLOW_ACT_DNAT)))
		return 0; /* TTL is not in the pseudo-header: the L4 checksum stays */
	if (l4off > PYFLOW_L3_MAX_OFF + 40 || (void *)(ports + 2) > data_end)
		return -1;
	/* a port NAT keeps (masquerade mostly keeps the source port) adds nothing:
	 * pdiff stays 0 and TC skips the checksum helper for the ports */
	if ((act->flags & PYFLOW_ACT_SNAT) && ports[0] != act->nat_sport) {
		pdiff = csum_diff16(pdiff, ports[0], act->nat_sport);
		ports[0] = act->nat_sport;
	}
	if ((act->flags & PYFLOW_ACT_DNAT) && ports[1] != act->nat_dport) {
		pdiff = csum_diff16(pdiff, ports[1], act->nat_dport);
		ports[1] = act->nat_dport;
	}
	*acc += pdiff;
	return ctx_l4_csum(ctx, is_tc, l4off + (is_udp ? offsetof(struct udphdr, check)
						     : offsetof(struct tcphdr, check)),
			   pseudo, pdiff, is_udp, acc);
}

static __always_inline int ipv4_rewrite(void *ctx, const int is_tc, __u32 l3off, __u8 proto,
					const struct pyflow_flow_action *act, __u32 *acc)
{
	void *data = ctx_data(ctx, is_tc);
	void *data_end = ctx_data_end(ctx, is_tc);
	struct iphdr *ip = data + l3off;
	__u32 pseudo = 0, hdiff = 0;
	__u16 *ttl_word, old, check;

	if (l3off > PYFLOW_L3_MAX_OFF || (void *)(ip + 1) > data_end)
		return -1;
	if (act->flags & PYFLOW_ACT_SNAT) {
		pseudo = csum_diff32(pseudo, ip->saddr, act->nat_saddr[0]);
		ip->saddr = act->nat_saddr[0];
	}
	if (act->flags & PYFLOW_ACT_DNAT) {
		pseudo = csum_diff32(pseudo, ip->daddr, act->nat_daddr[0]);
		ip->daddr = act->nat_daddr[0];
	}
	/* TTL shares its 16-bit word with the protocol byte */
	ttl_word = (__u16 *)&ip->ttl;
	old = *ttl_word;
	ip->ttl--;
	hdiff = csum_diff16(pseudo, old, *ttl_word);
	check = ip->check;
	ip->check = csum_replace(check, hdiff);
	*acc = csum_diff16(*acc + hdiff, check, ip->check);
	return l4_rewrite(ctx, is_tc, l3off + sizeof(*ip), proto, act, pseudo, acc);
}

static __always_inline int ipv6_rewrite(void *ctx, const int is_tc, __u32 l3off, __u8 proto,
					const struct pyflow_flow_action *act, __u32 *acc)
{
	void *data = ctx_data(ctx, is_tc);
	void *data_end = ctx_data_end(ctx, is_tc);
	struct ipv6hdr *ip6 = data + l3off;
	__u32 pseudo = 0;
	__u32 *addr;
	__u16 *hop_word, old;

	if (l3off > PYFLOW_L3_MAX_OFF || (void *)(ip6 + 1) > data_end)
		return -1;
	if (act->flags & PYFLOW_ACT_SNAT) {
		addr = (__u32 *)&ip6->saddr;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			pseudo = csum_diff32(pseudo, addr[i], act->nat_saddr[i]);
			addr[i] = act->nat_saddr[i];
		}
	}
	if (act->flags & PYFLOW_ACT_DNAT) {
		addr = (__u32 *)&ip6->daddr;
#pragma unroll
		for (int i = 0; i < 4; i++) {
			pseudo = csum_diff32(pseudo, addr[i], act->nat_daddr[i]);
			addr[i] = act->nat_daddr[i];
		}
	}
	/* hop limit shares its 16-bit word with the next-header byte */
	hop_word = (__u16 *)&ip6->nexthdr;
	old = *hop_word;
	ip6->hop_limit--;
	*acc = csum_diff16(*acc + pseudo, old, *hop_word);
	return l4_rewrite(ctx, is_tc, l3off + sizeof(*ip6), proto, act, pseudo, acc);
}

/* Rewrite L3 and L4 of a packet whose IP header now starts at l3off. */
static __always_inline int l3_rewrite(void *ctx, const int is_tc, const struct pyflow_pkt *pkt,
				      const struct pyflow_flow_key *key, __u32 l3off,
				      const struct pyflow_flow_action *act, __u32 *acc)
{
	if (key->family == PYFLOW_FAMILY_IPV4)
		return ipv4_rewrite(ctx, is_tc, l3off, key->proto, act, acc);
	return ipv6_rewrite(ctx, is_tc, l3off, key->proto, act, acc);
}

#endif /* PYFLOW_LIB_NAT_H */
