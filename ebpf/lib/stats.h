/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Per-CPU verdict counters: every packet the program sees is counted once,
 * under the reason of its verdict (enum pyflow_reason). Per-CPU slots need no
 * atomics; userspace sums the CPUs.
 */
#ifndef PYFLOW_LIB_STATS_H
#define PYFLOW_LIB_STATS_H

#include "maps.h"

static __always_inline void stats_count(__u32 reason, __u32 frame_len)
{
	struct pyflow_stat *st = stats_lookup(reason);

	if (st) {
		st->packets += 1;
		st->bytes += frame_len;
	}
}

#endif /* PYFLOW_LIB_STATS_H */
