/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The two ways the datapath is built from this one source:
 *
 *  - bcc (the development path): bcc compiles the source at load time against
 *    the kernel's headers, includes its own helpers.h first and turns the
 *    BPF_TABLE declarations of lib/maps.h into maps;
 *  - clang -target bpf with PYFLOW_LIBBPF defined (the build: `make`, the wheel):
 *    an object with BTF, BTF-defined maps in SEC(".maps") and SEC("xdp") /
 *    SEC("tc") programs, loaded by libbpf (csrc/loader.c) with no compiler on
 *    the router.
 *
 * This header hides what differs outside the three map accessors of
 * pyflow_xdp.c (bcc rewrites table method calls only in the main file, so
 * those stay there): the UAPI header paths, the helper declarations and how
 * an entry point is placed in its section.
 */
#ifndef PYFLOW_LIB_COMPAT_H
#define PYFLOW_LIB_COMPAT_H

#ifdef PYFLOW_LIBBPF
/* installed UAPI headers (linux-libc-dev), the multiarch dir supplies asm/ */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define PYFLOW_PROG(section) SEC(section)
#else
/* bcc: the kernel tree's UAPI copies; helpers come from bcc's helpers.h and
 * bcc puts every function it is asked to load in its own section */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#define PYFLOW_PROG(section)
#endif

#endif /* PYFLOW_LIB_COMPAT_H */
