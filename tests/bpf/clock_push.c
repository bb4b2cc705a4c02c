/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The floor of any probe on kvm:kvm_dirty_ring_push that timestamps its events: a raw
 * tracepoint program that reads bpf_ktime_get_ns() (CLOCK_MONOTONIC, as kvmtrace's events)
 * into a per-CPU slot, and nothing else. tools/bench_probe_cost.py measures it beside
 * empty_push.c and kvmtrace's own programs, on the same workload.
 */
BPF_PERCPU_ARRAY(last, u64, 1);

RAW_TRACEPOINT_PROBE(kvm_dirty_ring_push)
{
	u32 zero = 0;
	u64 *v = last.lookup(&zero);

	if (v)
		*v = bpf_ktime_get_ns();
	return 0;
}
