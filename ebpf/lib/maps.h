/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The datapath's maps, declared for each build (lib/compat.h): for bcc with
 * BPF_TABLE declarations, whose accessors' .lookup / .redirect_map calls bcc
 * rewrites into helper calls on the maps' file descriptors; for libbpf as
 * BTF-defined maps in SEC(".maps"), whose sizes the loader may change before
 * it creates them (the PYFLOW_MAX_* values here are only the defaults).
 *
 * The C identifiers are the map names of pyflow_abi.h (PYFLOW_MAP_*): bcc uses
 * the identifier as the kernel's map name, and userspace finds maps (and their
 * pins) by that name.
 *
 * bcc only: with PYFLOW_PIN_DIR defined (a string such as "/sys/fs/bpf/pyflow") each map
 * is pinned at PYFLOW_PIN_DIR "/<name>": bcc creates the pin or, if it exists,
 * adopts the pinned map, which is how a restarted daemon keeps the flows.
 */
#ifndef PYFLOW_LIB_MAPS_H
#define PYFLOW_LIB_MAPS_H

#include "pyflow_abi.h"
#include "compat.h"

/* The hash map's element header (48 bytes) + key + value fill exactly three cache lines;
 * a fourth would be touched on every hit (docs/architecture.md, "A flow in three cache
 * lines"). */
_Static_assert(sizeof(struct pyflow_flow_key) + sizeof(struct pyflow_flow) == 144,
	       "flow-map key + value must stay 144 bytes (element 192 = 3 cache lines)");

#ifdef PYFLOW_LIBBPF
/* csrc/loader.c adopts each map pinned in the pin dir, or pins the one libbpf made */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct pyflow_flow_key);
	__type(value, struct pyflow_flow);
	__uint(max_entries, PYFLOW_MAX_FLOWS);
} pyflow_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct pyflow_stat);
	__uint(max_entries, PYFLOW_R__COUNT);
} pyflow_stats SEC(".maps");

/* plain devmap, as bcc's BPF_DEVMAP below: the same map type for both builds */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP);
	__type(key, __u32);
	__type(value, int);
	__uint(max_entries, PYFLOW_MAX_TX_PORTS);
} pyflow_txports SEC(".maps");
#else /* bcc */

#ifdef PYFLOW_PIN_DIR
#define PYFLOW_TABLE(type, key, leaf, name, max) \
	BPF_TABLE_PINNED(type, key, leaf, name, max, PYFLOW_PIN_DIR "/" #name)
#define PYFLOW_DEVMAP_SECTION(name) "maps/devmap:" PYFLOW_PIN_DIR "/" #name
#else
#define PYFLOW_TABLE(type, key, leaf, name, max) BPF_TABLE(type, key, leaf, name, max)
#define PYFLOW_DEVMAP_SECTION(name) "maps/devmap"
#endif

PYFLOW_TABLE("hash", struct pyflow_flow_key, struct pyflow_flow, pyflow_flows, PYFLOW_MAX_FLOWS);
PYFLOW_TABLE("percpu_array", __u32, struct pyflow_stat, pyflow_stats, PYFLOW_R__COUNT);

/*
 * The XDP egress ports. bcc 0.26 knows no devmap_hash, and its
 * BPF_TABLE_PINNED("devmap", ...) yields a struct without the redirect_map
 * method, so this spells out what bcc's BPF_DEVMAP expands to, with the pin
 * path appended to the section name the same way BPF_TABLE_PINNED does it.
 */
struct pyflow_txports_table_t {
	__u32 key;
	int leaf;
	u64 (*redirect_map)(int, int);
	__u32 max_entries;
};
__attribute__((section(PYFLOW_DEVMAP_SECTION(pyflow_txports))))
struct pyflow_txports_table_t pyflow_txports = { .max_entries = PYFLOW_MAX_TX_PORTS };
#endif /* bcc */

/*
 * Accessors. bcc rewrites table method calls (.lookup, .redirect_map) into
 * helper calls on the map's fd only in the main source file, so their bodies
 * live in pyflow_xdp.c; the rest of lib/ uses these declarations.
 */
static __always_inline struct pyflow_flow *flows_lookup(struct pyflow_flow_key *key);
static __always_inline struct pyflow_stat *stats_lookup(__u32 reason);
/* XDP: redirect to the devmap slot; returns XDP_REDIRECT, or XDP_PASS for an
 * empty slot (the XDP_PASS in the flags' low bits), never XDP_ABORTED. */
static __always_inline int txports_redirect(__u32 slot);

#endif /* PYFLOW_LIB_MAPS_H */
