/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Native half of the pyflow control plane, bound with cffi (pyflow/_native_build.py).
 * Talks to the kernel through the raw bpf() syscall, except csrc/loader.c, which
 * loads the prebuilt datapath object with libbpf.
 * Every function returns 0 or a negative errno; nothing here allocates memory
 * that the caller must free.
 */
#ifndef PYFLOW_NATIVE_H
#define PYFLOW_NATIVE_H

#include <stdint.h>

/* Kernel's view of a map, from BPF_OBJ_GET_INFO_BY_FD. */
struct pyflow_map_info {
	uint32_t type;
	uint32_t id;
	uint32_t key_size;
	uint32_t value_size;
	uint32_t max_entries;
	uint32_t map_flags;
	uint32_t btf_id;
	uint32_t btf_key_type_id;
	uint32_t btf_value_type_id;
	char name[16];
};

/* One BPF_PROG_TEST_RUN call. ctx_in/ctx_size describe an optional context
 * (struct xdp_md or struct __sk_buff); data_out receives the packet after the
 * program ran, data_size_out its length (in: capacity of data_out). */
struct pyflow_test_run {
	const void *data_in;
	uint32_t data_size_in;
	void *data_out;
	uint32_t data_size_out;
	const void *ctx_in;
	uint32_t ctx_size_in;
	uint32_t repeat;
	uint32_t flags;
	uint32_t retval;   /* out: program's return value */
	uint32_t duration; /* out: mean ns per run as the kernel measured it */
};

int pyflow_map_info(int map_fd, struct pyflow_map_info *info);
int pyflow_prog_test_run(int prog_fd, struct pyflow_test_run *run);
int pyflow_obj_get(const char *path);
int pyflow_obj_pin(int fd, const char *path);
int pyflow_close(int fd);

/* ==== flow table: batched map operations (csrc/flowtable.c) ================
 * Generic over key and value size; the ABI-specific part (where the counters sit
 * in struct pyflow_flow) is only in pyflow_ft_read_counters. Batch commands are
 * not atomic: the kernel applies elements in order and stops at the first one
 * that fails, so after a failure elements [0, res->done) are applied, element
 * res->index failed and nothing after it was attempted.
 * Where the kernel refuses a batch command as a whole (EINVAL/ENOTSUPP before
 * touching any element: old kernels, map types without batch ops, and
 * BPF_NOEXIST/BPF_EXIST in BPF_MAP_UPDATE_BATCH's elem_flags, which the kernel
 * refuses (seen on 6.18: it accepts only BPF_F_LOCK there), the same work is
 * done with per-element syscalls and
 * res->fallback is set, so the caller can go straight there next time. */
#define PYFLOW_FT_NO_BATCH 1 /* flags: use per-element syscalls only */
#define PYFLOW_FT_KEY_MAX 512 /* largest key size handled (hash maps allow 512) */

struct pyflow_ft {
	int fd;
	uint32_t key_size;
	uint32_t value_size;
};

struct pyflow_ft_result {
	uint32_t done;     /* applied (update/delete), found (lookup), returned (dump/count) */
	uint32_t index;    /* element that failed, when err != 0 names one; else n */
	int32_t err;       /* negative errno of the failure, 0 if none (= the return value) */
	uint32_t syscalls; /* bpf() calls made, for tests and benchmarks */
	uint32_t fallback; /* 1: the kernel refused the batch command, per-element calls did the work */
	uint32_t missing;  /* delete with a missing[] array: keys that were not in the map */
	uint32_t chunk;    /* dump/count/read_counters: batch size in use at the end (grown after ENOSPC) */
};

int pyflow_map_create(uint32_t type, uint32_t key_size, uint32_t value_size, uint32_t max_entries,
		      const char *name);
/* elem_flags: BPF_ANY (0), BPF_NOEXIST (1) or BPF_EXIST (2). */
int pyflow_ft_update(const struct pyflow_ft *ft, const void *keys, const void *values, uint32_t n,
		     uint64_t elem_flags, uint32_t flags, struct pyflow_ft_result *res);
/* missing == NULL: stop at the first absent key (-ENOENT). Otherwise absent keys
 * are skipped and marked missing[i] = 1 (others 0), and the call goes on. */
int pyflow_ft_delete(const struct pyflow_ft *ft, const void *keys, uint32_t n, uint8_t *missing,
		     uint32_t flags, struct pyflow_ft_result *res);
/* found[i] = 1 and values[i] filled when keys[i] is in the map; 0 and untouched otherwise. */
int pyflow_ft_lookup(const struct pyflow_ft *ft, const void *keys, void *values, uint32_t n,
		     uint8_t *found, uint32_t flags, struct pyflow_ft_result *res);
/* Whole table into keys/values (room for cap entries), chunk entries per syscall.
 * -ENOSPC: the table held more than cap entries; res->done <= cap were copied (a batch
 * walk copies whole hash buckets, so it can stop short of cap when the next bucket
 * does not fit in the room left). */
int pyflow_ft_dump(const struct pyflow_ft *ft, void *keys, void *values, uint32_t cap, uint32_t chunk,
		   uint32_t flags, struct pyflow_ft_result *res);
/* What the keep-alive needs of one flow-map entry (not part of the map's ABI: read_counters
 * fills it from struct pyflow_flow). */
struct pyflow_ft_counters {
	uint64_t packets;
	uint64_t bytes;
	uint32_t closing; /* action.closing: the datapath saw FIN or RST */
	uint32_t pad;
};

/* As dump, but of each value only its struct pyflow_ft_counters is kept (counters[i]). */
int pyflow_ft_read_counters(const struct pyflow_ft *ft, void *keys, void *counters, uint32_t cap,
			    uint32_t chunk, uint32_t flags, struct pyflow_ft_result *res);
/* Number of entries (a full walk: the kernel keeps no cheap count for hash maps). */
int pyflow_ft_count(const struct pyflow_ft *ft, uint32_t chunk, uint32_t flags, struct pyflow_ft_result *res);
/* ==== end of flow table section ============================================= */

/* ==== prebuilt datapath: loading a BPF object with libbpf (csrc/loader.c) ====
 * Opens req->object, sets each listed map's max_entries (max_entries < 0: the
 * object's own), adopts the map pinned as pin_dir/<name> (which keeps its own
 * size) or creates the map and pins it there (pin_dir NULL: no pins), loads,
 * and returns duplicated fds of
 * the listed maps and programs (the caller closes them). On failure every fd is
 * -1 and log holds the tail of what libbpf said, the verifier's log included. */
struct pyflow_bpf_map {
	const char *name;
	int64_t max_entries;
	int fd;       /* out */
	int adopted;  /* out: 1 when the map was the one pinned */
};

struct pyflow_bpf_prog {
	const char *name;
	int fd; /* out */
};

struct pyflow_bpf_load {
	const char *object;
	const char *pin_dir;
	struct pyflow_bpf_map *maps;
	uint32_t nmaps;
	struct pyflow_bpf_prog *progs;
	uint32_t nprogs;
	char log[16384]; /* out */
};

int pyflow_bpf_load(struct pyflow_bpf_load *req);
/* ==== end of prebuilt datapath section ====================================== */

/* ==== keep-alive scan (csrc/keepalive.c) ======================================
 * The per-connection work of the control plane's keep-alive tick. The caller keeps
 * one slot per offloaded connection: two keys (original, reply direction) at
 * conn_keys + 2 * i * key_size, and conns[i]. For every used slot the two keys are
 * looked up in a counters dump (dump_keys[j] -> struct pyflow_ft_counters
 * dump_counters[j], j < ndump, read at now_ns). Packets that moved (the count of both
 * directions differs from conns[i].packets) update the slot's packets and set its
 * last_seen_ns to now_ns (the datapath keeps no clock: a connection is seen at the
 * first read that finds its count moved) and need nothing else. The slot's verdict,
 * if it needs one, is appended to out_index/out_what (room for n each; *nout = how
 * many), in slot order: MISSING (an entry is not in the map), else CLOSING (FIN/RST
 * seen), else IDLE (now_ns - last_seen_ns > idle_ns), else EXTEND (conntrack's
 * timeout, which runs out at ct_deadline_ns, has less than extend_ns left). Allocates (and frees) an
 * index of the dump: -ENOMEM if it cannot. */
#define PYFLOW_KA_MISSING 1
#define PYFLOW_KA_CLOSING 2
#define PYFLOW_KA_EXTEND 3
#define PYFLOW_KA_IDLE 4

struct pyflow_ka_conn {
	uint64_t packets;       /* both directions, at the last tick */
	int64_t last_seen_ns;   /* the read that last found packets moved (caller's clock) */
	int64_t ct_deadline_ns; /* caller's clock: when the conntrack timeout last written runs out */
	uint32_t used;          /* 0: a free slot, skipped */
	uint32_t pad;
};

int pyflow_ka_scan(const void *conn_keys, struct pyflow_ka_conn *conns, uint32_t n, uint32_t key_size,
		   const void *dump_keys, const void *dump_counters, uint32_t ndump, int64_t now_ns,
		   int64_t idle_ns, int64_t extend_ns, uint32_t *out_index, uint8_t *out_what, uint32_t *nout,
		   uint32_t max_extend, uint32_t *extend_over);

/* The same scan in parts: the dump indexed once (pyflow_ka_index_new, NULL if out of
 * memory; keys and counters must outlive it), then the slots [lo, hi) scanned against
 * it (pyflow_ka_scan_range; verdicts as above, out_index holding slot numbers, room
 * for hi - lo), as often as wanted. The index can be built in one thread and used in
 * another: a walk of a large table reads the map and builds the index away from the
 * control loop, which scans a bounded number of slots per turn. */
struct pyflow_ka_index;
struct pyflow_ka_index *pyflow_ka_index_new(const void *dump_keys, uint32_t ndump, uint32_t key_size);
void pyflow_ka_index_free(struct pyflow_ka_index *ix);
int pyflow_ka_scan_range(const struct pyflow_ka_index *ix, const void *conn_keys, struct pyflow_ka_conn *conns,
			 uint32_t lo, uint32_t hi, const void *dump_counters, int64_t now_ns, int64_t idle_ns,
			 int64_t extend_ns, uint32_t *out_index, uint8_t *out_what, uint32_t *nout,
			 uint32_t max_extend, uint32_t *extend_over);

/* The dump positions whose key no used slot among the first n holds (the map entries
 * no connection on the XDP path owns: the resync's prune), in dump order into out (room
 * for the index's ndump), *nout = how many. A key the dump holds twice is reported at
 * both positions or at neither. -ENOMEM if a scratch array cannot be had. */
int pyflow_ka_unowned(const struct pyflow_ka_index *ix, uint32_t ndump, const void *conn_keys,
		      const struct pyflow_ka_conn *conns, uint32_t n, uint32_t *out, uint32_t *nout);
/* ==== end of keep-alive section ============================================= */

/* ==== flow-map entries in bulk (csrc/entries.c) ================================
 * Both entries of n connections (original direction, then reply) into keys_out (2n
 * struct pyflow_flow_key) and values_out (2n struct pyflow_flow). Per path, templates
 * (tmpl_keys: 2 keys, tmpl_values: 2 values per path, packed with the connection's
 * fields zeroed and no NAT) give what the path decides; per connection i: its path
 * path_index[i] (< npaths), its protocol protos[i], its ports ports[4i..4i+3] (o.sport,
 * o.dport, r.sport, r.dport, host order) and its four addresses as text in addrs
 * (o.src, o.dst, r.src, r.dst, each ended by a NUL; addrs_len covers all of them
 * exactly). -EINVAL for a path index out of range, text that is not an address, a
 * key whose addresses are of two families, or addrs not holding exactly 4n texts. */
int pyflow_pack_entries(const void *tmpl_keys, const void *tmpl_values, uint32_t npaths,
			const uint32_t *path_index, const uint8_t *protos, const uint16_t *ports,
			const char *addrs, uint32_t addrs_len, uint32_t n, void *keys_out, void *values_out);

/* ==== conntrack feed (csrc/ctfeed.c, libmnl) ==================================
 * ctnetlink datagrams decoded into one struct pyflow_ct_entry per entry. mode EVENTS:
 * NEW/UPDATE/DESTROY messages, those sent by skip_portid (the echo of our own changes;
 * 0: none) left out. mode DUMP: the CT_NEW answers of request seq; NLMSG_DONE sets
 * res->done, an NLMSG_ERROR res->err (positive errno). Entries are appended at
 * out[res->n] (res->n counts up: zero res before the first call); -ENOSPC when out is
 * full before the datagram ends. Messages that are not entries are counted, never
 * an error: res->ignored (another family, protocol or message type), res->malformed
 * (a tuple missing or broken, a truncated header). */
#define PYFLOW_CT_EVENTS 0
#define PYFLOW_CT_DUMP 1
#define PYFLOW_CT_DUMPED 0 /* entry.event of a dumped entry */
#define PYFLOW_CT_NEW 1
#define PYFLOW_CT_UPDATE 2
#define PYFLOW_CT_DESTROY 3
#define PYFLOW_CT_HAS_TCP_STATE 1 /* entry.has: which optional fields the message carried */
#define PYFLOW_CT_HAS_TIMEOUT 2
#define PYFLOW_CT_HAS_ID 4
/* Fewest bytes a message that is an entry takes in a datagram (headers and two minimal
 * tuples): a datagram of len bytes holds at most len / PYFLOW_CT_MIN_ENTRY + 1 entries. */
#define PYFLOW_CT_MIN_ENTRY 120
#define PYFLOW_NL_NO_ANSWER -1 /* pyflow_nl_batch: no ACK or error came for this message */

struct pyflow_ct_entry {
	uint32_t status;
	uint32_t mark;
	uint32_t timeout; /* seconds left; valid when has & PYFLOW_CT_HAS_TIMEOUT */
	uint32_t id;      /* valid when has & PYFLOW_CT_HAS_ID */
	uint16_t zone;
	uint16_t orig_sport; /* ports in host order */
	uint16_t orig_dport;
	uint16_t reply_sport;
	uint16_t reply_dport;
	uint8_t event; /* PYFLOW_CT_DUMPED, _NEW, _UPDATE, _DESTROY */
	uint8_t family;
	uint8_t proto;
	uint8_t tcp_state; /* valid when has & PYFLOW_CT_HAS_TCP_STATE */
	uint8_t has;
	uint8_t helper_len; /* 0: no helper (or one without a name) */
	uint8_t orig_src[16]; /* network order; IPv4 in the first 4 bytes, the rest 0 */
	uint8_t orig_dst[16];
	uint8_t reply_src[16];
	uint8_t reply_dst[16];
	char helper[32]; /* helper_len bytes, not NUL-terminated */
};

struct pyflow_ct_result {
	uint32_t n;         /* entries in out */
	uint32_t messages;  /* netlink messages walked */
	uint32_t datagrams; /* datagrams received (pyflow_ct_recv) */
	uint32_t echoes;    /* messages of skip_portid left out */
	uint32_t ignored;
	uint32_t malformed;
	uint32_t done;      /* DUMP: NLMSG_DONE of seq seen */
	int32_t err;        /* DUMP: errno of an NLMSG_ERROR; recv: ENOBUFS (overrun), EMSGSIZE */
	uint32_t more;      /* recv: stopped at max_datagrams or for room, more may be queued */
};

int pyflow_ct_decode(const void *buf, uint32_t len, uint32_t mode, uint32_t seq, uint32_t skip_portid,
		     struct pyflow_ct_entry *out, uint32_t cap, struct pyflow_ct_result *res);
/* Receives (non-blocking) and decodes datagrams into buf (bufsize bytes) until none is
 * queued, max_datagrams were read, out may not hold another datagram's entries, or
 * (DUMP) done/err. -ENOBUFS after an overrun (res->err set, entries before it kept). */
int pyflow_ct_recv(int fd, void *buf, uint32_t bufsize, uint32_t max_datagrams, uint32_t mode, uint32_t seq,
		   uint32_t skip_portid, struct pyflow_ct_entry *out, uint32_t cap, struct pyflow_ct_result *res);
/* Reads and drops what is queued (overruns meanwhile counted); 0 once empty, -EAGAIN
 * if still not empty after max_datagrams. */
int pyflow_ct_drain(int fd, void *buf, uint32_t bufsize, uint32_t max_datagrams, uint64_t *messages,
		    uint32_t *overruns);

/* n netlink requests (msgs: len bytes, sequence numbers first_seq .. first_seq + n - 1,
 * each asking for an ACK) in one sendmsg(), then their answers: errs[i] = 0 (done), the
 * positive errno of the refusal, or PYFLOW_NL_NO_ANSWER. -ETIMEDOUT when answers are
 * still missing after timeout_ms; after a receive overrun (answers dropped by the kernel)
 * returns 0 with res->overrun set once the queue is read. */
struct pyflow_nl_batch_result {
	uint32_t sent;
	uint32_t answered;
	uint32_t datagrams;
	uint32_t overrun;
};

int pyflow_nl_batch(int fd, const void *msgs, uint32_t len, uint32_t first_seq, uint32_t n, void *buf,
		    uint32_t bufsize, int32_t timeout_ms, int32_t *errs, struct pyflow_nl_batch_result *res);
/* ==== end of conntrack feed section ========================================= */

#endif /* PYFLOW_NATIVE_H */
