/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The floor of any probe on kvm:kvm_dirty_ring_push that records each push with what a
 * replay needs of it: clock_push.c's timestamp, the ring's indices (one read of the head of
 * struct kvm_dirty_ring: dirty_index, reset_index, size, soft_limit, dirty_gfns, index;
 * 32 bytes from v5.11 on), the task, and one 48-byte record in this CPU's part of an array
 * (kvmtrace's own per-CPU layout, without the reader: the part wraps). No VM identity, no
 * check for a full ring, no lost-event count: kvmtrace's record program does those on top.
 * tools/bench_probe_cost.py measures it beside empty_push.c, clock_push.c and kvmtrace's
 * own programs, on the same workload.
 */
#define EMIT_ENTRIES 4096   /* records per CPU, a power of two */
#define EMIT_CPUS 64

struct emit_rec {
	u64 ts;
	u64 value;
	u32 pid;
	u32 tid;
	u32 dirty_index;
	u32 reset_index;
	u32 slot;
	s32 ring;
	s32 vm;
	u8 kind;
	u8 pad[3];
};

struct emit_head {
	u64 head;
	u64 pad[7];         /* one cache line per CPU: no line written by two CPUs */
};

BPF_ARRAY(heads, struct emit_head, EMIT_CPUS);
BPF_ARRAY(recs, struct emit_rec, EMIT_CPUS * EMIT_ENTRIES);

RAW_TRACEPOINT_PROBE(kvm_dirty_ring_push)
{
	/* TP_PROTO(struct kvm_dirty_ring *ring, u32 slot, u64 offset) */
	u64 now = bpf_ktime_get_ns();
	u64 id = bpf_get_current_pid_tgid();
	u32 cpu = bpf_get_smp_processor_id();
	u32 head[8] = {};
	struct emit_head *h = heads.lookup(&cpu);

	if (!h)
		return 0;
	bpf_probe_read_kernel(head, sizeof(head), (void *)ctx->args[0]);
	u32 at = cpu * EMIT_ENTRIES + (u32)(h->head & (EMIT_ENTRIES - 1));
	struct emit_rec *e = recs.lookup(&at);

	if (!e)
		return 0;
	*e = (struct emit_rec){ .ts = now, .value = ctx->args[2], .pid = id >> 32, .tid = (u32)id,
				.dirty_index = head[0], .reset_index = head[1],
				.slot = (u32)ctx->args[1], .ring = (s32)head[6], .vm = -1,
				.kind = 1 };
	h->head++;
	return 0;
}
