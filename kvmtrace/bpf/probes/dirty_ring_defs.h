/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Option defaults, KVM constants, per-thread/vCPU structs and map-free helpers of
 * dirty_ring.bpf.c. Code that touches maps stays in the .c file: bcc rewrites
 * ``map.lookup()`` and friends in the main file only.
 */
#ifndef KT_DIRTY_RING_DEFS_H
#define KT_DIRTY_RING_DEFS_H

/*
 * One mode per use (kvmtrace/bpf/loader.py Probes(mode)); every switch the code reads
 * follows from it here and nowhere else.
 *   KT_MODE_TOP        KT_AGGREGATE, and KT_FAST_PUSH with a raw push hook
 *   KT_MODE_TOP_LIGHT  KT_AGGREGATE + KT_NO_PUSH
 *   KT_MODE_RECORD     KT_EMIT_EVENTS, and KT_FAST_VM with a raw push hook
 * Test-only: KT_TEST_EVENTS (top + KT_EMIT_EVENTS, no fast path), KT_NO_FAST_PUSH.
 */
#if defined(KT_MODE_TOP) + defined(KT_MODE_TOP_LIGHT) + defined(KT_MODE_RECORD) != 1
#error "define exactly one of KT_MODE_TOP, KT_MODE_TOP_LIGHT, KT_MODE_RECORD"
#endif
#if defined(KT_AGGREGATE) || defined(KT_EMIT_EVENTS) || defined(KT_NO_PUSH)
#error "KT_AGGREGATE, KT_EMIT_EVENTS and KT_NO_PUSH follow from the KT_MODE_* define"
#endif
#ifndef KT_RAW_PUSH
#define KT_RAW_PUSH 0
#endif
#if defined(KT_MODE_TOP) || defined(KT_MODE_TOP_LIGHT)
#define KT_AGGREGATE 1
#endif
#ifdef KT_MODE_TOP_LIGHT
#define KT_NO_PUSH 1
#endif
#if defined(KT_MODE_RECORD) || (defined(KT_MODE_TOP) && defined(KT_TEST_EVENTS))
#define KT_EMIT_EVENTS 1
#endif
#if !defined(KT_NO_PUSH) && !defined(KT_NO_FAST_PUSH) && KT_RAW_PUSH
#if defined(KT_AGGREGATE) && !defined(KT_EMIT_EVENTS)
#define KT_FAST_PUSH 1   /* top: a push is counted in its ring's slot, nothing else */
#elif defined(KT_EMIT_EVENTS) && !defined(KT_AGGREGATE)
#define KT_FAST_VM 1     /* record: a push takes its VM fd from its ring's slot */
#endif
#endif

#ifndef KT_PID
#define KT_PID 0
#endif
#ifndef KT_RINGBUF_PAGES
#define KT_RINGBUF_PAGES 4096
#endif
#ifndef KT_RB_FLAGS
#define KT_RB_FLAGS 0
#endif
/* a compiler barrier: the stores before it are emitted before the stores after it */
#define kt_barrier() asm volatile("" ::: "memory")

#ifndef KT_MAX_RINGS
#define KT_MAX_RINGS 8192
#endif
#ifndef KT_MAX_VMS
#define KT_MAX_VMS 1024
#endif
#ifndef KT_MAX_VCPUS
#define KT_MAX_VCPUS 16384
#endif
#ifndef KT_MAX_TIDS
#define KT_MAX_TIDS 16384
#endif
#ifndef KT_PUSH_SLOT_BITS
#define KT_PUSH_SLOT_BITS 10
#endif
/* KT_VM_PTR: a VM is named by its struct kvm * (needs the KT_OFF_* member offsets of
 * kvmtrace/bpf/loader.py vm_ptr_defines() from BTF and KT_VM_IOCTL, KT_VCPU_IOCTL, the
 * addresses of kvm_vm_ioctl and kvm_vcpu_ioctl, from /proc/kallsyms) */
#ifndef KT_VM_PTR
#define KT_VM_PTR 0
#endif
/* fds looked at by the fallback walk of a task's fd table (kt_walk_vm_fd) */
#ifndef KT_FD_WALK
#define KT_FD_WALK 256
#endif
#define KT_GEN_SHIFT KT_VM_GEN_SHIFT          /* vm = fd | gen << 20 (kvmtrace.h)  */
#define KT_FD_MASK ((1 << KT_GEN_SHIFT) - 1)
#define KT_GEN_MASK 0x7FF                     /* vm stays a non-negative s32       */

/* include/uapi/linux/kvm.h */
#define KT_KVM_CREATE_VM       0xAE01
#define KT_KVM_RUN             0xAE80
#define KT_KVM_CREATE_VCPU     0xAE41
#define KT_KVM_RESET_RINGS     0xAEC7
#define KT_KVM_ENABLE_CAP      0x4068AEA3
#define KT_CAP_RING            192
#define KT_CAP_RING_ACQ_REL    223
#define KT_EXIT_RING_FULL      31

/* Per thread: the VM and ring it runs, a pending stall, a pending ioctl. */
struct kt_tid {
	__u64 stall_ts;      /* exit 31 returned to userspace at this time; 0 = none      */
	__u64 pend_ts;       /* sys_enter_ioctl of the pending cmd                        */
	__u64 pend_val;      /* KVM_ENABLE_CAP: args[0] (ring bytes); KVM_CREATE_VCPU: id  */
	__u32 pend_cmd;      /* 0 = no pending ioctl of interest                          */
	__s32 pend_fd;
	__s32 vm;            /* VM (fd | gen << 20) of the vCPU this thread last ran       */
	__s32 ring;          /* ring index this thread last pushed to                     */
	__u32 pend_cap;
	__s32 pend_vm;       /* VM (fd | gen << 20) of pend_fd (a VM fd ioctl)            */
};

/* Map `kvms` (KT_VM_PTR): a VM by its kernel address, in one process. */
struct kt_kvm_key {
	__u64 kvm;           /* struct kvm *                                              */
	__u32 pid;
	__u32 pad;
};

/* Map `vmfds`: the VM last seen under (pid, VM fd) and how many were seen before it. */
struct kt_vmfd_val {
	__u64 kvm;           /* struct kvm * (0 unknown: no KT_VM_PTR)                    */
	__u32 gen;
	__u32 pad;
};

struct kt_vcpu_key {
	__u32 pid;
	__s32 fd;            /* vCPU fd */
};

struct kt_vcpu_val {
	__s32 vm;            /* VM fd | gen << 20 */
	__u32 vcpu_id;
};

/*
 * The time of a push, reset or exit event: only event output (KT_EMIT_EVENTS) needs it;
 * the maps keep no timestamps (kvmtrace/bpf/loader.py merge_rows() orders two rows of one
 * ring by their indices), so the aggregate-only path reads no clock.
 */
#ifdef KT_EMIT_EVENTS
#define KT_EVENT_NOW() bpf_ktime_get_ns()
#else
#define KT_EVENT_NOW() 0
#endif

/* A u32 member at byte offset off (a multiple of 4) of a copied struct. */
#define KT_U32(buf, off) (*(u32 *)((u8 *)(buf) + (off)))

/* log2 bucket of a duration in ns (see KT_HIST_BUCKETS). */
static __always_inline u32 kt_bucket(u64 v)
{
	u32 r = 0;

	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8)  { v >>= 8;  r += 8; }
	if (v >> 4)  { v >>= 4;  r += 4; }
	if (v >> 2)  { v >>= 2;  r += 2; }
	if (v >> 1)  { r += 1; }
	return r < KT_HIST_BUCKETS ? r : KT_HIST_BUCKETS - 1;
}

/*
 * Light mode (KT_NO_PUSH): ring v's push-side counters, worked out at one of its
 * kvm_dirty_ring_reset events (dirty = its dirty_index), before the reset handler moves
 * v's indices on. Then v->reset_base is the reset_index before this reset and
 * v->dirty_index the dirty_index at the previous reset (0 for a ring not seen before).
 *   pushes      += dirty_index advance since the previous reset;
 *   max_used     = max of dirty_index - reset_index before the reset (used at that time);
 *   overwritten += entries pushed more than size past the oldest entry not yet reset
 *                  (the ring overflowed: their slots were reused), each counted once.
 * from_here: the ring's pushes so far are unknown (its first reset seen, of a VM created
 * before tracing; a VM created while tracing started at index 0): count from this reset on.
 */
static __always_inline void kt_light_reset(struct kt_ring_val *v, u32 dirty, int from_here)
{
	if ((s32)(dirty - v->dirty_index) < 0) {   /* a new ring under a reused VM fd */
		v->dirty_index = 0;
		v->reset_base = 0;
	}
	if (from_here)
		v->dirty_index = dirty;
	u32 from = v->reset_base;
	u32 used = dirty - from;

	if (v->size) {
		/* entries below prev_dirty - size were counted at an earlier reset */
		u32 seen = v->dirty_index - v->size;

		if (v->resets && (s32)(seen - from) > 0)
			from = seen;
		s32 over = (s32)(dirty - v->size - from);

		if (over > 0)
			__sync_fetch_and_add(&v->overwritten, over);
	}
	__sync_fetch_and_add(&v->pushes, dirty - v->dirty_index);
	if (used > v->max_used)
		v->max_used = used;
}

/*
 * Full mode: ring v's used-based counters at one of its kvm_dirty_ring_reset events (dirty =
 * its dirty_index), before the reset handler moves v's indices on, so v->reset_base is the
 * reset_index before this reset. Used only grows between resets, so
 *   max_used     = max with dirty - reset_base (used just before the reset);
 *   overwritten += pushes in (reset_dirty, dirty] made with used > size, i.e. past index
 *                  reset_base + size (each counted once; user space counts the pushes
 *                  after the last reset the same way).
 * from_here: this reset is the ring's first event (a VM created before tracing): the
 * pushes before it are unknown and not counted. A dirty_index behind reset_base is a new
 * ring under a reused VM fd (its first event a reset): it started at index 0.
 */
static __always_inline void kt_full_reset(struct kt_ring_val *v, u32 dirty, int from_here)
{
	if ((s32)(dirty - v->reset_base) < 0) {
		v->gen++;
		v->reset_base = 0;
		v->reset_dirty = 0;
	}
	if (!from_here) {
		u32 used = dirty - v->reset_base;

		if (used > v->max_used)
			v->max_used = used;
		if (v->size) {
			u32 from = v->reset_base + v->size;

			if ((s32)(v->reset_dirty - from) > 0)
				from = v->reset_dirty;
			s32 over = (s32)(dirty - from);

			if (over > 0)
				__sync_fetch_and_add(&v->overwritten, over);
		}
	}
	v->reset_dirty = dirty;
}

/*
 * Overflow aftermath (both modes): ring v's stuck state at one of its kvm_dirty_ring_reset
 * events (dirty, reset = its indices after the reset), after kt_light_reset()/
 * kt_full_reset() and before the reset handler moves v->reset_base on (the reset_index
 * before this reset). kvm_dirty_ring_reset() (virt/kvm/dirty_ring.c) walks from
 * reset_index while entries carry KVM_DIRTY_GFN_F_RESET and clears each: a walk that
 * advanced a whole lap (size entries) while dirty > reset ended on the entry it cleared
 * first, which held the push with index `reset` (an overflow push the harvest collected
 * with the lap). A VMM harvesting by index waits on that entry, which no push refills
 * until a lap later, and no reset moves reset_index: the ring is stuck and every push
 * after `dirty` (stuck_dirty) is stranded; user space counts them, up to a lap past
 * reset_index (stranded_count() in kvmtrace/bpf/loader.py).
 *
 * Pushes from that lap on (index >= reset + size) land first on the entries of
 * [reset, stuck_dirty), which the stuck reset had collected and cleared: the mode's reset
 * function counted them as overwritten, they are not, and are taken off again here. A
 * later reset that moves reset_index ends the stuck period: a whole lap again (the pushes
 * wrapped past the stranded entries, overwriting those of [stuck_dirty, dirty - size),
 * and the harvest collected the rest) may start a new one; less than a lap (the harvest
 * stopped on a cleared entry before reaching them) leaves the stranded entries
 * [stuck_dirty, reset_before + size) behind for good: they count in v->stranded.
 * A new ring under the same key (its dirty_index behind stuck_dirty) starts unstuck.
 * Any reset that moves reset_index zeroes v->stuck_exits (soft-full exits since then).
 */
static __always_inline void kt_stuck_reset(struct kt_ring_val *v, u32 dirty, u32 reset)
{
	u32 advance = reset - v->reset_base;

	if (advance)
		v->stuck_exits = 0;
	if (v->stuck && (s32)(dirty - v->stuck_dirty) < 0) {
		v->stuck = 0;
	} else if (v->stuck && advance) {
		u32 lap = v->reset_base + v->size;
		u32 hit = v->stuck_dirty + v->size;   /* end of the pushes onto cleared entries */

		if ((s32)(dirty - hit) < 0)
			hit = dirty;
		if ((s32)(hit - lap) > 0 && v->overwritten >= (u32)(hit - lap))
			__sync_fetch_and_add(&v->overwritten, -(u64)(u32)(hit - lap));
		if (advance != v->size && (s32)(lap - v->stuck_dirty) > 0)
			__sync_fetch_and_add(&v->stranded, lap - v->stuck_dirty);
		v->stuck = 0;
	}
	if (v->size && advance == v->size && (s32)(dirty - reset) > 0) {
		v->stuck = 1;
		v->stuck_dirty = dirty;
	}
}

#endif /* KT_DIRTY_RING_DEFS_H */
