// SPDX-License-Identifier: GPL-2.0
/*
 * Flow-map entries of many connections in one call: the bulk install's packing.
 *
 * A connection's two entries (original direction, reply direction) are a function of
 * its tuples and of its path (pyflow/control/model.py: entry_fields). Everything that
 * comes from the path (devices, VLAN/PPPoE layers, MACs, MTU, the flags those set) is
 * the same for every connection on it: the caller packs it once per path with the
 * Python packer, as templates, and this writes what comes from the connection into
 * copies of them: family, protocol, ports and addresses of the keys; the NAT addresses,
 * ports and flags of the actions.
 *
 * Original direction: key o.src:o.sport -> o.dst:o.dport, NAT source r.dst:r.dport
 * (SNAT when it differs from the key's source), NAT destination r.src:r.sport (DNAT
 * when it differs from the key's destination). Reply direction: key r.src:r.sport ->
 * r.dst:r.dport, NAT source o.dst:o.dport, NAT destination o.src:o.sport. A NAT
 * field without its flag holds the key's own value, which is the same value: the
 * fields are written whether or not the flag is set. "Differs" compares the address
 * text, as the Python packer compares the strings.
 */
#include "pyflow_abi.h"
#include "pyflow_native.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

/* An address as the key holds it: (family, 16 bytes, IPv4 zero-padded), as abi._addr_words:
 * text without ':' is tried as IPv4 first, anything else as IPv6. */
static int parse_addr(const char *text, uint8_t out[16])
{
	if (!strchr(text, ':')) {
		memset(out, 0, 16);
		if (inet_pton(AF_INET, text, out) == 1)
			return PYFLOW_FAMILY_IPV4;
	}
	if (inet_pton(AF_INET6, text, out) == 1)
		return PYFLOW_FAMILY_IPV6;
	return -1;
}

/*
 * One direction's entry, from its path's template: the key src:sport -> dst:dport and
 * the NAT source nsrc:nsport and destination ndst:ndport, where src, dst, nsrc and ndst
 * index the connection's four addresses and ports (o.src, o.dst, r.src, r.dst); flags
 * are the NAT flags this direction sets.
 */
static void fill_entry(struct pyflow_flow_key *k, struct pyflow_flow *v, const struct pyflow_flow_key *tk,
		       const struct pyflow_flow *tv, int family, uint8_t proto, const uint16_t *pt,
		       uint8_t raw[4][16], int src, int dst, int nsrc, int ndst, uint16_t flags)
{
	memcpy(k, tk, sizeof(*k));
	memcpy(v, tv, sizeof(*v));
	k->family = (uint8_t)family;
	k->proto = proto;
	k->sport = htons(pt[src]);
	k->dport = htons(pt[dst]);
	memcpy(k->saddr, raw[src], 16);
	memcpy(k->daddr, raw[dst], 16);
	v->action.flags |= flags;
	v->action.nat_sport = htons(pt[nsrc]);
	v->action.nat_dport = htons(pt[ndst]);
	memcpy(v->action.nat_saddr, raw[nsrc], 16);
	memcpy(v->action.nat_daddr, raw[ndst], 16);
}

int pyflow_pack_entries(const void *tmpl_keys, const void *tmpl_values, uint32_t npaths,
			const uint32_t *path_index, const uint8_t *protos, const uint16_t *ports,
			const char *addrs, uint32_t addrs_len, uint32_t n, void *keys_out, void *values_out)
{
	const struct pyflow_flow_key *tk = tmpl_keys;
	const struct pyflow_flow *tv = tmpl_values;
	struct pyflow_flow_key *ko = keys_out;
	struct pyflow_flow *vo = values_out;
	const char *pos = addrs, *end = addrs + addrs_len;
	uint32_t i;

	for (i = 0; i < n; i++) {
		/* o.src, o.dst, r.src, r.dst: text, each ended by a NUL */
		const char *text[4];
		uint8_t raw[4][16];
		int fam[4], j;
		uint32_t p = path_index[i];
		const uint16_t *pt = ports + 4 * (size_t)i; /* o.sport, o.dport, r.sport, r.dport */
		uint8_t snat, dnat;

		if (p >= npaths)
			return -EINVAL;
		for (j = 0; j < 4; j++) {
			const char *nul;

			if (pos >= end)
				return -EINVAL;
			nul = memchr(pos, 0, (size_t)(end - pos));
			if (!nul)
				return -EINVAL;
			text[j] = pos;
			fam[j] = parse_addr(pos, raw[j]);
			if (fam[j] < 0)
				return -EINVAL;
			pos = nul + 1;
		}
		if (fam[0] != fam[1] || fam[2] != fam[3])
			return -EINVAL;
		snat = strcmp(text[0], text[3]) || pt[0] != pt[3];
		dnat = strcmp(text[1], text[2]) || pt[1] != pt[2];

		fill_entry(&ko[2 * (size_t)i], &vo[2 * (size_t)i], &tk[2 * (size_t)p], &tv[2 * (size_t)p],
			   fam[0], protos[i], pt, raw, 0, 1, 3, 2,
			   (snat ? PYFLOW_ACT_SNAT : 0) | (dnat ? PYFLOW_ACT_DNAT : 0));
		fill_entry(&ko[2 * (size_t)i + 1], &vo[2 * (size_t)i + 1], &tk[2 * (size_t)p + 1],
			   &tv[2 * (size_t)p + 1], fam[2], protos[i], pt, raw, 2, 3, 1, 0,
			   (dnat ? PYFLOW_ACT_SNAT : 0) | (snat ? PYFLOW_ACT_DNAT : 0));
	}
	return pos == end ? 0 : -EINVAL;
}
