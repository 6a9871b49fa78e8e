// SPDX-License-Identifier: GPL-2.0
/*
 * Loading the prebuilt datapath object with libbpf: open it, size its maps,
 * adopt the maps pinned in the pin dir (or pin the new ones), load the
 * programs, and hand back plain file descriptors. The libbpf object itself is closed before returning (the fds
 * are duplicates), so Python owns nothing but fds and the call is stateless.
 *
 * libbpf says why something failed only through its print callback (the
 * verifier's log included, which it fetches and grows itself after a refused
 * load), so the callback keeps the tail of what libbpf printed during the call
 * and the caller gets it in req->log.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include "pyflow_native.h"

/* The print callback is process-wide in libbpf: one load at a time owns it. */
static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static char *capture;          /* the current load's log, or NULL */
static size_t capture_size;    /* its capacity */
static size_t capture_len;

/* Keep the last capture_size - 1 bytes: the verifier's verdict is at the end. */
static void capture_append(const char *text, size_t n)
{
	if (n >= capture_size) {
		text += n - (capture_size - 1);
		n = capture_size - 1;
	}
	if (capture_len + n >= capture_size) {
		size_t drop = capture_len + n - (capture_size - 1);

		memmove(capture, capture + drop, capture_len - drop);
		capture_len -= drop;
	}
	memcpy(capture + capture_len, text, n);
	capture_len += n;
	capture[capture_len] = '\0';
}

static int print_cb(enum libbpf_print_level level, const char *fmt, va_list args)
{
	va_list copy;
	char *text;
	int n;

	if (level == LIBBPF_DEBUG || !capture)
		return 0;
	va_copy(copy, args);
	n = vsnprintf(NULL, 0, fmt, copy);
	va_end(copy);
	if (n <= 0)
		return 0;
	/* a whole verifier log arrives as one message: format it in full, keep the tail */
	text = malloc((size_t)n + 1);
	if (!text)
		return 0;
	vsnprintf(text, (size_t)n + 1, fmt, args);
	capture_append(text, (size_t)n);
	free(text);
	return n;
}

static void note(const char *fmt, ...)
{
	char line[512];
	va_list args;
	int n;

	va_start(args, fmt);
	n = vsnprintf(line, sizeof(line), fmt, args);
	va_end(args);
	if (n > 0)
		capture_append(line, strnlen(line, sizeof(line)));
}

static int dup_fd(int fd)
{
	int copy = fcntl(fd, F_DUPFD_CLOEXEC, 3);

	return copy < 0 ? -errno : copy;
}

static void pin_path(char *buf, size_t size, const struct pyflow_bpf_load *req, const char *name)
{
	snprintf(buf, size, "%s/%s", req->pin_dir, name);
}

/*
 * Adopt the map pinned for m, if any. This is done here rather than with
 * libbpf's pin paths because libbpf 1.1 refuses to reuse a pinned devmap: the
 * kernel adds BPF_F_RDONLY_PROG to every devmap it creates (and refuses that
 * flag from userspace), so the flags never compare equal. An adopted map keeps
 * its own sizes, as bcc's pinned tables do; the verifier still checks that its
 * key and value fit the programs.
 */
static int adopt_pin(struct bpf_map *map, const struct pyflow_bpf_load *req, struct pyflow_bpf_map *m)
{
	char path[4096];
	int fd, err;

	pin_path(path, sizeof(path), req, m->name);
	fd = bpf_obj_get(path);
	if (fd < 0) {
		if (errno == ENOENT)
			return 0;
		err = -errno;
		note("cannot open pinned map %s: %s\n", path, strerror(-err));
		return err;
	}
	err = bpf_map__reuse_fd(map, fd); /* takes its own duplicate */
	close(fd);
	if (err) {
		note("cannot adopt pinned map %s: %s\n", path, strerror(-err));
		return err;
	}
	m->adopted = 1;
	return 0;
}

static int load_locked(struct pyflow_bpf_load *req)
{
	struct bpf_object *obj;
	char path[4096];
	uint32_t i, pinned = 0;
	int err;

	obj = bpf_object__open_file(req->object, NULL);
	if (!obj) {
		err = -errno;
		note("cannot open %s: %s\n", req->object, strerror(-err));
		return err;
	}
	for (i = 0; i < req->nmaps; i++) {
		struct pyflow_bpf_map *m = &req->maps[i];
		struct bpf_map *map = bpf_object__find_map_by_name(obj, m->name);

		m->fd = -1;
		m->adopted = 0;
		if (!map) {
			note("%s has no map %s\n", req->object, m->name);
			err = -ENOENT;
			goto out;
		}
		if (m->max_entries >= 0 && (err = bpf_map__set_max_entries(map, (__u32)m->max_entries))) {
			note("map %s: cannot set max_entries %lld: %s\n", m->name,
			     (long long)m->max_entries, strerror(-err));
			goto out;
		}
		if (req->pin_dir && (err = adopt_pin(map, req, m)))
			goto out;
	}
	for (i = 0; i < req->nprogs; i++) {
		req->progs[i].fd = -1;
		if (!bpf_object__find_program_by_name(obj, req->progs[i].name)) {
			note("%s has no program %s\n", req->object, req->progs[i].name);
			err = -ENOENT;
			goto out;
		}
	}
	/* maps created (or adopted), programs verified */
	err = bpf_object__load(obj);
	if (err)
		goto out;
	for (i = 0; req->pin_dir && i < req->nmaps; i++) {
		if (!req->maps[i].adopted) {
			pin_path(path, sizeof(path), req, req->maps[i].name);
			err = bpf_map__pin(bpf_object__find_map_by_name(obj, req->maps[i].name), path);
			if (err) {
				note("cannot pin map %s: %s\n", path, strerror(-err));
				goto out;
			}
		}
		pinned = i + 1;
	}
	for (i = 0; i < req->nmaps; i++) {
		struct bpf_map *map = bpf_object__find_map_by_name(obj, req->maps[i].name);

		if ((err = dup_fd(bpf_map__fd(map))) < 0)
			goto out;
		req->maps[i].fd = err;
	}
	for (i = 0; i < req->nprogs; i++) {
		struct bpf_program *prog = bpf_object__find_program_by_name(obj, req->progs[i].name);

		if ((err = dup_fd(bpf_program__fd(prog))) < 0)
			goto out;
		req->progs[i].fd = err;
	}
	err = 0;
out:
	if (err) {
		/* pins made by this call go; adopted ones stay for the next process */
		for (i = 0; i < pinned; i++) {
			if (!req->maps[i].adopted) {
				pin_path(path, sizeof(path), req, req->maps[i].name);
				unlink(path);
			}
		}
		for (i = 0; i < req->nmaps; i++)
			if (req->maps[i].fd >= 0)
				close(req->maps[i].fd), req->maps[i].fd = -1;
		for (i = 0; i < req->nprogs; i++)
			if (req->progs[i].fd >= 0)
				close(req->progs[i].fd), req->progs[i].fd = -1;
	}
	bpf_object__close(obj);
	return err;
}

int pyflow_bpf_load(struct pyflow_bpf_load *req)
{
	libbpf_print_fn_t old;
	int err;

	pthread_mutex_lock(&load_lock);
	capture = req->log;
	capture_size = sizeof(req->log);
	capture_len = 0;
	capture[0] = '\0';
	old = libbpf_set_print(print_cb);
	err = load_locked(req);
	libbpf_set_print(old);
	capture = NULL;
	pthread_mutex_unlock(&load_lock);
	return err < 0 ? err : (err ? -EINVAL : 0);
}
