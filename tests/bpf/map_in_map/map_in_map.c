/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Test program of the probe cache (tests/test_probe_cache_kvm.py): an array of ring-buffer
 * maps whose elements user space fills, a raw tracepoint and a tracepoint filtered on
 * KT_PID (a run-time -D option: a placeholder in the cache). At each syscall of process
 * KT_PID, sys_enter writes the syscall number into the ring buffer in rbs[0] and counts it
 * in counts[0]; sys_exit counts in counts[1].
 */
BPF_RINGBUF_OUTPUT(rb_inner, 1);
BPF_ARRAY_OF_MAPS(rbs, "rb_inner", 2);
BPF_ARRAY(counts, u64, 2);

RAW_TRACEPOINT_PROBE(sys_enter)
{
	int zero = 0;
	u64 nr = ctx->args[1];

	if ((bpf_get_current_pid_tgid() >> 32) != KT_PID)
		return 0;
	u64 *n = counts.lookup(&zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	void *rb = rbs.lookup(&zero);
	if (rb)
		bpf_ringbuf_output(rb, &nr, sizeof(nr), 0);
	return 0;
}

TRACEPOINT_PROBE(raw_syscalls, sys_exit)
{
	int one = 1;

	if ((bpf_get_current_pid_tgid() >> 32) != KT_PID)
		return 0;
	u64 *n = counts.lookup(&one);
	if (n)
		__sync_fetch_and_add(n, 1);
	return 0;
}
