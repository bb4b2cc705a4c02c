/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Test and benchmark producer for kvmtrace/bpf/ringbuf.py: a socket-filter program run by
 * BPF_PROG_TEST_RUN (no packet is ever filtered) that writes PER_RUN struct kt_event
 * records into the ring buffer `events` per run. Record n (n = 0, 1, ... over the program's
 * life) holds known values so a test can check every field; with DISCARD_EVERY = k > 0,
 * every k-th record (n % k == k - 1) is reserved and then discarded. Records that found no
 * room are counted in counters[1]. Built by bcc with -DPER_RUN=.. -DDISCARD_EVERY=..
 * -DRB_PAGES=.. and -I kvmtrace/bpf/probes/ (kvmtrace.h).
 */
#include "kvmtrace.h"

BPF_RINGBUF_OUTPUT(events, RB_PAGES);
BPF_ARRAY(counters, u64, 2); /* [0] next record number, [1] records that found no room */

int fill(struct __sk_buff *skb)
{
	int k_seq = 0, k_lost = 1;
	u64 *seq = counters.lookup(&k_seq);
	u64 *lost = counters.lookup(&k_lost);

	if (!seq || !lost)
		return 0;
	for (int i = 0; i < PER_RUN; i++) {
		u64 n = *seq;
		struct kt_event *e;

		*seq = n + 1;
		e = events.ringbuf_reserve(sizeof(*e));
		if (!e) {
			*lost += 1;
			continue;
		}
		e->ts = n;
		e->value = n * 3;
		e->pid = 4242;
		e->tid = 17;
		e->dirty_index = (u32)n;
		e->reset_index = ~(u32)n;
		e->slot = 0xabcd;
		e->ring = (s32)(n % 7);
		e->vm = -2;
		e->kind = 1 + n % 6;
		e->pad[0] = 0;
		e->pad[1] = 0;
		e->pad[2] = 0;
		if (DISCARD_EVERY && n % DISCARD_EVERY == DISCARD_EVERY - 1)
			events.ringbuf_discard(e, 0);
		else
			events.ringbuf_submit(e, 0);
	}
	return 0;
}
