// SPDX-License-Identifier: GPL-2.0
#include "pyflow_native.h"

#include <errno.h>
#include <linux/bpf.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int sys_bpf(int cmd, union bpf_attr *attr)
{
	long ret = syscall(__NR_bpf, cmd, attr, sizeof(*attr));
	return ret < 0 ? -errno : (int)ret;
}

static inline uint64_t ptr_to_u64(const void *p)
{
	return (uint64_t)(unsigned long)p;
}

int pyflow_map_info(int map_fd, struct pyflow_map_info *out)
{
	struct bpf_map_info info;
	union bpf_attr attr;
	int ret;

	memset(&info, 0, sizeof(info));
	memset(&attr, 0, sizeof(attr));
	attr.info.bpf_fd = map_fd;
	attr.info.info_len = sizeof(info);
	attr.info.info = ptr_to_u64(&info);
	ret = sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr);
	if (ret < 0)
		return ret;
	out->type = info.type;
	out->id = info.id;
	out->key_size = info.key_size;
	out->value_size = info.value_size;
	out->max_entries = info.max_entries;
	out->map_flags = info.map_flags;
	out->btf_id = info.btf_id;
	out->btf_key_type_id = info.btf_key_type_id;
	out->btf_value_type_id = info.btf_value_type_id;
	memcpy(out->name, info.name, sizeof(out->name));
	out->name[sizeof(out->name) - 1] = '\0';
	return 0;
}

int pyflow_prog_test_run(int prog_fd, struct pyflow_test_run *run)
{
	union bpf_attr attr;
	int ret;

	memset(&attr, 0, sizeof(attr));
	attr.test.prog_fd = prog_fd;
	attr.test.data_in = ptr_to_u64(run->data_in);
	attr.test.data_size_in = run->data_size_in;
	attr.test.data_out = ptr_to_u64(run->data_out);
	attr.test.data_size_out = run->data_size_out;
	attr.test.ctx_in = ptr_to_u64(run->ctx_in);
	attr.test.ctx_size_in = run->ctx_size_in;
	attr.test.repeat = run->repeat;
	attr.test.flags = run->flags;
	ret = sys_bpf(BPF_PROG_TEST_RUN, &attr);
	if (ret < 0)
		return ret;
	run->retval = attr.test.retval;
	run->duration = attr.test.duration;
	run->data_size_out = attr.test.data_size_out;
	return 0;
}

int pyflow_obj_get(const char *path)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.pathname = ptr_to_u64(path);
	return sys_bpf(BPF_OBJ_GET, &attr);
}

int pyflow_obj_pin(int fd, const char *path)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.pathname = ptr_to_u64(path);
	attr.bpf_fd = fd;
	return sys_bpf(BPF_OBJ_PIN, &attr);
}

int pyflow_close(int fd)
{
	return close(fd) < 0 ? -errno : 0;
}
