"""The kernel UAPI numbers pyflow's netlink code uses, written out.

Each group names the header it comes from. They are part of the kernel's stable
ABI, so they are spelled here rather than read from a library's tables (whose
positions can drift from the kernel's enums). tests/unit/test_netlink_wire.py
checks them against the installed kernel headers when a C compiler is present.
"""

from __future__ import annotations

# -- <asm-generic/socket.h> (Python's socket module has SO_RCVBUF but not this) --------
SO_RCVBUFFORCE = 33

# -- <linux/netlink.h> -------------------------------------------------------------------
NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_ROOT = 0x100  # modifiers of GET requests
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_EXCL = 0x200  # modifiers of NEW requests (same bits as ROOT/MATCH, other meaning)
NLM_F_CREATE = 0x400

NLMSG_NOOP = 0x1
NLMSG_ERROR = 0x2
NLMSG_DONE = 0x3
NLMSG_OVERRUN = 0x4

NLMSG_ALIGNTO = 4
NLMSG_HDRLEN = 16  # struct nlmsghdr
NLA_ALIGNTO = 4
NLA_HDRLEN = 4  # struct nlattr
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

# -- <linux/rtnetlink.h> -----------------------------------------------------------------
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_NEWQDISC = 36
RTM_DELQDISC = 37
RTM_GETQDISC = 38
RTM_NEWTFILTER = 44
RTM_DELTFILTER = 45
RTM_GETTFILTER = 46
RTM_NEWNETCONF = 80
RTM_DELNETCONF = 81
RTM_GETNETCONF = 82

# enum rtattr_type_t
RTA_DST = 1
RTA_SRC = 2
RTA_IIF = 3
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_METRICS = 8
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_MARK = 16
RTA_VIA = 18
RTA_ENCAP_TYPE = 21
RTA_ENCAP = 22
RTA_IP_PROTO = 27
RTA_SPORT = 28
RTA_DPORT = 29

RTAX_MTU = 2  # inside RTA_METRICS

# route types (rtm_type)
RTN_UNSPEC = 0
RTN_UNICAST = 1
RTN_LOCAL = 2
RTN_BROADCAST = 3
RTN_ANYCAST = 4
RTN_MULTICAST = 5
RTN_BLACKHOLE = 6
RTN_UNREACHABLE = 7
RTN_PROHIBIT = 8
RTN_THROW = 9
RTN_NAT = 10
RTN_XRESOLVE = 11

# enum rtnetlink_groups; bind() takes group n as bit n-1
RTNLGRP_LINK = 1
RTNLGRP_NEIGH = 3
RTNLGRP_TC = 4
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_IPV6_RULE = 19
RTNLGRP_IPV4_NETCONF = 24
RTNLGRP_IPV6_NETCONF = 25

RTEXT_FILTER_BRVLAN = 1 << 1  # IFLA_EXT_MASK: list each bridge VLAN

# -- <linux/neighbour.h> -----------------------------------------------------------------
NDA_DST = 1
NDA_LLADDR = 2
NDA_CACHEINFO = 3  # struct nda_cacheinfo: ages in clock_t (a bridge FDB entry's 'updated')
NDA_VLAN = 5  # a bridge FDB entry's VLAN id (u16)
NDA_MASTER = 9  # the bridge whose FDB holds the entry (u32)

NUD_INCOMPLETE = 0x01
NUD_REACHABLE = 0x02
NUD_STALE = 0x04
NUD_DELAY = 0x08
NUD_PROBE = 0x10
NUD_FAILED = 0x20
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NUD_NONE = 0x00

NTF_USE = 0x01
NTF_SELF = 0x02
NTF_MASTER = 0x04
NTF_EXT_LEARNED = 0x10  # a bridge FDB entry a switch learned (it ages there, not in the bridge)

# -- <linux/if_link.h> -------------------------------------------------------------------
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_LINK_NETNSID = 37
IFLA_PROTINFO = 12  # AF_BRIDGE: the port's IFLA_BRPORT_* attributes
IFLA_AF_SPEC = 26  # AF_BRIDGE: the VLAN list (IFLA_BRIDGE_VLAN_INFO)
IFLA_EXT_MASK = 29  # a dump request's RTEXT_FILTER_* bits
IFLA_INFO_KIND = 1  # inside IFLA_LINKINFO
IFLA_INFO_DATA = 2
IFLA_BR_AGEING_TIME = 4  # inside IFLA_INFO_DATA of a bridge: u32, clock_t
IFLA_BR_VLAN_FILTERING = 7  # inside IFLA_INFO_DATA of a bridge
IFLA_BR_VLAN_PROTOCOL = 8
IFLA_BRPORT_STATE = 1  # inside IFLA_PROTINFO
# XDP attach flags (IFLA_XDP_FLAGS)
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_REPLACE = 1 << 4

# -- <linux/if_bridge.h> -----------------------------------------------------------------
BR_STATE_FORWARDING = 3
IFLA_BRIDGE_VLAN_INFO = 2  # inside IFLA_AF_SPEC: struct bridge_vlan_info {u16 flags; u16 vid}
BRIDGE_VLAN_INFO_PVID = 1 << 1
BRIDGE_VLAN_INFO_UNTAGGED = 1 << 2
BRIDGE_VLAN_INFO_RANGE_BEGIN = 1 << 3
BRIDGE_VLAN_INFO_RANGE_END = 1 << 4

# -- <linux/if.h> (enum net_device_flags) ------------------------------------------------
IFF_UP = 0x1
IFF_RUNNING = 0x40

# -- <linux/if_arp.h> --------------------------------------------------------------------
ARPHRD_ETHER = 1
ARPHRD_PPP = 512

# -- <linux/if_ether.h> ------------------------------------------------------------------
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
ETH_P_ALL = 0x0003

# -- <linux/rtnetlink.h>: enum TCA_* (struct tcmsg's attributes) ------------------------
TCA_KIND = 1
TCA_OPTIONS = 2

# -- <linux/pkt_sched.h> -----------------------------------------------------------------
TC_H_ROOT = 0xFFFFFFFF
TC_H_INGRESS = 0xFFFFFFF1
TC_H_CLSACT = 0xFFFFFFF1  # == TC_H_INGRESS: the parent clsact/ingress hang from
TC_H_MIN_INGRESS = 0xFFF2
TC_H_MIN_EGRESS = 0xFFF3
# qdisc options that carry a rate (bytes per second)
TCA_TBF_PARMS = 1  # struct tc_tbf_qopt: its first member is struct tc_ratespec rate
TCA_TBF_RATE64 = 4
TCA_CAKE_BASE_RATE64 = 2

# -- <linux/pkt_cls.h> -------------------------------------------------------------------
TCA_BPF_ID = 11
# the action list of each classifier that can carry one
TCA_BPF_ACT = 1
TCA_U32_ACT = 7
TCA_FW_ACT = 4
TCA_BASIC_ACT = 3
TCA_FLOWER_ACT = 3
TCA_MATCHALL_ACT = 2
# inside each action of a list
TCA_ACT_KIND = 1
TCA_ACT_OPTIONS = 2

# -- <linux/tc_act/tc_mirred.h> ----------------------------------------------------------
TCA_MIRRED_PARMS = 2  # struct tc_mirred: tc_gen (5 x 32 bits), eaction, ifindex
TCA_EGRESS_REDIR = 1
TCA_EGRESS_MIRROR = 2
TCA_INGRESS_REDIR = 3
TCA_INGRESS_MIRROR = 4

# -- <linux/ethtool_netlink.h> -----------------------------------------------------------
ETHTOOL_MSG_FEATURES_GET = 11

# -- <linux/netconf.h> -------------------------------------------------------------------
NETCONFA_IFINDEX = 1
NETCONFA_FORWARDING = 2
NETCONFA_IFINDEX_ALL = -1

# -- <linux/netfilter/nfnetlink.h> -------------------------------------------------------
NFNETLINK_V0 = 0
NFNL_SUBSYS_CTNETLINK = 1
# enum nfnetlink_groups
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3

# -- <linux/netfilter/nfnetlink_conntrack.h> ---------------------------------------------
# enum cntl_msg_types (the low byte of nlmsg_type; the subsystem is the high byte)
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2

# enum ctattr_type
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_HELP = 5
CTA_NAT_SRC = 6
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_ID = 12
CTA_NAT_DST = 13
CTA_ZONE = 18
CTA_MARK_MASK = 21

# enum ctattr_tuple
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3

# enum ctattr_ip
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4

# enum ctattr_l4proto
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3

# enum ctattr_protoinfo / ctattr_protoinfo_tcp
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL = 2
CTA_PROTOINFO_TCP_WSCALE_REPLY = 3
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY = 5

# enum ctattr_help
CTA_HELP_NAME = 1

# -- <linux/netfilter/nf_conntrack_tcp.h> ------------------------------------------------
IP_CT_TCP_FLAG_BE_LIBERAL = 0x08
