// SPDX-License-Identifier: GPL-2.0
/*
 * Conntrack feed: ctnetlink receive buffers decoded into arrays, and batched changes.
 *
 * Decoding a ctnetlink entry in Python costs about 25 us (ten attribute walks, each a
 * dict of spans); a router with 10^5 connections receives that many events and dumps
 * that many entries. Here one call receives every datagram queued on the socket (up to
 * a bound), walks each with libmnl and writes one struct pyflow_ct_entry per entry, so
 * Python only turns the array into its objects.
 *
 * The decoder means what the Python one in pyflow/control/conntrack.py (_parse) means,
 * which itself follows the kernel: of an attribute given twice the last one wins
 * (nla_parse fills tb[type] as it walks), a walk stops at the first attribute that is
 * too short or runs past its container and keeps what came before, an integer is read
 * only from a payload long enough for it. A message is an entry when it is IPv4/IPv6,
 * has both tuples, each with addresses of the family's length, a TCP or UDP protocol
 * number and both ports, and both tuples name the same protocol; anything else is
 * counted (ignored: another family or protocol, another message type; malformed: a
 * tuple missing or broken, a message header past the end of the datagram) and skipped.
 *
 * Changes (mark, be-liberal, timeout) go out many messages to one sendmsg(); the kernel
 * handles the messages of a datagram one by one inside that call and queues an ACK or
 * an error for each, which are matched to the messages by sequence number.
 */
#include "pyflow_native.h"

#include <arpa/inet.h>
#include <errno.h>
#include <libmnl/libmnl.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define TB_MAX 32 /* attribute types this decoder reads are all below this */

/* mnl_nlmsg_ok() compares (int)nlmsg_len with the bytes left, so a length over 2^31
 * (a corrupt header) reads as negative and passes: check it unsigned as well. */
static int msg_ok(const struct nlmsghdr *nlh, int left)
{
	return mnl_nlmsg_ok(nlh, left) && nlh->nlmsg_len <= (uint32_t)left;
}

struct span {
	const struct nlattr *a; /* last attribute of the type, NULL when absent */
};

/* Last attribute of each type in [start, end): the walk of wire.attrs(). */
static void walk(const void *start, const void *end, struct span tb[TB_MAX])
{
	const struct nlattr *a = start;

	memset(tb, 0, sizeof(struct span) * TB_MAX);
	while (mnl_attr_ok(a, (int)((const char *)end - (const char *)a))) {
		uint16_t type = mnl_attr_get_type(a); /* flag bits masked off */

		if (type < TB_MAX)
			tb[type].a = a;
		a = mnl_attr_next(a);
	}
}

static void walk_nested(const struct nlattr *nest, struct span tb[TB_MAX])
{
	const char *p = mnl_attr_get_payload(nest);

	walk(p, p + mnl_attr_get_payload_len(nest), tb);
}

static int get_be16(const struct nlattr *a, uint16_t *v)
{
	uint16_t x;

	if (!a || mnl_attr_get_payload_len(a) < 2)
		return 0;
	memcpy(&x, mnl_attr_get_payload(a), 2);
	*v = ntohs(x);
	return 1;
}

static int get_be32(const struct nlattr *a, uint32_t *v)
{
	uint32_t x;

	if (!a || mnl_attr_get_payload_len(a) < 4)
		return 0;
	memcpy(&x, mnl_attr_get_payload(a), 4);
	*v = ntohl(x);
	return 1;
}

static int get_u8(const struct nlattr *a, uint8_t *v)
{
	if (!a || mnl_attr_get_payload_len(a) < 1)
		return 0;
	*v = *(const uint8_t *)mnl_attr_get_payload(a);
	return 1;
}

/* One tuple: 0 when broken, or the protocol number when it is not TCP/UDP (*other = 1). */
static int tuple_of(const struct nlattr *nest, uint8_t family, uint8_t *src, uint8_t *dst,
		    uint16_t *sport, uint16_t *dport, uint8_t *proto, int *other)
{
	struct span t[TB_MAX], ip[TB_MAX], pr[TB_MAX];
	const struct nlattr *s, *d;
	uint16_t alen = family == AF_INET ? 4 : 16;

	if (!nest)
		return 0;
	walk_nested(nest, t);
	if (!t[CTA_TUPLE_IP].a || !t[CTA_TUPLE_PROTO].a)
		return 0;
	walk_nested(t[CTA_TUPLE_PROTO].a, pr);
	if (!get_u8(pr[CTA_PROTO_NUM].a, proto))
		return 0;
	if (*proto != IPPROTO_TCP && *proto != IPPROTO_UDP) {
		*other = 1;
		return 0;
	}
	walk_nested(t[CTA_TUPLE_IP].a, ip);
	s = ip[family == AF_INET ? CTA_IP_V4_SRC : CTA_IP_V6_SRC].a;
	d = ip[family == AF_INET ? CTA_IP_V4_DST : CTA_IP_V6_DST].a;
	if (!get_be16(pr[CTA_PROTO_SRC_PORT].a, sport) || !get_be16(pr[CTA_PROTO_DST_PORT].a, dport) ||
	    !s || !d || mnl_attr_get_payload_len(s) != alen || mnl_attr_get_payload_len(d) != alen)
		return 0;
	memset(src, 0, 16);
	memset(dst, 0, 16);
	memcpy(src, mnl_attr_get_payload(s), alen);
	memcpy(dst, mnl_attr_get_payload(d), alen);
	return 1;
}

/* 1: *e holds the entry; 0: skipped, counted in res. */
static int entry_of(const struct nlmsghdr *nlh, struct pyflow_ct_entry *e, struct pyflow_ct_result *res)
{
	const char *end = (const char *)nlh + nlh->nlmsg_len;
	const struct nfgenmsg *nfg;
	struct span top[TB_MAX], orig[TB_MAX], sub[TB_MAX];
	uint8_t oproto = 0, rproto = 0;
	int other = 0;

	if (nlh->nlmsg_len < NLMSG_HDRLEN + sizeof(*nfg)) {
		res->malformed++;
		return 0;
	}
	nfg = mnl_nlmsg_get_payload(nlh);
	if (nfg->nfgen_family != AF_INET && nfg->nfgen_family != AF_INET6) {
		res->ignored++;
		return 0;
	}
	memset(e, 0, sizeof(*e));
	e->family = nfg->nfgen_family;
	walk((const char *)nfg + sizeof(*nfg), end, top);
	if (!tuple_of(top[CTA_TUPLE_ORIG].a, e->family, e->orig_src, e->orig_dst, &e->orig_sport,
		      &e->orig_dport, &oproto, &other) ||
	    !tuple_of(top[CTA_TUPLE_REPLY].a, e->family, e->reply_src, e->reply_dst, &e->reply_sport,
		      &e->reply_dport, &rproto, &other) ||
	    oproto != rproto) {
		if (other)
			res->ignored++;
		else
			res->malformed++;
		return 0;
	}
	e->proto = oproto;
	/* CTA_ZONE covers both directions; a zone of the original direction only sits in
	 * that tuple. Either is the zone a lookup by the original tuple needs. */
	if (!get_be16(top[CTA_ZONE].a, &e->zone)) {
		walk_nested(top[CTA_TUPLE_ORIG].a, orig);
		get_be16(orig[CTA_TUPLE_ZONE].a, &e->zone);
	}
	get_be32(top[CTA_STATUS].a, &e->status);
	get_be32(top[CTA_MARK].a, &e->mark);
	if (get_be32(top[CTA_TIMEOUT].a, &e->timeout))
		e->has |= PYFLOW_CT_HAS_TIMEOUT;
	if (get_be32(top[CTA_ID].a, &e->id))
		e->has |= PYFLOW_CT_HAS_ID;
	if (top[CTA_PROTOINFO].a) {
		walk_nested(top[CTA_PROTOINFO].a, sub);
		if (sub[CTA_PROTOINFO_TCP].a) {
			const struct nlattr *tcp = sub[CTA_PROTOINFO_TCP].a;

			walk_nested(tcp, sub);
			if (get_u8(sub[CTA_PROTOINFO_TCP_STATE].a, &e->tcp_state))
				e->has |= PYFLOW_CT_HAS_TCP_STATE;
		}
	}
	if (top[CTA_HELP].a) {
		walk_nested(top[CTA_HELP].a, sub);
		if (sub[CTA_HELP_NAME].a) {
			const char *name = mnl_attr_get_payload(sub[CTA_HELP_NAME].a);
			uint16_t len = mnl_attr_get_payload_len(sub[CTA_HELP_NAME].a);
			const char *nul = memchr(name, '\0', len);

			if (nul)
				len = (uint16_t)(nul - name);
			/* the kernel's names are at most 15 characters (NF_CT_HELPER_NAME_LEN) */
			if (len >= sizeof(e->helper))
				len = sizeof(e->helper) - 1;
			memcpy(e->helper, name, len);
			e->helper_len = (uint8_t)len;
		}
	}
	return 1;
}

int pyflow_ct_decode(const void *buf, uint32_t len, uint32_t mode, uint32_t seq, uint32_t skip_portid,
		     struct pyflow_ct_entry *out, uint32_t cap, struct pyflow_ct_result *res)
{
	const struct nlmsghdr *nlh = buf;
	int left = (int)len;

	if (len > INT32_MAX)
		return -EINVAL;
	for (; msg_ok(nlh, left); nlh = mnl_nlmsg_next(nlh, &left)) {
		uint16_t type = nlh->nlmsg_type;
		uint8_t kind;

		res->messages++;
		if (mode == PYFLOW_CT_DUMP) {
			if (nlh->nlmsg_seq != seq)
				continue; /* a late answer to an earlier request that timed out */
			if (type == NLMSG_DONE) {
				res->done = 1;
				return 0;
			}
			if (type == NLMSG_ERROR) {
				const struct nlmsgerr *err = mnl_nlmsg_get_payload(nlh);

				if (nlh->nlmsg_len < NLMSG_HDRLEN + sizeof(err->error)) {
					res->err = EBADMSG;
					return 0;
				}
				if (err->error) {
					res->err = -err->error;
					return 0;
				}
				continue;
			}
			if (type != ((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW)) {
				res->ignored++;
				continue;
			}
			kind = PYFLOW_CT_DUMPED;
		} else {
			if (nlh->nlmsg_pid == skip_portid && skip_portid != 0) {
				res->echoes++; /* the echo of a change this process made */
				continue;
			}
			if (type == ((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE)) {
				kind = PYFLOW_CT_DESTROY;
			} else if (type == ((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW)) {
				/* the first event of an entry is flagged CREATE|EXCL, later ones neither */
				uint16_t f = nlh->nlmsg_flags & (NLM_F_CREATE | NLM_F_EXCL);

				kind = f == (NLM_F_CREATE | NLM_F_EXCL) ? PYFLOW_CT_NEW : PYFLOW_CT_UPDATE;
			} else {
				res->ignored++;
				continue;
			}
		}
		if (res->n >= cap)
			return -ENOSPC;
		if (entry_of(nlh, &out[res->n], res)) {
			out[res->n].event = kind;
			res->n++;
		}
	}
	if (left > 0)
		res->malformed++; /* a header claiming less than itself or more than is left */
	return 0;
}

int pyflow_ct_recv(int fd, void *buf, uint32_t bufsize, uint32_t max_datagrams, uint32_t mode, uint32_t seq,
		   uint32_t skip_portid, struct pyflow_ct_entry *out, uint32_t cap, struct pyflow_ct_result *res)
{
	/* room for every entry a whole datagram could hold before each receive: once a
	 * datagram is read it cannot be put back */
	uint32_t need = bufsize / PYFLOW_CT_MIN_ENTRY + 1;

	while (res->datagrams < max_datagrams && !res->done && !res->err) {
		ssize_t n;
		int ret;

		if (cap - res->n < need || res->n > cap) {
			res->more = 1;
			return 0;
		}
		n = recv(fd, buf, bufsize, MSG_DONTWAIT | MSG_TRUNC);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			res->err = errno; /* ENOBUFS: the socket overran, events were lost */
			return -errno;
		}
		res->datagrams++;
		if ((size_t)n > bufsize) {
			res->err = EMSGSIZE; /* truncated: the buffer is smaller than a datagram */
			return -EMSGSIZE;
		}
		ret = pyflow_ct_decode(buf, (uint32_t)n, mode, seq, skip_portid, out, cap, res);
		if (ret < 0)
			return ret;
	}
	if (res->datagrams >= max_datagrams)
		res->more = 1;
	return 0;
}

int pyflow_ct_drain(int fd, void *buf, uint32_t bufsize, uint32_t max_datagrams, uint64_t *messages,
		    uint32_t *overruns)
{
	uint32_t i;

	for (i = 0; i < max_datagrams; i++) {
		const struct nlmsghdr *nlh = buf;
		ssize_t n = recv(fd, buf, bufsize, MSG_DONTWAIT | MSG_TRUNC);
		int left;

		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return 0;
			if (errno == ENOBUFS) {
				(*overruns)++;
				continue;
			}
			return -errno;
		}
		left = n > (ssize_t)bufsize ? (int)bufsize : (int)n;
		for (; msg_ok(nlh, left); nlh = mnl_nlmsg_next(nlh, &left))
			(*messages)++;
	}
	return -EAGAIN; /* still not empty after max_datagrams */
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int pyflow_nl_batch(int fd, const void *msgs, uint32_t len, uint32_t first_seq, uint32_t n, void *buf,
		    uint32_t bufsize, int32_t timeout_ms, int32_t *errs, struct pyflow_nl_batch_result *res)
{
	struct iovec iov = {.iov_base = (void *)msgs, .iov_len = len};
	struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
	struct msghdr mh = {.msg_name = &kernel, .msg_namelen = sizeof(kernel), .msg_iov = &iov, .msg_iovlen = 1};
	int64_t deadline;
	uint32_t i;

	memset(res, 0, sizeof(*res));
	for (i = 0; i < n; i++)
		errs[i] = PYFLOW_NL_NO_ANSWER;
	if (n == 0)
		return 0;
	while (sendmsg(fd, &mh, 0) < 0) {
		if (errno != EINTR)
			return -errno;
	}
	res->sent = 1;
	deadline = now_ms() + timeout_ms;
	while (res->answered < n) {
		const struct nlmsghdr *nlh = buf;
		ssize_t got = recv(fd, buf, bufsize, MSG_DONTWAIT | MSG_TRUNC);
		int left;

		if (got < 0) {
			struct pollfd p = {.fd = fd, .events = POLLIN};
			int64_t wait;

			if (errno == EINTR)
				continue;
			if (errno == ENOBUFS) {
				/* answers were dropped: those never coming are left NO_ANSWER */
				res->overrun = 1;
				continue;
			}
			if (errno != EAGAIN && errno != EWOULDBLOCK)
				return -errno;
			if (res->overrun)
				return 0; /* what was queued is read; the rest was lost */
			wait = deadline - now_ms();
			if (wait <= 0)
				return -ETIMEDOUT;
			poll(&p, 1, (int)wait);
			continue;
		}
		res->datagrams++;
		left = got > (ssize_t)bufsize ? (int)bufsize : (int)got;
		for (; msg_ok(nlh, left); nlh = mnl_nlmsg_next(nlh, &left)) {
			const struct nlmsgerr *err = mnl_nlmsg_get_payload(nlh);
			uint32_t idx = nlh->nlmsg_seq - first_seq; /* wraps: seq numbers are modulo 2^32 */

			if (nlh->nlmsg_type != NLMSG_ERROR || idx >= n)
				continue; /* a GET's answer before its ACK, or a stale answer */
			if (errs[idx] != PYFLOW_NL_NO_ANSWER)
				continue;
			errs[idx] = nlh->nlmsg_len < NLMSG_HDRLEN + sizeof(err->error) ? EBADMSG : -err->error;
			res->answered++;
		}
	}
	return 0;
}
