/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared structs of the kvmtrace probes. Every struct here has a twin numpy dtype in
 * kvmtrace/source/events.py; tests/test_layout.py checks that both agree.
 */
#ifndef KVMTRACE_H
#define KVMTRACE_H

/* enum kt_kind: what a struct kt_event describes. */
#define KT_PUSH       1  /* kvm:kvm_dirty_ring_push (fired after dirty_index++)          */
#define KT_RESET      2  /* kvm:kvm_dirty_ring_reset (end of one ring's reset)           */
#define KT_EXIT       3  /* kvm:kvm_dirty_ring_exit (soft-full exit requested)           */
#define KT_STALL      4  /* exit 31 returned to userspace .. next KVM_RUN; value = ns    */
#define KT_RESET_LAT  5  /* one KVM_RESET_DIRTY_RINGS ioctl; value = ns, ring = -1       */
#define KT_RING_SIZE  6  /* KVM_ENABLE_CAP(DIRTY_LOG_RING*) seen; value = ring bytes     */

/*
 * One event, 48 bytes. ts is bpf_ktime_get_ns() (CLOCK_MONOTONIC). vm is the VMM's file
 * descriptor of the VM (-1 when the VM was created before tracing started and could not
 * be resolved). ring is the vCPU's ring index (kvm_dirty_ring.index), -1 when not known.
 */
struct kt_event {
	__u64 ts;
	__u64 value;        /* KT_PUSH: offset (gfn within slot); KT_STALL/RESET_LAT: ns;  */
	                    /* KT_RING_SIZE: ring bytes                                     */
	__u32 pid;          /* tgid of the VMM                                              */
	__u32 tid;
	__u32 dirty_index;  /* after the event                                              */
	__u32 reset_index;  /* after the event                                              */
	__u32 slot;         /* KT_PUSH: memslot id (as_id << 16 | id); KT_RING_SIZE: cap    */
	__s32 ring;
	__s32 vm;
	__u8  kind;
	__u8  pad[3];
};

#endif /* KVMTRACE_H */
