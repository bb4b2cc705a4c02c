/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The floor of any probe on kvm:kvm_dirty_ring_push: a raw tracepoint program that does
 * nothing. tools/bench_probe_cost.py measures it beside kvmtrace's own programs, on the same
 * workload, to split their cost into the kernel's (dispatch, statistics) and theirs.
 */
RAW_TRACEPOINT_PROBE(kvm_dirty_ring_push)
{
	return 0;
}
