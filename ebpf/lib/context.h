/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Everything that differs between the XDP hook and TC ingress, behind small
 * always-inline functions taking the compile-time constant is_tc: each entry
 * point inlines the datapath with is_tc fixed, so clang drops the other hook's
 * helper calls (the verifier would refuse them: skb helpers are not allowed in
 * XDP programs and vice versa).
 */
#ifndef PYFLOW_LIB_CONTEXT_H
#define PYFLOW_LIB_CONTEXT_H

#include "compat.h"

#include "csum.h"
#include "maps.h"
#include "parse.h"

/* Bound on every header offset the datapath reads or writes: the longest
 * chain (2 VLAN tags + PPPoE 30, IPv6 40, TCP 20) with room to spare. Also
 * the linear length TC wants before parsing. */
#define PYFLOW_HDRS_MAX 128

/* Results of ctx_resize_l2 */
#define PYFLOW_RESIZE_OK 0
#define PYFLOW_RESIZE_REFUSED -1   /* nothing changed: pass the packet */
#define PYFLOW_RESIZE_BROKEN -2    /* TC only: failed half way, the skb is changed */

static __always_inline struct __sk_buff *ctx_skb(void *ctx)
{
	return (struct __sk_buff *)ctx;
}

static __always_inline struct xdp_md *ctx_xdp(void *ctx)
{
	return (struct xdp_md *)ctx;
}

static __always_inline void *ctx_data(void *ctx, const int is_tc)
{
	if (is_tc)
		return (void *)(long)ctx_skb(ctx)->data;
	return (void *)(long)ctx_xdp(ctx)->data;
}

static __always_inline void *ctx_data_end(void *ctx, const int is_tc)
{
	if (is_tc)
		return (void *)(long)ctx_skb(ctx)->data_end;
	return (void *)(long)ctx_xdp(ctx)->data_end;
}

/* TC: TC_ACT_UNSPEC, not TC_ACT_OK: in direct-action mode OK ends
 * classification, so an operator's own ingress filters after ours (shaping
 * through ifb, policing) would never see the packets we pass. */
static __always_inline int ctx_pass(const int is_tc)
{
	return is_tc ? TC_ACT_UNSPEC : XDP_PASS;
}

static __always_inline int ctx_redirected(const int is_tc)
{
	return is_tc ? TC_ACT_REDIRECT : XDP_REDIRECT;
}

/* Bytes of the frame as received, for the stats map. */
static __always_inline __u32 ctx_frame_len(void *ctx, const int is_tc)
{
	if (is_tc)
		return ctx_skb(ctx)->len;
	return (__u32)(ctx_data_end(ctx, 0) - ctx_data(ctx, 0));
}

static __always_inline __u32 ctx_ifindex(void *ctx, const int is_tc)
{
	if (is_tc)
		return ctx_skb(ctx)->ifindex;
	return ctx_xdp(ctx)->ingress_ifindex;
}

/* TC: make the headers linear so that direct packet access reaches them (GRO
 * super-packets and some drivers leave part of the headers in page frags). A
 * failed pull only means the parser finds the packet short and passes it. */
static __always_inline void ctx_prepare(void *ctx, const int is_tc)
{
	if (is_tc) {
		struct __sk_buff *skb = ctx_skb(ctx);
		__u32 want = skb->len < PYFLOW_HDRS_MAX ? skb->len : PYFLOW_HDRS_MAX;

		if (ctx_data_end(ctx, 1) - ctx_data(ctx, 1) < want)
			bpf_skb_pull_data(skb, want);
	}
}

/* TC: the outer VLAN tag the stack moved into skb metadata (skb_vlan_untag
 * runs before TC ingress), as a TCI, or -1. XDP always sees tags in the data. */
static __always_inline int ctx_accel_tci(void *ctx, const int is_tc)
{
	if (is_tc && ctx_skb(ctx)->vlan_present)
		return ctx_skb(ctx)->vlan_tci & 0xffff;
	return -1;
}

/* TC: that tag's protocol (skb->vlan_proto, network order: ETH_P_8021Q or
 * ETH_P_8021AD); meaningful only when ctx_accel_tci says a tag is there. */
static __always_inline __be16 ctx_accel_tpid(void *ctx, const int is_tc)
{
	if (is_tc)
		return (__be16)ctx_skb(ctx)->vlan_proto;
	return 0;
}

/* TC: GSO segment size (0 = not GSO) and segment count; XDP frames are single. */
static __always_inline __u32 ctx_gso_size(void *ctx, const int is_tc)
{
	return is_tc ? ctx_skb(ctx)->gso_size : 0;
}

static __always_inline __u32 ctx_gso_segs(void *ctx, const int is_tc)
{
	__u32 segs = is_tc ? ctx_skb(ctx)->gso_segs : 1;

	return segs ? segs : 1;
}

/*
 * TC: does this packet leave through the session's PPP device instead of
 * with a PPPoE header pushed here? Only a GSO super-packet that must leave in a
 * PPPoE session, and only when the action names the PPP device: one L2 header
 * is copied onto every segment, so no PPPoE length written here could be right
 * for each of them (and no GSO handler segments a PPPoE frame). The PPP device
 * is an L3 device: bpf_redirect drops the mac header (dev_is_mac_header_xmit is
 * false for ARPHRD_PPP), the device has no segmentation offload, so the kernel
 * cuts the segments in validate_xmit_skb, and the PPPoE channel writes the PPP
 * protocol, the session header with each segment's own length, the VLAN tags
 * of its lower device and the MACs. XDP frames are never GSO.
 */
static __always_inline int ctx_via_ppp(void *ctx, const int is_tc, const struct pyflow_flow_action *act)
{
	return is_tc && ctx_skb(ctx)->gso_size && (act->flags & PYFLOW_ACT_PPPOE) && act->ppp_ifindex;
}

/*
 * Choose the egress before the packet is touched, so that a refusal leaves it
 * as it came. XDP: the action's devmap slot (an empty slot yields XDP_PASS);
 * TC: the egress ifindex, or the PPP device's (ctx_via_ppp) (bpf_redirect only
 * records it; the kernel sends the skb when the program returns
 * TC_ACT_REDIRECT). Returns 0 or -1.
 */
static __always_inline int ctx_redirect(void *ctx, const int is_tc,
					const struct pyflow_flow_action *act, const int via_ppp)
{
	if (is_tc) {
		__u32 ifindex = via_ppp ? act->ppp_ifindex : act->out_ifindex;

		if (!ifindex)
			return -1;
		return bpf_redirect(ifindex, 0) == TC_ACT_REDIRECT ? 0 : -1;
	}
	return txports_redirect(act->tx_port) == XDP_REDIRECT ? 0 : -1;
}

static __always_inline int tc_is_vlan_proto(__u32 proto)
{
	return proto == bpf_htons(PYFLOW_ETH_P_8021Q) || proto == bpf_htons(PYFLOW_ETH_P_8021AD);
}

/*
 * TC: make a PPPoE header removable. TC can take only VLAN tags out of an skb
 * (bpf_skb_adjust_room refuses every skb whose skb->protocol is not IPv4/IPv6,
 * and a PPPoE skb's is ETH_P_PPP_SES), and bpf_skb_vlan_pop removes inline
 * tags only while skb->protocol is a VLAN TPID. So: a push while a tag sits in
 * skb metadata writes that tag into the data and sets skb->protocol to its
 * TPID (the first push provides such a tag unless the stack's outer tag is
 * there); then every L2 byte after the MACs (old tags, PPPoE header, PPP
 * protocol, the inserted tag) is rewritten as 802.1Q tags followed by the IP
 * ethertype, which the pop loop in tc_resize_l2 then removes.
 */
static __always_inline int tc_pppoe_to_tags(struct __sk_buff *skb, const struct pyflow_pkt *pkt,
					    __u32 tail)
{
	void *data, *data_end;
	__u32 cur, acc = 0;
	int pushed = 0;
	__u16 *w;

	if (!skb->vlan_present) {
		if (bpf_skb_vlan_push(skb, bpf_htons(PYFLOW_ETH_P_8021Q), 1))
			return PYFLOW_RESIZE_REFUSED;
		pushed = 1;
	}
	if (bpf_skb_vlan_push(skb, bpf_htons(PYFLOW_ETH_P_8021Q), 1)) {
		/* only metadata changed so far: undo it */
		if (pushed && bpf_skb_vlan_pop(skb))
			return PYFLOW_RESIZE_BROKEN;
		return PYFLOW_RESIZE_REFUSED;
	}
	cur = skb->len - tail; /* the old L2 header plus the tag just written */
	data = ctx_data(skb, 1);
	data_end = ctx_data_end(skb, 1);
	if (cur > PYFLOW_L2_MAX + 4 || data + PYFLOW_L2_MAX + 4 > data_end)
		return PYFLOW_RESIZE_BROKEN;
	w = data;
	/* words 6, 8, ...: TPID; 7, 9, ...: TCI (VLAN 1); the last one the IP ethertype */
#pragma unroll
	for (__u32 i = 6; i < (PYFLOW_L2_MAX + 4) / 2; i++) {
		__u16 v;

		if (i * 2 >= cur)
			break;
		if (i * 2 == cur - 2)
			v = pkt->l3proto;
		else
			v = (i & 1) ? bpf_htons(1) : bpf_htons(PYFLOW_ETH_P_8021Q);
		/* bytes from ETH_HLEN on are in CHECKSUM_COMPLETE's sum, and each
		 * pop subtracts the bytes it removes: the sum must know them first */
		if (i * 2 >= ETH_HLEN)
			acc = csum_diff16(acc, w[i], v);
		w[i] = v;
	}
	if (acc)
		bpf_csum_update(skb, csum_fold32(acc));
	return PYFLOW_RESIZE_OK;
}

/*
 * TC: make the data's L2 header out_l2 bytes long and clear an accelerated tag.
 *
 * What TC can do: grow at the head (bpf_skb_change_head) and remove VLAN tags
 * (bpf_skb_vlan_pop: it clears an accelerated tag if there is one, else pops
 * the first inline tag, and then moves a following inline tag into the
 * metadata, so repeating it until no tag is left empties both). A PPPoE header
 * that must go is first turned into tags (tc_pppoe_to_tags).
 *
 * A GSO skb is taken only with a bare Ethernet header in the data on both
 * sides (VLAN tags travel as metadata, see l2.h): one L2 header is copied
 * onto every segment, so no PPPoE length could be right for each of them
 * (such a packet leaves through the PPP device when the action names one, see
 * ctx_via_ppp, and the caller then asks for a bare Ethernet header), and tags
 * inline in the data would have to be popped from a super-packet (the
 * kernel moves the outer tag into metadata before TC ingress, so inline tags
 * here are QinQ inner ones; that case is left to the kernel path).
 * Clearing an accelerated tag alone does not change the data.
 *
 * *cov gets the offset from which CHECKSUM_COMPLETE's skb->csum covers the
 * data: eth_type_trans pulled the Ethernet header before the sum was taken, a
 * pop leaves the sum starting after the (new) Ethernet header, and growing at
 * the head moves the covered bytes further in.
 */
static __always_inline int tc_resize_l2(struct __sk_buff *skb, const struct pyflow_pkt *pkt,
					__u32 out_l2, __u32 *cov)
{
	__u32 in_l2 = pkt->l3off;
	__u32 tail = skb->len - in_l2; /* L3 onwards: no L2 change touches it */
	__u32 cur = in_l2;
	int changed = 0, rc;

	*cov = ETH_HLEN;
	if (skb->gso_size && (in_l2 != ETH_HLEN || out_l2 != ETH_HLEN))
		return PYFLOW_RESIZE_REFUSED;
	/* more bytes to remove than the inline VLAN tags hold: the PPPoE header goes too */
	if (in_l2 - 4 * pkt->inline_tags > out_l2) {
		rc = tc_pppoe_to_tags(skb, pkt, tail);
		if (rc != PYFLOW_RESIZE_OK)
			return rc;
		changed = 1;
		cur = skb->len - tail;
	}
	/* at most 5 inline tags (2 + PPPoE turned into 3) and 1 in metadata, ~1 per pop */
#pragma unroll
	for (int i = 0; i < 7; i++) {
		if (!skb->vlan_present && cur <= out_l2)
			break;
		if (!skb->vlan_present && !tc_is_vlan_proto(skb->protocol))
			break;
		if (bpf_skb_vlan_pop(skb))
			return changed ? PYFLOW_RESIZE_BROKEN : PYFLOW_RESIZE_REFUSED;
		changed = 1;
		cur = skb->len - tail;
	}
	if (skb->vlan_present || cur > out_l2)
		return changed ? PYFLOW_RESIZE_BROKEN : PYFLOW_RESIZE_REFUSED;
	if (cur < out_l2) {
		if (bpf_skb_change_head(skb, out_l2 - cur, 0))
			return changed ? PYFLOW_RESIZE_BROKEN : PYFLOW_RESIZE_REFUSED;
		*cov += out_l2 - cur;
	}
	return PYFLOW_RESIZE_OK;
}

/*
 * Make room for the egress L2 header (out_l2 bytes before L3). XDP moves the
 * data start: bpf_xdp_adjust_head fails only without headroom, leaving the
 * frame as it was. *cov is TC's checksum coverage start (see tc_resize_l2).
 */
static __always_inline int ctx_resize_l2(void *ctx, const int is_tc, const struct pyflow_pkt *pkt,
					 __u32 out_l2, __u32 *cov)
{
	if (is_tc)
		return tc_resize_l2(ctx_skb(ctx), pkt, out_l2, cov);
	*cov = 0;
	if (pkt->l3off != out_l2 && bpf_xdp_adjust_head(ctx, (int)pkt->l3off - (int)out_l2))
		return PYFLOW_RESIZE_REFUSED;
	return PYFLOW_RESIZE_OK;
}

/*
 * Update the TCP/UDP checksum at check_off after NAT: pseudo is the diff of
 * the rewritten addresses (pseudo-header), ports the diff of the ports.
 *
 * XDP: by hand (RFC 1624). TC: through bpf_l4_csum_replace, because only the
 * kernel knows skb->ip_summed: GRO super-packets (and skbs from a local veth
 * peer) are CHECKSUM_PARTIAL, their checksum field holds just the
 * pseudo-header sum, uncomplemented, and a port change must not touch it; the
 * helper handles that and CHECKSUM_COMPLETE's skb->csum for the pseudo-header
 * part. The port part's effect on the field is not in skb->csum, so its
 * measured change goes into *acc like every other word written directly.
 * ports == 0 (no port changed) needs no call for them: a helper call is a
 * good part of a hit's cost at TC.
 */
static __always_inline int ctx_l4_csum(void *ctx, const int is_tc, __u32 check_off, __u32 pseudo,
				       __u32 ports, const int is_udp, __u32 *acc)
{
	void *data = ctx_data(ctx, is_tc);
	void *data_end = ctx_data_end(ctx, is_tc);
	__u16 *check = data + check_off;
	__u64 mangled = is_udp ? BPF_F_MARK_MANGLED_0 : 0;
	__u16 before;

	if (check_off > PYFLOW_HDRS_MAX || (void *)(check + 1) > data_end)
		return -1;
	if (!is_tc) {
		*check = is_udp ? csum_replace_udp(*check, pseudo + ports)
				: csum_replace(*check, pseudo + ports);
		return 0;
	}
	if (ports) {
		before = *check;
		if (bpf_l4_csum_replace(ctx, check_off, 0, csum_fold32(ports), mangled))
			return -1;
		data = ctx_data(ctx, 1);
		data_end = ctx_data_end(ctx, 1);
		check = data + check_off;
		if ((void *)(check + 1) > data_end)
			return -1;
		*acc = csum_diff16(*acc, before, *check);
	}
	if (bpf_l4_csum_replace(ctx, check_off, 0, csum_fold32(pseudo), BPF_F_PSEUDO_HDR | mangled))
		return -1;
	return 0;
}

/* TC: direct packet writes do not update skb->csum; add what they changed
 * (a no-op unless the skb is CHECKSUM_COMPLETE). */
static __always_inline void ctx_csum_update(void *ctx, const int is_tc, __u32 acc)
{
	if (is_tc && acc)
		bpf_csum_update(ctx, csum_fold32(acc));
}

#endif /* PYFLOW_LIB_CONTEXT_H */
