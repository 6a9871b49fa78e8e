// SPDX-License-Identifier: GPL-2.0
/*
 * Batched flow-map operations through the raw bpf() syscall (no libbpf, no bcc).
 *
 * Why batches: one BPF_MAP_*_BATCH call moves thousands of entries for the price
 * of one syscall, where a Python loop pays a syscall plus interpreter work per
 * entry. What the kernel offers, and what this file does around it:
 *  - BPF_MAP_UPDATE_BATCH / BPF_MAP_DELETE_BATCH walk the given keys in order and
 *    stop at the first failing element, writing back how many were done;
 *  - BPF_MAP_LOOKUP_BATCH walks the table (not given keys) bucket by bucket with
 *    an opaque resume token, and for hash maps returns -ENOSPC when the next
 *    bucket holds more entries than the room given: the batch is grown and the
 *    same token retried;
 *  - there is no "look these keys up" batch: that is a loop of
 *    BPF_MAP_LOOKUP_ELEM here, so at least the loop is not in Python;
 *  - update_batch accepts only BPF_F_LOCK in elem_flags (kernel/bpf/syscall.c,
 *    generic_map_update_batch), so BPF_NOEXIST/BPF_EXIST are refused with
 *    -EINVAL before any element is touched: that is one of the "refused as a
 *    whole" cases that fall back to per-element calls.
 */
#include "pyflow_abi.h"
#include "pyflow_native.h"

#include <errno.h>
#include <linux/bpf.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef ENOTSUPP
#define ENOTSUPP 524 /* kernel-internal "operation not supported", leaks out of bpf() */
#endif

#define DEFAULT_CHUNK 4096u

static int sys_bpf(int cmd, union bpf_attr *attr, struct pyflow_ft_result *res)
{
	long ret = syscall(__NR_bpf, cmd, attr, sizeof(*attr));
	res->syscalls++;
	return ret < 0 ? -errno : (int)ret;
}

static inline uint64_t ptr_to_u64(const void *p)
{
	return (uint64_t)(unsigned long)p;
}

static void res_init(struct pyflow_ft_result *res, uint32_t n)
{
	memset(res, 0, sizeof(*res));
	res->index = n;
}

static int res_fail(struct pyflow_ft_result *res, int err, uint32_t index)
{
	res->err = err;
	res->index = index;
	return err;
}

/*
 * The kernel refused the batch command itself rather than failing on an element:
 * the errno says "not like this" and the count it wrote back (or did not touch)
 * says no element was processed. A real element failure always writes back a
 * count below n; a failure at element 0 with EINVAL looks the same as a refusal,
 * which is harmless: the per-element retry fails on that element in the same way.
 */
static int batch_refused(int ret, uint32_t count_after, uint32_t n)
{
	if (ret != -EINVAL && ret != -ENOTSUPP && ret != -EOPNOTSUPP)
		return 0;
	return count_after == 0 || count_after == n;
}

int pyflow_map_create(uint32_t type, uint32_t key_size, uint32_t value_size, uint32_t max_entries,
		      const char *name)
{
	struct pyflow_ft_result res;
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_type = type;
	attr.key_size = key_size;
	attr.value_size = value_size;
	attr.max_entries = max_entries;
	if (name)
		strncpy(attr.map_name, name, sizeof(attr.map_name) - 1);
	return sys_bpf(BPF_MAP_CREATE, &attr, &res);
}

/* ---- update ---------------------------------------------------------------- */

static int update_each(const struct pyflow_ft *ft, const uint8_t *keys, const uint8_t *values, uint32_t n,
		       uint64_t elem_flags, struct pyflow_ft_result *res)
{
	union bpf_attr attr;
	uint32_t i;
	int ret;

	for (i = 0; i < n; i++) {
		memset(&attr, 0, sizeof(attr));
		attr.map_fd = ft->fd;
		attr.key = ptr_to_u64(keys + (size_t)i * ft->key_size);
		attr.value = ptr_to_u64(values + (size_t)i * ft->value_size);
		attr.flags = elem_flags;
		ret = sys_bpf(BPF_MAP_UPDATE_ELEM, &attr, res);
		if (ret < 0)
			return res_fail(res, ret, i);
		res->done++;
	}
	return 0;
}

int pyflow_ft_update(const struct pyflow_ft *ft, const void *keys, const void *values, uint32_t n,
		     uint64_t elem_flags, uint32_t flags, struct pyflow_ft_result *res)
{
	union bpf_attr attr;
	int ret;

	res_init(res, n);
	if (n == 0)
		return 0;
	if (!(flags & PYFLOW_FT_NO_BATCH)) {
		memset(&attr, 0, sizeof(attr));
		attr.batch.map_fd = ft->fd;
		attr.batch.keys = ptr_to_u64(keys);
		attr.batch.values = ptr_to_u64(values);
		attr.batch.count = n;
		attr.batch.elem_flags = elem_flags;
		ret = sys_bpf(BPF_MAP_UPDATE_BATCH, &attr, res);
		if (ret == 0) {
			res->done = n;
			return 0;
		}
		if (!batch_refused(ret, attr.batch.count, n)) {
			res->done = attr.batch.count < n ? attr.batch.count : 0;
			return res_fail(res, ret, res->done);
		}
		res->fallback = 1;
	}
	return update_each(ft, keys, values, n, elem_flags, res);
}

/* ---- delete ---------------------------------------------------------------- */

/* One key at a time from `from`; ENOENT is skipped when missing[] is given. */
static int delete_each(const struct pyflow_ft *ft, const uint8_t *keys, uint32_t from, uint32_t n,
		       uint8_t *missing, struct pyflow_ft_result *res)
{
	union bpf_attr attr;
	uint32_t i;
	int ret;

	for (i = from; i < n; i++) {
		memset(&attr, 0, sizeof(attr));
		attr.map_fd = ft->fd;
		attr.key = ptr_to_u64(keys + (size_t)i * ft->key_size);
		ret = sys_bpf(BPF_MAP_DELETE_ELEM, &attr, res);
		if (ret == -ENOENT && missing) {
			missing[i] = 1;
			res->missing++;
			continue;
		}
		if (ret < 0)
			return res_fail(res, ret, i);
		res->done++;
	}
	return 0;
}

int pyflow_ft_delete(const struct pyflow_ft *ft, const void *keys, uint32_t n, uint8_t *missing,
		     uint32_t flags, struct pyflow_ft_result *res)
{
	const uint8_t *k = keys;
	union bpf_attr attr;
	uint32_t pos = 0, cnt;
	int ret;

	res_init(res, n);
	if (missing)
		memset(missing, 0, n);
	if (flags & PYFLOW_FT_NO_BATCH)
		return delete_each(ft, k, 0, n, missing, res);
	/* The kernel stops at the first absent key: note it, step over it, go on. */
	while (pos < n) {
		memset(&attr, 0, sizeof(attr));
		attr.batch.map_fd = ft->fd;
		attr.batch.keys = ptr_to_u64(k + (size_t)pos * ft->key_size);
		attr.batch.count = n - pos;
		ret = sys_bpf(BPF_MAP_DELETE_BATCH, &attr, res);
		if (ret == 0) {
			res->done += n - pos;
			return 0;
		}
		cnt = attr.batch.count;
		if (pos == 0 && res->done == 0 && batch_refused(ret, cnt, n)) {
			res->fallback = 1;
			return delete_each(ft, k, 0, n, missing, res);
		}
		if (cnt >= n - pos) /* error without a usable count: do not guess */
			return res_fail(res, ret, pos);
		res->done += cnt;
		pos += cnt;
		if (ret != -ENOENT || !missing)
			return res_fail(res, ret, pos);
		missing[pos] = 1;
		res->missing++;
		pos++;
	}
	return 0;
}

/* ---- lookup of given keys ---------------------------------------------------- */

int pyflow_ft_lookup(const struct pyflow_ft *ft, const void *keys, void *values, uint32_t n, uint8_t *found,
		     uint32_t flags, struct pyflow_ft_result *res)
{
	const uint8_t *k = keys;
	uint8_t *v = values;
	union bpf_attr attr;
	uint32_t i;
	int ret;

	(void)flags; /* there is no batch to fall back from */
	res_init(res, n);
	for (i = 0; i < n; i++) {
		memset(&attr, 0, sizeof(attr));
		attr.map_fd = ft->fd;
		attr.key = ptr_to_u64(k + (size_t)i * ft->key_size);
		attr.value = ptr_to_u64(v + (size_t)i * ft->value_size);
		ret = sys_bpf(BPF_MAP_LOOKUP_ELEM, &attr, res);
		if (ret == -ENOENT) {
			found[i] = 0;
			continue;
		}
		if (ret < 0) {
			memset(found + i, 0, n - i);
			return res_fail(res, ret, i);
		}
		found[i] = 1;
		res->done++;
	}
	return 0;
}

/* ---- walking the whole table -------------------------------------------------- */

/*
 * One walk serves dump, read_counters and count. Keys and values land in the
 * caller's arrays when given (no copy), else in scratch buffers of `chunk`
 * entries; a sink then sees each batch of values (read_counters keeps the
 * counters part, count keeps nothing).
 */
struct walk {
	const struct pyflow_ft *ft;
	uint8_t *keys;   /* output, cap entries; NULL: scratch */
	uint8_t *values; /* output, cap entries; NULL: scratch, handed to sink */
	uint32_t cap;
	uint32_t chunk;
	void (*sink)(void *ctx, uint32_t first, const uint8_t *values, uint32_t n);
	void *ctx;
	uint8_t *kscratch, *vscratch;
	uint32_t scratch_entries;
};

/* Scratch room for `entries` keys and/or values, for whichever of the two has no caller array. */
static int walk_scratch(struct walk *w, uint32_t entries)
{
	uint8_t *p;

	if (entries <= w->scratch_entries)
		return 0;
	if (!w->keys) {
		p = realloc(w->kscratch, (size_t)entries * w->ft->key_size);
		if (!p)
			return -ENOMEM;
		w->kscratch = p;
	}
	if (!w->values) {
		p = realloc(w->vscratch, (size_t)entries * w->ft->value_size);
		if (!p)
			return -ENOMEM;
		w->vscratch = p;
	}
	w->scratch_entries = entries;
	return 0;
}

static uint8_t *walk_kdst(struct walk *w, uint32_t got)
{
	return w->keys ? w->keys + (size_t)got * w->ft->key_size : w->kscratch;
}

static uint8_t *walk_vdst(struct walk *w, uint32_t got)
{
	return w->values ? w->values + (size_t)got * w->ft->value_size : w->vscratch;
}

static void walk_emit(struct walk *w, uint32_t got, uint32_t n)
{
	if (!w->values && w->sink && n)
		w->sink(w->ctx, got, w->vscratch, n);
}

/* Per-element walk: GET_NEXT_KEY + LOOKUP_ELEM. A key deleted between the two is
 * skipped; for hash maps the kernel then restarts GET_NEXT_KEY from the first
 * key, so a table changing under the walk can yield duplicates (bounded by cap). */
static int walk_each(struct walk *w, struct pyflow_ft_result *res)
{
	uint64_t prev[PYFLOW_FT_KEY_MAX / 8];
	uint32_t got = 0;
	union bpf_attr attr;
	int have_prev = 0, ret;
	uint8_t *kd, *vd;

	ret = walk_scratch(w, 1);
	if (ret < 0)
		return res_fail(res, ret, 0);
	for (;;) {
		if (got == w->cap) {
			/* Room is exhausted: is there anything left? */
			memset(&attr, 0, sizeof(attr));
			attr.map_fd = w->ft->fd;
			attr.key = have_prev ? ptr_to_u64(prev) : 0;
			attr.next_key = ptr_to_u64(prev);
			ret = sys_bpf(BPF_MAP_GET_NEXT_KEY, &attr, res);
			if (ret == -ENOENT)
				break;
			return res_fail(res, ret < 0 ? ret : -ENOSPC, got);
		}
		kd = walk_kdst(w, got);
		vd = walk_vdst(w, got);
		memset(&attr, 0, sizeof(attr));
		attr.map_fd = w->ft->fd;
		attr.key = have_prev ? ptr_to_u64(prev) : 0;
		attr.next_key = ptr_to_u64(kd);
		ret = sys_bpf(BPF_MAP_GET_NEXT_KEY, &attr, res);
		if (ret == -ENOENT)
			break;
		if (ret < 0)
			return res_fail(res, ret, got);
		memcpy(prev, kd, w->ft->key_size);
		have_prev = 1;
		memset(&attr, 0, sizeof(attr));
		attr.map_fd = w->ft->fd;
		attr.key = ptr_to_u64(kd);
		attr.value = ptr_to_u64(vd);
		ret = sys_bpf(BPF_MAP_LOOKUP_ELEM, &attr, res);
		if (ret == -ENOENT)
			continue;
		if (ret < 0)
			return res_fail(res, ret, got);
		walk_emit(w, got, 1);
		got++;
		res->done = got;
	}
	res->done = got;
	return 0;
}

/* After the caller's arrays filled up exactly: is the table exhausted, or was there more? */
static int walk_probe_more(struct walk *w, const void *in_tok, void *out_tok, struct pyflow_ft_result *res)
{
	uint64_t key[PYFLOW_FT_KEY_MAX / 8];
	union bpf_attr attr;
	uint8_t *value;
	int ret;

	value = malloc(w->ft->value_size);
	if (!value)
		return -ENOMEM;
	memset(&attr, 0, sizeof(attr));
	attr.batch.map_fd = w->ft->fd;
	attr.batch.in_batch = ptr_to_u64(in_tok);
	attr.batch.out_batch = ptr_to_u64(out_tok);
	attr.batch.keys = ptr_to_u64(key);
	attr.batch.values = ptr_to_u64(value);
	attr.batch.count = 1;
	ret = sys_bpf(BPF_MAP_LOOKUP_BATCH, &attr, res);
	free(value);
	if (ret == -ENOENT && attr.batch.count == 0)
		return 0;
	/* An entry came back, or a bucket did not fit in one slot (-ENOSPC): more remain. */
	return ret == 0 || ret == -ENOENT || ret == -ENOSPC ? -ENOSPC : ret;
}

static int walk_batch(struct walk *w, uint32_t flags, struct pyflow_ft_result *res)
{
	/* Resume tokens: a bucket index (u32) for hash maps, a key for arrays. */
	uint64_t tok[2][PYFLOW_FT_KEY_MAX / 8];
	uint32_t got = 0, count, n, chunk = w->chunk ? w->chunk : DEFAULT_CHUNK;
	int in = 0, started = 0, ret;
	union bpf_attr attr;

	if (w->ft->key_size > PYFLOW_FT_KEY_MAX || w->ft->key_size == 0 || w->cap == 0)
		return res_fail(res, -EINVAL, 0);
	res->chunk = chunk;
	if (flags & PYFLOW_FT_NO_BATCH)
		return walk_each(w, res);
	while (got < w->cap) {
		count = w->cap - got < chunk ? w->cap - got : chunk;
		ret = walk_scratch(w, count);
		if (ret < 0)
			return res_fail(res, ret, got);
		memset(&attr, 0, sizeof(attr));
		attr.batch.map_fd = w->ft->fd;
		attr.batch.in_batch = started ? ptr_to_u64(tok[in]) : 0;
		attr.batch.out_batch = ptr_to_u64(tok[!in]);
		attr.batch.keys = ptr_to_u64(walk_kdst(w, got));
		attr.batch.values = ptr_to_u64(walk_vdst(w, got));
		attr.batch.count = count;
		ret = sys_bpf(BPF_MAP_LOOKUP_BATCH, &attr, res);
		if (ret == -ENOSPC) {
			/* The next bucket alone holds more than `count` entries: grow, same token. */
			if (count == w->cap - got)
				return res_fail(res, -ENOSPC, got);
			chunk = count * 2 < w->cap - got ? count * 2 : w->cap - got;
			res->chunk = chunk;
			continue;
		}
		if (ret < 0 && ret != -ENOENT) {
			if (!started && batch_refused(ret, attr.batch.count, count)) {
				res->fallback = 1;
				return walk_each(w, res);
			}
			return res_fail(res, ret, got);
		}
		n = attr.batch.count;
		if (n > count) /* never from a sane kernel; do not believe it */
			return res_fail(res, -EIO, got);
		walk_emit(w, got, n);
		got += n;
		res->done = got;
		started = 1;
		in = !in;
		if (ret == -ENOENT) /* walked past the last bucket */
			return 0;
		if (n == 0) /* success with nothing: not expected, but never spin */
			return 0;
	}
	ret = walk_probe_more(w, tok[in], tok[!in], res);
	return ret < 0 ? res_fail(res, ret, got) : 0;
}

static int walk_run(struct walk *w, uint32_t flags, struct pyflow_ft_result *res)
{
	int ret = walk_batch(w, flags, res);

	free(w->kscratch);
	free(w->vscratch);
	return ret;
}

int pyflow_ft_dump(const struct pyflow_ft *ft, void *keys, void *values, uint32_t cap, uint32_t chunk,
		   uint32_t flags, struct pyflow_ft_result *res)
{
	struct walk w = { .ft = ft, .keys = keys, .values = values, .cap = cap, .chunk = chunk };

	res_init(res, 0);
	if (!keys || !values)
		return res_fail(res, -EINVAL, 0);
	return walk_run(&w, flags, res);
}

struct counters_ctx {
	uint8_t *out;
	uint32_t value_size;
};

static void counters_sink(void *ctx, uint32_t first, const uint8_t *values, uint32_t n)
{
	struct counters_ctx *c = ctx;
	struct pyflow_ft_counters *out = (struct pyflow_ft_counters *)c->out + first;
	const struct pyflow_flow *flow;
	uint32_t i;

	for (i = 0; i < n; i++) {
		/* the batch buffer holds values back to back, 8-byte aligned as the kernel copies them */
		flow = (const struct pyflow_flow *)(values + (size_t)i * c->value_size);
		out[i].packets = flow->counters.packets;
		out[i].bytes = flow->counters.bytes;
		out[i].closing = flow->action.closing;
		out[i].pad = 0;
	}
}

int pyflow_ft_read_counters(const struct pyflow_ft *ft, void *keys, void *counters, uint32_t cap,
			    uint32_t chunk, uint32_t flags, struct pyflow_ft_result *res)
{
	struct counters_ctx c = { .out = counters, .value_size = ft->value_size };
	struct walk w = { .ft = ft, .keys = keys, .values = NULL, .cap = cap, .chunk = chunk,
			  .sink = counters_sink, .ctx = &c };

	res_init(res, 0);
	if (!keys || !counters)
		return res_fail(res, -EINVAL, 0);
	/* What is read is part of struct pyflow_flow: any other value layout is a caller bug. */
	if (ft->value_size != sizeof(struct pyflow_flow))
		return res_fail(res, -EINVAL, 0);
	return walk_run(&w, flags, res);
}

int pyflow_ft_count(const struct pyflow_ft *ft, uint32_t chunk, uint32_t flags, struct pyflow_ft_result *res)
{
	struct walk w = { .ft = ft, .cap = UINT32_MAX, .chunk = chunk };

	res_init(res, 0);
	return walk_run(&w, flags, res);
}
