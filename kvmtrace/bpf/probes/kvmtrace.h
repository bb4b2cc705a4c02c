/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shared structs of the kvmtrace probes. Every struct here has a twin numpy dtype in
 * kvmtrace/core/events.py; tests/test_layout.py checks that both agree.
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
 * A VM is named vm = fd | gen << KT_VM_GEN_SHIFT, a non-negative s32 (as dev_t packs its
 * minor): fd is the VMM's file descriptor of the VM (fs.nr_open is at most 2^20), gen how
 * many VMs the probes saw under the same (pid, fd) before this one (the fd was closed and
 * reused). -1: not known (no BTF: pushes and exits of a VM created before tracing).
 * kvmtrace/core/kvm_abi.py vm_fd(), vm_gen(), vm_id() unpack and pack it.
 */
#define KT_VM_GEN_SHIFT 20

/*
 * One event, 48 bytes. ts is bpf_ktime_get_ns() (CLOCK_MONOTONIC). vm: see above. ring is
 * the vCPU's ring index (kvm_dirty_ring.index), -1 when not known.
 */
struct kt_event {
	__u64 ts;
	__u64 value;        /* KT_PUSH: offset (gfn within slot); KT_STALL/RESET_LAT: ns;  */
	                    /* KT_RING_SIZE: ring bytes                                     */
	__u32 pid;          /* tgid of the VMM                                              */
	__u32 tid;
	__u32 dirty_index;  /* after the event                                              */
	__u32 reset_index;  /* after the event                                              */
	__u32 slot;         /* KT_PUSH: memslot id (as_id << 16 | id); KT_RING_SIZE: cap;   */
	                    /* KT_EXIT: vcpu_id                                             */
	__s32 ring;
	__s32 vm;
	__u8  kind;
	__u8  pad[3];
};

/*
 * Mode record: CPU c's events go to its own single-producer ring, records
 * c * KT_CPU_RING_ENTRIES .. + KT_CPU_RING_ENTRIES - 1 of map `cpu_events` (struct kt_event,
 * KT_CPU_RING_ENTRIES a power of two), with its counters in element c of map `cpu_heads`.
 * Only programs running on CPU c write there; user space reads both maps through their
 * mmaps (kvmtrace/bpf/percpu.py). head and tail are free-running record counts on their
 * own cache lines: head written by the programs after the record, tail by the reader after
 * it copied the records.
 */
struct kt_cpu_head {
	__u64 head;
	__u64 busy;         /* 1 while a program of this CPU writes a record             */
	__u64 pad0[6];
	__u64 tail;
	__u64 pad1[7];
};

/*
 * In-kernel aggregation (dirty_ring.bpf.c), read by kvmtrace/bpf/live.py through the
 * numpy dtypes in kvmtrace/bpf/layout.py. Histograms: bucket i counts durations v (ns) with
 * 2^i <= v < 2^(i+1); bucket 0 also holds 0, the last bucket everything above.
 */
#define KT_HIST_BUCKETS 40

/* Map `rings`: one entry per dirty ring (struct kvm_dirty_ring) seen. */
struct kt_ring_key {
	__u32 pid;          /* tgid of the VMM                                              */
	__s32 vm;           /* fd | gen << KT_VM_GEN_SHIFT in that process, -1 unknown      */
	__s32 ring;         /* kvm_dirty_ring.index (vcpu_idx)                              */
};

struct kt_ring_val {
	__u64 pushes;           /* kvm_dirty_ring_push events                               */
	__u64 resets;           /* kvm_dirty_ring_reset events                              */
	__u64 entries_reset;    /* sum of reset_index advances over the reset events        */
	__u64 soft_full_exits;  /* kvm_dirty_ring_exit events                               */
	__u64 stalls;           /* completed stalls (exit 31 .. next KVM_RUN)               */
	__u64 stall_ns;         /* their total duration, ns                                 */
	__u64 overwritten;      /* entries overwritten (pushed with used > size), counted   */
	                        /* at resets up to reset_dirty (user space adds the rest)   */
	__u32 dirty_index;      /* last seen                                                */
	__u32 reset_index;      /* last seen                                                */
	__u32 reset_base;       /* reset_index after the last reset event                   */
	__u32 max_used;         /* max of dirty_index - reset_index at pushes and at resets */
	__u32 size;             /* entries (struct kvm_dirty_gfn, 16 bytes each); 0 unknown */
	__u32 exit_used_min;    /* smallest used seen at a soft-full exit; 0 none           */
	__u32 reset_dirty;      /* pushes up to this dirty_index are in max_used/overwritten */
	__u32 gen;              /* rings seen under this key - 1 (a new ring under a key of  */
	                        /* an unknown vm, -1, or of the tracepoint identity)        */
	__u32 stuck;            /* 1: the last reset walk stopped on an entry it cleared     */
	                        /* itself after an overflow (kt_stuck_reset())              */
	__u32 stuck_dirty;      /* dirty_index at that reset: later pushes are stranded     */
	__u64 stranded;         /* pushes stranded by earlier stuck periods (ended)         */
	__u32 stuck_exits;      /* soft-full exits since reset_index last moved             */
	__u32 pad;
	__u64 stall_hist[KT_HIST_BUCKETS];
};

/*
 * Array `push_slots` (full mode, raw push hook, aggregation only): the push program's fast
 * path. Slot hash(ring) belongs to one struct kvm_dirty_ring, named by its kernel address;
 * once claimed, that ring's pushes are counted here with no hash-map lookup and no read of
 * the ring. The claim is re-checked whenever any vCPU was created since (the kernel may put
 * a new ring where a freed one was). User space adds `pushes` to the row of `key` and, if
 * the row's gen is still the slot's, takes dirty_index = dirty0 + pushes when later.
 * Owner changes are serialised by `seq` (a seqlock taken with a compare-and-swap); user
 * space reads the slots before and after the rows and retries when a seq moved.
 */
struct kt_push_slot {
	__u64 ptr;              /* struct kvm_dirty_ring * of the owner; 0 = free           */
	__u64 pushes;           /* its pushes counted here (since the claim)                */
	__u32 epoch;            /* value of `vcpu_epoch` when the claim was last checked    */
	__u32 dirty0;           /* its dirty_index at the claim                             */
	struct kt_ring_key key;
	__u32 gen;              /* the row's gen at the claim: dirty0 + pushes is its ring's */
	__u64 seq;              /* +1 before and +1 after each change of owner (a claim, a  */
	                        /* fold into the old row, a free): odd while one runs       */
};

/* Map `vms`: one entry per VM (VMM pid, vm = fd | gen << KT_VM_GEN_SHIFT) seen. */
struct kt_vm_key {
	__u32 pid;
	__s32 vm;
};

struct kt_vm_val {
	__u64 ring_bytes;       /* from KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING*); 0 unknown   */
	__u32 cap;              /* 192 (DIRTY_LOG_RING) or 223 (..._ACQ_REL); 0 unknown      */
	__u32 vcpus;            /* KVM_CREATE_VCPU calls seen                               */
	__u64 reset_ioctls;     /* completed KVM_RESET_DIRTY_RINGS ioctls                   */
	__u64 reset_ns;         /* their total duration, ns                                 */
	__u64 reset_entries;    /* sum of their return values (entries reset)               */
	__u64 reset_lat_hist[KT_HIST_BUCKETS];
};

/* Per-CPU array `lost`: what the probes could not deliver or count. */
#define KT_LOST_EVENTS 0    /* ring buffer reserve failed (buffer full)                 */
#define KT_LOST_MAPS   1    /* a map was full: a ring, VM or thread was not tracked     */
#define KT_LOST_SLOTS  2

#endif /* KVMTRACE_H */
