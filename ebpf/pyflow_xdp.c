// SPDX-License-Identifier: GPL-2.0
/*
 * pyflow datapath: forwards packets of offloaded flows (NAT, TTL, L2 rewrite,
 * redirect) and hands everything else to the kernel unchanged.
 *
 * One file, two entry points sharing one set of maps: pyflow_xdp for the XDP
 * hook and pyflow_tc for TC ingress. Both inline pyflow_process() with a
 * constant is_tc; lib/context.h holds what differs between the hooks.
 *
 * Fail open: whenever in doubt the packet goes to the kernel as it came, and
 * the reason is counted (enum pyflow_reason, PYFLOW_MAP_STATS). The kernel
 * path is always right; this one may only be faster.
 */
#include "pyflow_abi.h"

#include "lib/maps.h"
#include "lib/stats.h"
#include "lib/csum.h"
#include "lib/parse.h"
#include "lib/context.h"
#include "lib/nat.h"
#include "lib/l2.h"

/* Map accessors declared in lib/maps.h: bcc rewrites table method calls only
 * in the main source file (and not inside macro expansions), so these three
 * live here with both spellings. */
static __always_inline struct pyflow_flow *flows_lookup(struct pyflow_flow_key *key)
{
#ifdef PYFLOW_LIBBPF
	return bpf_map_lookup_elem(&pyflow_flows, key);
#else
	return pyflow_flows.lookup(key);
#endif
}

static __always_inline struct pyflow_stat *stats_lookup(__u32 reason)
{
#ifdef PYFLOW_LIBBPF
	return bpf_map_lookup_elem(&pyflow_stats, &reason);
#else
	return pyflow_stats.lookup(&reason);
#endif
}

static __always_inline int txports_redirect(__u32 slot)
{
#ifdef PYFLOW_LIBBPF
	return bpf_redirect_map(&pyflow_txports, slot, XDP_PASS);
#else
	return pyflow_txports.redirect_map(slot, XDP_PASS);
#endif
}

static __always_inline int pyflow_pass(const int is_tc, const struct pyflow_pkt *pkt)
{
	stats_count(pkt->reason, pkt->frame_len);
	return ctx_pass(is_tc);
}

static __always_inline int mac_equal(const void *a, const void *b)
{
	const __u16 *x = a, *y = b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

static __always_inline int pyflow_process(void *ctx, const int is_tc)
{
	struct pyflow_flow_key key;
	struct pyflow_pkt pkt;
	struct hdr_cursor cur;
	struct pyflow_flow *flow;
	struct pyflow_flow_action *act;
	void *data;
	__u32 out_l2, cov, acc = 0;
	__be16 l3proto;
	int proto, rc, via_ppp;

	__builtin_memset(&key, 0, sizeof(key));
	__builtin_memset(&pkt, 0, sizeof(pkt));
	ctx_prepare(ctx, is_tc);
	pkt.frame_len = ctx_frame_len(ctx, is_tc);
	data = ctx_data(ctx, is_tc);
	cur.pos = data;
	cur.end = ctx_data_end(ctx, is_tc);
	cur.off = 0;
	key.ifindex = ctx_ifindex(ctx, is_tc);

	/* 1. L2 */
	proto = parse_eth(&cur, &pkt);
	if (proto < 0)
		return pyflow_pass(is_tc, &pkt);
	proto = parse_vlans(&cur, &pkt, &key, proto, ctx_accel_tci(ctx, is_tc),
			    ctx_accel_tpid(ctx, is_tc));
	if (proto < 0)
		return pyflow_pass(is_tc, &pkt);
	proto = parse_pppoe(&cur, &pkt, &key, proto);
	if (proto < 0)
		return pyflow_pass(is_tc, &pkt);

	/* 2. L3 and L4 */
	pkt.l3off = cur.off;
	l3proto = proto;
	pkt.l3proto = l3proto;
	if (l3proto == bpf_htons(ETH_P_IP))
		proto = parse_ipv4(&cur, &pkt, &key);
	else if (l3proto == bpf_htons(ETH_P_IPV6))
		proto = parse_ipv6(&cur, &pkt, &key);
	else
		proto = parse_fail(&pkt, PYFLOW_R_NOT_IP);
	if (proto < 0)
		return pyflow_pass(is_tc, &pkt);
	pkt.l4off = cur.off;
	if (parse_l4(&cur, &pkt, &key, proto) < 0)
		return pyflow_pass(is_tc, &pkt);
	/* the kernel trims a PPPoE frame to the PPPoE length; an IP packet that
	 * does not fit in it is one the kernel would drop */
	if (pkt.pppoe && (pkt.l3len + 2 > pkt.pppoe_len ||
			  pkt.l3off - 2 + pkt.pppoe_len > pkt.frame_len)) {
		parse_fail(&pkt, PYFLOW_R_MALFORMED);
		return pyflow_pass(is_tc, &pkt);
	}

	/* 3. flow */
	flow = flows_lookup(&key);
	if (!flow) {
		pkt.reason = PYFLOW_R_MISS;
		return pyflow_pass(is_tc, &pkt);
	}
	act = &flow->action;

	/* 4. checks, in this order, each one leaving the packet untouched */
	if ((void *)((struct ethhdr *)data + 1) > cur.end || !mac_equal(data, act->in_mac)) {
		pkt.reason = PYFLOW_R_NOT_FOR_US;
		return pyflow_pass(is_tc, &pkt);
	}
	if (key.proto == IPPROTO_TCP &&
	    (act->closing || (pkt.tcp_flags & (PYFLOW_TCP_FIN | PYFLOW_TCP_RST)))) {
		/* The control plane tears the flow down at its next tick. Until then every
		 * packet of a closing flow goes to the kernel too, so that conntrack sees
		 * the whole close (the last ACK as well) and leaves its entry in the
		 * state the endpoints reached, as the kernel flowtable does on teardown. */
		flow->action.closing = 1;
		pkt.reason = PYFLOW_R_TCP_FIN_RST;
		return pyflow_pass(is_tc, &pkt);
	}
	if (pkt.ttl <= 1) {
		pkt.reason = PYFLOW_R_TTL_EXPIRED;
		return pyflow_pass(is_tc, &pkt);
	}
	if (ctx_gso_size(ctx, is_tc)) {
		/* a GSO super-packet leaves as segments of gso_size payload each */
		if (pkt.l4off - pkt.l3off + pkt.l4hlen + ctx_gso_size(ctx, is_tc) > act->mtu) {
			pkt.reason = PYFLOW_R_OVER_MTU;
			return pyflow_pass(is_tc, &pkt);
		}
	} else if (pkt.l3len > act->mtu) {
		pkt.reason = PYFLOW_R_OVER_MTU;
		return pyflow_pass(is_tc, &pkt);
	}
	via_ppp = ctx_via_ppp(ctx, is_tc, act);
	if (ctx_redirect(ctx, is_tc, act, via_ppp) < 0) {
		pkt.reason = PYFLOW_R_REDIRECT_FAILED;
		return pyflow_pass(is_tc, &pkt);
	}
	/* via the PPP device: the Ethernet header stays as it came (the device drops
	 * it) and an accelerated tag is cleared (the device would insert it) */
	out_l2 = via_ppp ? ETH_HLEN : l2_out_len(act, is_tc);
	rc = ctx_resize_l2(ctx, is_tc, &pkt, out_l2, &cov);
	if (rc == PYFLOW_RESIZE_REFUSED) {
		pkt.reason = PYFLOW_R_L2_REWRITE_FAILED;
		return pyflow_pass(is_tc, &pkt);
	}
	if (rc != PYFLOW_RESIZE_OK)
		goto broken;

	/* 5. rewrite; from here on the packet is changed and must leave by the
	 * fast path. The hook refuses nothing below on a packet the parser
	 * accepted; a failure here means a helper ran out of memory. */
	if (l3_rewrite(ctx, is_tc, &pkt, &key, out_l2, act, &acc) < 0)
		goto broken;
	if (!via_ppp && l2_write(ctx, is_tc, act, &pkt, l3proto, cov, &acc) < 0)
		goto broken;
	ctx_csum_update(ctx, is_tc, acc);
	if (is_tc && !via_ppp && tc_push_tags(ctx_skb(ctx), act) < 0)
		goto broken;

	__sync_fetch_and_add(&flow->counters.packets, ctx_gso_segs(ctx, is_tc));
	__sync_fetch_and_add(&flow->counters.bytes, pkt.l3len);
	stats_count(PYFLOW_R_FORWARDED, pkt.frame_len);
	return ctx_redirected(is_tc);

broken:
	/* Half rewritten: the kernel would forward a packet that differs from
	 * the one that arrived, so drop it, as the kernel drops on ENOMEM. */
	stats_count(PYFLOW_R_L2_REWRITE_FAILED, pkt.frame_len);
	return is_tc ? TC_ACT_SHOT : XDP_DROP;
}

PYFLOW_PROG("xdp")
int pyflow_xdp(struct xdp_md *ctx)
{
	return pyflow_process(ctx, 0);
}

PYFLOW_PROG("tc")
int pyflow_tc(struct __sk_buff *skb)
{
	return pyflow_process(skb, 1);
}

#ifdef PYFLOW_LIBBPF
/* the skb and redirect helpers are GPL-only; bcc supplies the license itself */
char _license[] SEC("license") = "GPL";
#endif
