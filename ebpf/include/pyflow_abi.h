/* SPDX-License-Identifier: GPL-2.0 */
/*
 * pyflow ABI: the one definition of every structure, enum, limit and map name
 * shared by the BPF datapath (ebpf/), the native helper (csrc/) and Python
 * (cffi reads this file through the preprocessor, see pyflow/_native_build.py).
 *
 * Rules that keep the three readers in agreement:
 *  - fixed-width types only, no bitfields, no implicit padding (every pad is a
 *    named field), so cffi, gcc and clang -target bpf lay the structs out alike;
 *  - byte order is part of the field's contract and is said in its comment;
 *  - tests/datapath/test_abi_layout.py compares sizeof/offsetof seen by cffi with
 *    the BTF the kernel holds for the loaded maps.
 */
#ifndef PYFLOW_ABI_H
#define PYFLOW_ABI_H

#ifndef PYFLOW_CDEF
#include <linux/types.h>
#endif

/* ---- limits: defaults, overridable at load time with -DNAME=value ---------- */
#ifndef PYFLOW_MAX_FLOWS
#define PYFLOW_MAX_FLOWS 262144 /* entries in the flow map (two per connection) */
#endif
#ifndef PYFLOW_MAX_TX_PORTS
#define PYFLOW_MAX_TX_PORTS 64 /* slots in the XDP redirect devmap */
#endif

/* ---- map names (also the file names of their pins under the bpffs dir) ----- */
#define PYFLOW_MAP_FLOWS "pyflow_flows"
#define PYFLOW_MAP_STATS "pyflow_stats"
#define PYFLOW_MAP_TX_PORTS "pyflow_txports"

/* ---- flow key ---------------------------------------------------------------
 * Built by the datapath from the packet as it arrives, so addresses and ports
 * are in network byte order exactly as on the wire. IPv4 addresses occupy
 * saddr[0]/daddr[0]; the other words are zero. VLAN ids and the PPPoE session
 * id are in host byte order; 0 means "not present" (VLAN id 0 priority tags and
 * PPPoE session 0 never reach a lookup: the datapath passes them to the kernel).
 *
 * The tag protocol is part of the match: vlan_outer holds the 12-bit VLAN id
 * and, for an 802.1ad (S-VLAN, TPID 0x88a8) outer tag, PYFLOW_KEY_VLAN_8021AD
 * on top, so 802.1ad id 7 and 802.1Q id 7 on one port are different keys
 * (whether the tag came in the frame or, on TC, as skb metadata). The inner
 * tag is always 802.1Q (an 802.1ad tag inside a tag goes to the kernel), so
 * vlan_inner is the bare id.
 */
#define PYFLOW_KEY_VLAN_8021AD 0x8000 /* in vlan_outer: the outer tag's TPID is 802.1ad */
#define PYFLOW_KEY_VLAN_VID 0x0fff    /* in vlan_outer / vlan_inner: the VLAN id */

struct pyflow_flow_key {
	__u32 ifindex;    /* ingress device */
	__u16 vlan_outer; /* VLAN id of the outer tag | PYFLOW_KEY_VLAN_8021AD if 802.1ad, 0 = none */
	__u16 vlan_inner; /* VLAN id of the inner 802.1Q tag, 0 = none */
	__u16 pppoe_sid;  /* PPPoE session id, 0 = no PPPoE */
	__u8 family;      /* PYFLOW_FAMILY_IPV4 or PYFLOW_FAMILY_IPV6 */
	__u8 proto;       /* IPPROTO_TCP (6) or IPPROTO_UDP (17) */
	__be16 sport;
	__be16 dport;
	__be32 saddr[4];
	__be32 daddr[4];
};

enum pyflow_family {
	PYFLOW_FAMILY_IPV4 = 2,  /* AF_INET */
	PYFLOW_FAMILY_IPV6 = 10, /* AF_INET6 */
};

/* ---- flow action ------------------------------------------------------------
 * What the fast path does to a packet that hit the key. NAT fields are applied
 * only when their flag is set; the control plane copies them from the conntrack
 * tuple pair, it never invents NAT.
 */
enum pyflow_action_flags {
	PYFLOW_ACT_SNAT = 1 << 0,       /* rewrite source address and port */
	PYFLOW_ACT_DNAT = 1 << 1,       /* rewrite destination address and port */
	PYFLOW_ACT_VLAN_OUTER = 1 << 2, /* egress carries encap.vlan_outer_* */
	PYFLOW_ACT_VLAN_INNER = 1 << 3, /* egress carries encap.vlan_inner_tci (802.1Q) */
	PYFLOW_ACT_PPPOE = 1 << 4,      /* egress is a PPPoE session encap.pppoe_sid */
};

/* Layer 2 encapsulation the egress needs, between the MACs and the IP header. */
struct pyflow_l2_encap {
	__be16 vlan_outer_tpid; /* ETH_P_8021Q or ETH_P_8021AD, network order */
	__u16 vlan_outer_tci;   /* priority and VLAN id, host order */
	__u16 vlan_inner_tci;   /* priority and VLAN id, host order, TPID 802.1Q */
	__u16 pppoe_sid;        /* PPPoE session id, host order */
};

struct pyflow_flow_action {
	__u32 out_ifindex; /* egress device: the TC build redirects here */
	__u32 tx_port;     /* slot of out_ifindex in PYFLOW_MAP_TX_PORTS: the XDP build redirects here */
	__u16 mtu;         /* egress L3 MTU: longer packets go to the kernel (fragment / too-big) */
	__u16 flags;       /* enum pyflow_action_flags */
	__be16 nat_sport;
	__be16 nat_dport;
	__be32 nat_saddr[4];
	__be32 nat_daddr[4];
	__u8 in_mac[6];  /* ingress device's address: frames sent to another MAC go to the kernel */
	__u8 dmac[6];    /* next hop's address */
	__u8 smac[6];    /* egress device's address */
	struct pyflow_l2_encap encap;
	/* The one action field the datapath writes: set to 1 on TCP FIN or RST; from
	 * then on the flow's packets go to the kernel until the flow is removed.
	 * Userspace writes 0 when it installs or rewrites the flow. */
	__u16 closing;
	/* With PYFLOW_ACT_PPPOE: the PPP device (pppoe-wan) of the session, 0 = none.
	 * The TC build hands a packet that cannot carry a PPPoE header pushed in BPF
	 * (a GSO super-packet: every segment needs its own PPPoE length) to this L3
	 * device instead; the kernel segments it and the PPPoE driver puts the
	 * session header on each segment. The XDP build never needs it. */
	__u32 ppp_ifindex;
};

/* Per-flow counters, written by the datapath. Userspace reads them in batches
 * for keep-alive and expiry; it writes them only when it installs a flow.
 * There is no per-flow clock: the keep-alive scan takes a flow whose packet
 * count moved since its previous read as seen at that read. That keeps the
 * value at 96 bytes, so a flow-map element (the hash map's 48-byte header, the
 * 48-byte key, the value) fills exactly three cache lines, and a hit stores
 * nothing but the two counters (docs/architecture.md, "A flow in three cache lines"). */
struct pyflow_flow_counters {
	__u64 packets;
	__u64 bytes; /* L3 bytes (IP header and payload) as received */
};

/* The value stored in PYFLOW_MAP_FLOWS: one lookup gives action and counters. */
struct pyflow_flow {
	struct pyflow_flow_action action;
	struct pyflow_flow_counters counters;
};

/* ---- datapath statistics ----------------------------------------------------
 * Every verdict is counted under a reason, per CPU, in PYFLOW_MAP_STATS (a
 * per-CPU array indexed by this enum). Everything but PYFLOW_R_FORWARDED is a
 * packet handed to the kernel path. The Python side names them for metrics by
 * stripping the PYFLOW_R_ prefix, so renaming one is an ABI change.
 */
enum pyflow_reason {
	PYFLOW_R_FORWARDED = 0,      /* redirected by the fast path */
	PYFLOW_R_NOT_IP,             /* not IPv4/IPv6: ARP, LLDP, PPPoE discovery or LCP ... */
	PYFLOW_R_L2_UNSUPPORTED,     /* more than two VLAN tags, VLAN id 0, PPPoE session 0 */
	PYFLOW_R_MALFORMED,          /* truncated header or inconsistent lengths/version */
	PYFLOW_R_IPV4_OPTIONS,       /* IPv4 header longer than 20 bytes */
	PYFLOW_R_IPV4_BAD_CHECKSUM,  /* the kernel drops these; so must we not forward them */
	PYFLOW_R_FRAGMENT,           /* IPv4 fragment (MF set or offset non-zero) */
	PYFLOW_R_IPV6_EXTENSION,     /* IPv6 next header is an extension header */
	PYFLOW_R_NOT_TCP_UDP,        /* other L4 protocol (ICMP, GRE, ESP ...) */
	PYFLOW_R_MISS,               /* no flow entry */
	PYFLOW_R_NOT_FOR_US,         /* destination MAC is not the ingress device's */
	PYFLOW_R_TCP_FIN_RST,        /* TCP FIN or RST, or any packet of a flow marked closing */
	PYFLOW_R_TTL_EXPIRED,        /* TTL / hop limit <= 1: the kernel sends time-exceeded */
	PYFLOW_R_OVER_MTU,           /* L3 length over egress MTU: the kernel fragments or sends too-big */
	PYFLOW_R_L2_REWRITE_FAILED,  /* the hook refused to grow/shrink the L2 header */
	PYFLOW_R_REDIRECT_FAILED,    /* egress not in the tx-port map or redirect refused */
	PYFLOW_R__COUNT
};

struct pyflow_stat {
	__u64 packets;
	__u64 bytes; /* bytes of the frame as received */
};

#endif /* PYFLOW_ABI_H */
