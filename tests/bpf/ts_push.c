/* PROTOTYPE: the floor of a timestamped record: bpf_ktime_get_ns() into a per-CPU slot */
BPF_PERCPU_ARRAY(last, u64, 1);
RAW_TRACEPOINT_PROBE(kvm_dirty_ring_push)
{
	u32 zero = 0;
	u64 *v = last.lookup(&zero);

	if (v)
		*v = bpf_ktime_get_ns();
	return 0;
}
