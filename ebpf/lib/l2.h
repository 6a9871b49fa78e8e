/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The egress L2 header: destination and source MAC, an optional outer VLAN tag
 * (802.1Q or 802.1ad), an optional inner 802.1Q tag, an optional PPPoE session
 * header with its PPP protocol field, and the ethertype. The hook has already
 * made exactly l2_out_len() bytes of room in front of the IP header
 * (context.h); l2_write fills all of them.
 *
 * VLAN tags on TC: the data gets no tags; tc_push_tags hands them to the
 * kernel (bpf_skb_vlan_push), the outer one as skb metadata that the egress
 * device or validate_xmit_vlan inserts. That is the only way a GSO
 * super-packet can gain a tag: every segment gets it when it is cut, while a
 * tag written into the data would need a longer L2 header than the one GSO
 * copies (and the NIC's VLAN insertion costs no CPU at all).
 */
#ifndef PYFLOW_LIB_L2_H
#define PYFLOW_LIB_L2_H

#include "context.h"
#include "csum.h"
#include "parse.h"

/* Bytes of egress L2 header in the frame data (TC: without the VLAN tags). */
static __always_inline __u32 l2_out_len(const struct pyflow_flow_action *act, const int is_tc)
{
	__u32 len = ETH_HLEN;

	if (!is_tc && (act->flags & PYFLOW_ACT_VLAN_OUTER)) {
		len += 4;
		if (act->flags & PYFLOW_ACT_VLAN_INNER) /* an inner tag needs an outer one */
			len += 4;
	}
	if (act->flags & PYFLOW_ACT_PPPOE)
		len += 8;
	return len;
}

/* Write one 16-bit word. TC: words at or after the checksum coverage start
 * (see tc_resize_l2) go into *acc, because they are part of skb->csum. */
static __always_inline void l2_put(__u16 *w, __u32 i, __u16 v, __u32 cov, __u32 *acc,
				   const int is_tc)
{
	if (is_tc && i * 2 >= cov)
		*acc = csum_diff16(*acc, w[i], v);
	w[i] = v;
}

static __always_inline int l2_write(void *ctx, const int is_tc, const struct pyflow_flow_action *act,
				    const struct pyflow_pkt *pkt, __be16 l3proto, __u32 cov, __u32 *acc)
{
	void *data = ctx_data(ctx, is_tc);
	void *data_end = ctx_data_end(ctx, is_tc);
	const __u16 *dmac = (const __u16 *)act->dmac;
	const __u16 *smac = (const __u16 *)act->smac;
	__u16 *w = data;
	__u32 i = 6;

	/* every forwarded frame has L2 + at least 28 bytes of L3/L4 headers, all linear */
	if (data + PYFLOW_L2_MAX > data_end)
		return -1;
	l2_put(w, 0, dmac[0], cov, acc, is_tc);
	l2_put(w, 1, dmac[1], cov, acc, is_tc);
	l2_put(w, 2, dmac[2], cov, acc, is_tc);
	l2_put(w, 3, smac[0], cov, acc, is_tc);
	l2_put(w, 4, smac[1], cov, acc, is_tc);
	l2_put(w, 5, smac[2], cov, acc, is_tc);
	if (!is_tc && (act->flags & PYFLOW_ACT_VLAN_OUTER)) {
		__be16 tpid = act->encap.vlan_outer_tpid;

		if (!tpid)
			tpid = bpf_htons(PYFLOW_ETH_P_8021Q);
		l2_put(w, i++, tpid, cov, acc, is_tc);
		l2_put(w, i++, bpf_htons(act->encap.vlan_outer_tci), cov, acc, is_tc);
		if (act->flags & PYFLOW_ACT_VLAN_INNER) {
			l2_put(w, i++, bpf_htons(PYFLOW_ETH_P_8021Q), cov, acc, is_tc);
			l2_put(w, i++, bpf_htons(act->encap.vlan_inner_tci), cov, acc, is_tc);
		}
	}
	if (act->flags & PYFLOW_ACT_PPPOE) {
		l2_put(w, i++, bpf_htons(PYFLOW_ETH_P_PPP_SES), cov, acc, is_tc);
		l2_put(w, i++, bpf_htons(0x1100), cov, acc, is_tc); /* ver 1, type 1, code 0 (session data) */
		l2_put(w, i++, bpf_htons(act->encap.pppoe_sid), cov, acc, is_tc);
		/* PPPoE length counts the PPP protocol field and the IP packet */
		l2_put(w, i++, bpf_htons(pkt->l3len + 2), cov, acc, is_tc);
		l2_put(w, i++, l3proto == bpf_htons(ETH_P_IP) ? bpf_htons(PYFLOW_PPP_IP)
							       : bpf_htons(PYFLOW_PPP_IPV6),
		       cov, acc, is_tc);
	} else {
		l2_put(w, i++, l3proto, cov, acc, is_tc);
	}
	return 0;
}

/*
 * TC: give the frame its VLAN tags after l2_write. With no tag in the skb
 * metadata (tc_resize_l2 cleared it) a push only sets the metadata; a second
 * push first moves the tag already there into the data right after the MACs,
 * so pushing the inner tag first and the outer one second leaves the inner
 * tag in the data and the outer one in the metadata. The helper keeps
 * CHECKSUM_COMPLETE's sum and skb->mac_len right. Returns 0 or -1.
 */
static __always_inline int tc_push_tags(struct __sk_buff *skb, const struct pyflow_flow_action *act)
{
	__be16 tpid = act->encap.vlan_outer_tpid;

	if (!(act->flags & PYFLOW_ACT_VLAN_OUTER))
		return 0;
	if ((act->flags & PYFLOW_ACT_VLAN_INNER) &&
	    bpf_skb_vlan_push(skb, bpf_htons(PYFLOW_ETH_P_8021Q), act->encap.vlan_inner_tci))
		return -1;
	if (!tpid)
		tpid = bpf_htons(PYFLOW_ETH_P_8021Q);
	return bpf_skb_vlan_push(skb, tpid, act->encap.vlan_outer_tci) ? -1 : 0;
}

#endif /* PYFLOW_LIB_L2_H */
