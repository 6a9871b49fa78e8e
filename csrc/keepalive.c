// SPDX-License-Identifier: GPL-2.0
/*
 * Keep-alive scan: the per-connection half of the control plane's tick, in C.
 *
 * Every keep-alive period the engine reads the flow map's counters (one batched
 * walk, pyflow_ft_read_counters) and must decide, for every offloaded connection,
 * whether both its entries are still there, whether the datapath saw FIN/RST,
 * whether it has been idle too long, or whether conntrack's timeout runs low.
 * Conntrack never sees the packets the fast path carries, so while a connection is
 * offloaded its entry holds a long timeout (a day by default, written with the
 * offload mark) and idleness is judged here from the datapath's packet counts, as
 * the kernel's own flowtable judges it from its own last-seen times. The datapath
 * keeps no per-flow clock (a flow-map element stays within three cache lines):
 * a connection whose count moved since the previous read is taken as seen at this
 * read, so idle time is accurate to the interval between reads. Packets that
 * moved only update the slot: nothing goes to Python or to conntrack for them, so
 * a tick costs Python work in proportion to what changed, not to what moved. The
 * dump is indexed once (open addressing) and each connection's two keys are looked
 * up in it.
 *
 * The engine keeps, per connection, a slot: its two keys (original direction,
 * reply direction) in `conn_keys`, and what it recorded at the last tick in
 * `conns`. The decisions are the engine's, in the engine's order:
 *   an entry missing -> MISSING; else FIN/RST seen -> CLOSING; else (count updated
 *   and last-seen set to now when the packets of both directions moved) idle longer
 *   than idle_ns -> IDLE; else conntrack's timeout has less than extend_ns left
 *   -> EXTEND.
 * At most max_extend EXTEND verdicts are handed out (the others are counted in
 * *extend_over and come back at the next scan): connections offloaded together run
 * low together, and a table of a million would otherwise hand Python a million
 * verdicts of which it acts on max_extend.
 */
#include "pyflow_abi.h"
#include "pyflow_native.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static uint64_t hash_key(const unsigned char *k, uint32_t size)
{
	uint64_t h = 0x9E3779B97F4A7C15ull ^ size, w;
	uint32_t i = 0;

	for (; i + 8 <= size; i += 8) {
		memcpy(&w, k + i, 8); /* keys are only 4-byte aligned */
		h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
		h ^= h >> 31;
	}
	for (; i < size; i++)
		h = (h ^ k[i]) * 0x94D049BB133111EBull;
	return h ^ (h >> 29);
}

struct pyflow_ka_index {
	int32_t *slots; /* dump position, -1 = empty */
	uint64_t mask;
	const unsigned char *keys;
	uint32_t key_size;
};

static int32_t index_find(const struct pyflow_ka_index *ix, const unsigned char *key)
{
	uint64_t pos = hash_key(key, ix->key_size) & ix->mask;
	int32_t at;

	while ((at = ix->slots[pos]) >= 0) {
		if (!memcmp(ix->keys + (size_t)at * ix->key_size, key, ix->key_size))
			return at;
		pos = (pos + 1) & ix->mask;
	}
	return -1;
}

struct pyflow_ka_index *pyflow_ka_index_new(const void *dump_keys, uint32_t ndump, uint32_t key_size)
{
	struct pyflow_ka_index *ix;
	uint64_t size = 16;
	uint32_t i;

	if (!key_size || key_size > PYFLOW_FT_KEY_MAX)
		return NULL;
	ix = malloc(sizeof(*ix));
	if (!ix)
		return NULL;
	while (size < 2ull * ndump)
		size <<= 1;
	ix->slots = malloc(size * sizeof(*ix->slots));
	if (!ix->slots) {
		free(ix);
		return NULL;
	}
	memset(ix->slots, 0xff, size * sizeof(*ix->slots));
	ix->mask = size - 1;
	ix->keys = dump_keys;
	ix->key_size = key_size;
	for (i = 0; i < ndump; i++) {
		const unsigned char *key = ix->keys + (size_t)i * key_size;
		uint64_t pos = hash_key(key, key_size) & ix->mask;
		int32_t at;

		/* a key seen twice (the walk is not a snapshot): the later one wins, as in a dict */
		while ((at = ix->slots[pos]) >= 0 && memcmp(ix->keys + (size_t)at * key_size, key, key_size))
			pos = (pos + 1) & ix->mask;
		ix->slots[pos] = (int32_t)i;
	}
	return ix;
}

void pyflow_ka_index_free(struct pyflow_ka_index *ix)
{
	if (ix) {
		free(ix->slots);
		free(ix);
	}
}

int pyflow_ka_scan_range(const struct pyflow_ka_index *ix, const void *conn_keys, struct pyflow_ka_conn *conns,
			 uint32_t lo, uint32_t hi, const void *dump_counters, int64_t now_ns, int64_t idle_ns,
			 int64_t extend_ns, uint32_t *out_index, uint8_t *out_what, uint32_t *nout,
			 uint32_t max_extend, uint32_t *extend_over)
{
	const struct pyflow_ft_counters *cnt = dump_counters;
	const unsigned char *ck = conn_keys;
	uint32_t key_size = ix->key_size, i, found = 0, extends = 0;

	*nout = 0;
	*extend_over = 0;
	for (i = lo; i < hi; i++) {
		struct pyflow_ka_conn *c = &conns[i];
		int32_t o, r;
		uint64_t packets;
		uint8_t what = 0;

		if (!c->used)
			continue;
		o = index_find(ix, ck + (size_t)2 * i * key_size);
		r = index_find(ix, ck + ((size_t)2 * i + 1) * key_size);
		if (o < 0 || r < 0) {
			what = PYFLOW_KA_MISSING;
		} else if (cnt[o].closing || cnt[r].closing) {
			what = PYFLOW_KA_CLOSING;
		} else {
			packets = cnt[o].packets + cnt[r].packets;
			if (packets != c->packets) {
				c->packets = packets;
				c->last_seen_ns = now_ns;
			}
			if (now_ns - c->last_seen_ns > idle_ns)
				what = PYFLOW_KA_IDLE;
			else if (c->ct_deadline_ns - now_ns < extend_ns)
				what = PYFLOW_KA_EXTEND;
		}
		if (what == PYFLOW_KA_EXTEND && extends++ >= max_extend) {
			(*extend_over)++;
			continue;
		}
		if (what) {
			out_index[found] = i;
			out_what[found] = what;
			found++;
		}
	}
	*nout = found;
	return 0;
}

int pyflow_ka_unowned(const struct pyflow_ka_index *ix, uint32_t ndump, const void *conn_keys,
		      const struct pyflow_ka_conn *conns, uint32_t n, uint32_t *out, uint32_t *nout)
{
	const unsigned char *ck = conn_keys;
	uint32_t key_size = ix->key_size, i, found = 0;
	uint8_t *owned;

	*nout = 0;
	owned = calloc(ndump ? ndump : 1, 1); /* by dump position: the index's answer for a key */
	if (!owned)
		return -ENOMEM;
	for (i = 0; i < n; i++) {
		int32_t at;

		if (!conns[i].used)
			continue;
		if ((at = index_find(ix, ck + (size_t)2 * i * key_size)) >= 0)
			owned[at] = 1;
		if ((at = index_find(ix, ck + ((size_t)2 * i + 1) * key_size)) >= 0)
			owned[at] = 1;
	}
	for (i = 0; i < ndump; i++) {
		/* a repeated key: the index answers with one of its positions, asked for either */
		int32_t at = index_find(ix, ix->keys + (size_t)i * key_size);

		if (at < 0 || !owned[at])
			out[found++] = i;
	}
	free(owned);
	*nout = found;
	return 0;
}

int pyflow_ka_scan(const void *conn_keys, struct pyflow_ka_conn *conns, uint32_t n, uint32_t key_size,
		   const void *dump_keys, const void *dump_counters, uint32_t ndump, int64_t now_ns,
		   int64_t idle_ns, int64_t extend_ns, uint32_t *out_index, uint8_t *out_what, uint32_t *nout,
		   uint32_t max_extend, uint32_t *extend_over)
{
	struct pyflow_ka_index *ix;
	int err;

	*nout = 0;
	*extend_over = 0;
	if (!key_size || key_size > PYFLOW_FT_KEY_MAX)
		return -EINVAL;
	ix = pyflow_ka_index_new(dump_keys, ndump, key_size);
	if (!ix)
		return -ENOMEM;
	err = pyflow_ka_scan_range(ix, conn_keys, conns, 0, n, dump_counters, now_ns, idle_ns, extend_ns,
				   out_index, out_what, nout, max_extend, extend_over);
	pyflow_ka_index_free(ix);
	return err;
}
