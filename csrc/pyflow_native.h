/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Native half of the pyflow control plane, bound with cffi (pyflow/_native_build.py).
 * Talks to the kernel through the raw bpf() syscall only: no libbpf, no bcc.
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

#endif /* PYFLOW_NATIVE_H */
