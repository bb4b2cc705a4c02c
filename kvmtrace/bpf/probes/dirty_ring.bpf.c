// SPDX-License-Identifier: GPL-2.0
/*
 * kvmtrace probes on the KVM dirty ring (bcc dialect; kvmtrace/bpf/loader.py compiles it).
 *
 * Hooks: kvm:kvm_dirty_ring_{push,reset,exit} and kvm:kvm_userspace_exit, each as a raw
 * tracepoint (KT_RAW_<EVENT>=1, struct offsets from BTF as -D defines) or as a tracepoint
 * (fields from the tracefs format); syscalls:sys_{enter,exit}_ioctl for the VM identity,
 * the ring size (KVM_ENABLE_CAP), the end of a soft-full stall (KVM_RUN) and the reset
 * latency (KVM_RESET_DIRTY_RINGS).
 *
 * VM identity: vm = fd | gen << 20 (kvmtrace.h): the VMM's file descriptor of the VM and
 * how many VMs were seen under (pid, fd) before this one (map `vmfds`; KVM_CREATE_VM's
 * returned fd always starts a new one).
 * KT_VM_PTR (offsets from BTF, kvm_vm_ioctl/kvm_vcpu_ioctl from /proc/kallsyms):
 * a VM is named by its struct kvm *, which every event reaches (push and reset: the ring
 * is embedded in struct kvm_vcpu, whose member kvm points to it; exit: the vCPU; KVM_RUN:
 * the vCPU fd's file). Map `kvms` keeps (kvm, pid) -> vm, filled once per VM: at
 * KVM_CREATE_VM (the new fd's file), at a VM ioctl (its fd), else from the fd in the VM's
 * debugfs name, checked against the current task's fd table: the file there must have
 * private_data == kvm and f_op->unlocked_ioctl == kvm_vm_ioctl (kt_find_vm_fd()). So a VM
 * created before tracing gets the same identity as one created while tracing.
 * Without KT_VM_PTR (no BTF): KVM_CREATE_VCPU on a VM fd maps (pid, vcpu fd) -> vm;
 * KVM_RUN on a vCPU fd gives its thread the vm; pushes and exits happen on that thread
 * inside KVM_RUN; resets run inside KVM_RESET_DIRTY_RINGS on the VM fd. Pushes and exits
 * of VMs created before tracing then get vm = -1 (user space resolves them).
 *
 * Mode (-D, exactly one; dirty_ring_defs.h derives the switches below from it):
 * KT_MODE_TOP (aggregation into the maps, KT_AGGREGATE), KT_MODE_TOP_LIGHT (aggregation
 * with no program on kvm_dirty_ring_push at all, KT_NO_PUSH: the probes' cost does not grow
 * with the push rate; each reset fills in pushes, used and overflow from its indices, see
 * kt_light_reset() in dirty_ring_defs.h), KT_MODE_RECORD (every event as a struct kt_event
 * into the ring of the CPU it happens on, KT_EMIT_EVENTS: kt_emit()).
 * Options (-D): KT_PID (0 = every process), KT_FOLLOW (KT_PID and its descendants, see
 * kt_wanted()), KT_CPU_RING_ENTRIES and KT_NCPUS (record: records per CPU ring, CPUs),
 * KT_RINGBUF_PAGES and KT_RB_FLAGS (the ring buffer of KT_TEST_EVENTS), KT_MAX_{RINGS,VMS,VCPUS,TIDS} (map sizes),
 * KT_VM_PTR with its offsets and addresses (VM identity by struct kvm *, see above),
 * KT_FD_WALK (fds the fallback walk looks at). Tests and benchmarks only: KT_NO_FAST_PUSH
 * (no fast path: every push takes the hash-map path, for comparison), KT_PUSH_SLOT_BITS
 * (log2 of the fast-path slots), KT_TEST_EVENTS (KT_MODE_TOP with event output too),
 * KT_VM_NAME_OFF (the fallback walk alone).
 *
 * Fast path (KT_FAST_PUSH: raw push hook, aggregation without event output): a ring's push
 * is counted in its slot of `push_slots` (struct kt_push_slot), found by hashing the ring's
 * address: one array lookup instead of two hash lookups and a read of the ring. Used,
 * max_used and overwritten entries then follow from the indices at resets (as in light mode)
 * plus, between resets, in user space from dirty0 + pushes (kvmtrace/bpf/loader.py).
 * KT_FAST_VM (raw push hook, event output without aggregation): the same slots name the
 * VM fd of a push's ring instead of the per-thread hash map.
 */
#include <uapi/linux/ptrace.h>
#include "kvmtrace.h"
#include "dirty_ring_defs.h"

BPF_HASH(rings, struct kt_ring_key, struct kt_ring_val, KT_MAX_RINGS);
BPF_HASH(vms, struct kt_vm_key, struct kt_vm_val, KT_MAX_VMS);
BPF_TABLE("lru_hash", struct kt_vcpu_key, struct kt_vcpu_val, vcpus, KT_MAX_VCPUS);
BPF_TABLE("lru_hash", u32, struct kt_tid, tids, KT_MAX_TIDS);
BPF_HASH(vmfds, struct kt_vcpu_key, struct kt_vmfd_val, KT_MAX_VMS);  /* (pid, VM fd) */
#if KT_VM_PTR
BPF_TABLE("lru_hash", struct kt_kvm_key, s32, kvms, KT_MAX_VMS);
#endif
BPF_ARRAY(zero_ring, struct kt_ring_val, 1);   /* never written: initial values */
BPF_ARRAY(zero_vm, struct kt_vm_val, 1);
BPF_PERCPU_ARRAY(lost, u64, KT_LOST_SLOTS);
#if defined(KT_FAST_PUSH) || defined(KT_FAST_VM)
#define KT_PUSH_SLOTS 1
BPF_ARRAY(push_slots, struct kt_push_slot, 1 << KT_PUSH_SLOT_BITS);
BPF_ARRAY(vcpu_epoch, u32, 1);   /* KVM_CREATE_VCPU calls seen: a ring may be new memory */
#endif
#ifdef KT_EMIT_EVENTS
#ifdef KT_CPU_RING_ENTRIES
/* record: one ring of events per CPU (struct kt_cpu_head in kvmtrace.h), written by that
 * CPU's programs only, read by user space through the maps' mmaps (kvmtrace/bpf/percpu.py) */
BPF_F_TABLE("array", u32, struct kt_cpu_head, cpu_heads, KT_NCPUS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", u32, struct kt_event, cpu_events, KT_NCPUS * KT_CPU_RING_ENTRIES,
	    BPF_F_MMAPABLE);
#else
BPF_RINGBUF_OUTPUT(events, KT_RINGBUF_PAGES);
#endif
#endif

static __always_inline void kt_lost(u32 slot)
{
	u64 *n = lost.lookup(&slot);

	if (n)
		(*n)++;   /* per-CPU slot: no atomic needed */
}

static __always_inline void kt_emit(u8 kind, u64 ts, u32 pid, u32 tid, s32 vm, s32 ring,
				    u32 dirty, u32 reset, u32 slot, u64 value)
{
#if defined(KT_EMIT_EVENTS) && defined(KT_CPU_RING_ENTRIES)
	/*
	 * This CPU's ring. Programs run with migration disabled, and two of ours on one CPU
	 * interleave only if one interrupts (or, where a tracepoint is faultable, preempts)
	 * the other: busy makes the later one count its event lost rather than write into
	 * a record being written. No lock, no atomic: nothing else writes here.
	 */
	u32 cpu = bpf_get_smp_processor_id();
	struct kt_cpu_head *r = cpu_heads.lookup(&cpu);

	if (!r || r->busy) {
		kt_lost(KT_LOST_EVENTS);
		return;
	}
	r->busy = 1;
	kt_barrier();
	u64 head = r->head;
	u32 at = cpu * KT_CPU_RING_ENTRIES + (u32)(head & (KT_CPU_RING_ENTRIES - 1));
	struct kt_event *e = cpu_events.lookup(&at);

	if (!e || head - *(volatile u64 *)&r->tail >= KT_CPU_RING_ENTRIES) {   /* full */
		kt_barrier();
		r->busy = 0;
		kt_lost(KT_LOST_EVENTS);
		return;
	}
	*e = (struct kt_event){ .ts = ts, .value = value, .pid = pid, .tid = tid,
				.dirty_index = dirty, .reset_index = reset, .slot = slot,
				.ring = ring, .vm = vm, .kind = kind };
	kt_barrier();   /* the record before the head that publishes it (x86: TSO) */
	*(volatile u64 *)&r->head = head + 1;
	kt_barrier();
	r->busy = 0;
#elif defined(KT_EMIT_EVENTS)
	struct kt_event *e = events.ringbuf_reserve(sizeof(struct kt_event));

	if (!e) {
		kt_lost(KT_LOST_EVENTS);
		return;
	}
	*e = (struct kt_event){ .ts = ts, .value = value, .pid = pid, .tid = tid,
				.dirty_index = dirty, .reset_index = reset, .slot = slot,
				.ring = ring, .vm = vm, .kind = kind };
	events.ringbuf_submit(e, KT_RB_FLAGS);
#endif
}

static __always_inline struct kt_tid *kt_thread(u32 tid)
{
	struct kt_tid *t = tids.lookup(&tid);

	if (t)
		return t;
	struct kt_tid init = { .vm = -1, .ring = -1 };

	tids.insert(&tid, &init);
	t = tids.lookup(&tid);
	if (!t)
		kt_lost(KT_LOST_MAPS);
	return t;
}

static __always_inline struct kt_vm_val *kt_vm(u32 pid, s32 vm)
{
	struct kt_vm_key key = { .pid = pid, .vm = vm };
	struct kt_vm_val *v = vms.lookup(&key);
	u32 zero = 0;

	if (v)
		return v;
	struct kt_vm_val *init = zero_vm.lookup(&zero);

	if (!init)
		return 0;
	vms.insert(&key, init);
	v = vms.lookup(&key);
	if (!v)
		kt_lost(KT_LOST_MAPS);
	return v;
}

/* Ring entries of a VM from its KVM_ENABLE_CAP; 0 unknown. */
static __always_inline u32 kt_vm_entries(u32 pid, s32 vm)
{
	struct kt_vm_key key = { .pid = pid, .vm = vm };
	struct kt_vm_val *v = vms.lookup(&key);

	return v ? v->ring_bytes >> 4 : 0;   /* struct kvm_dirty_gfn: 16 bytes */
}

/* The ring's counters, created on first sight with reset_base = reset_index now. */
static __always_inline struct kt_ring_val *kt_ring(u32 pid, s32 vm, s32 ring, u32 reset,
						   u32 size)
{
	struct kt_ring_key key = { .pid = pid, .vm = vm, .ring = ring };
	struct kt_ring_val *v = rings.lookup(&key);
	u32 zero = 0;

	if (v)
		return v;
	struct kt_ring_val *init = zero_ring.lookup(&zero);

	if (!init)
		return 0;
	int fresh = rings.insert(&key, init) == 0;

	v = rings.lookup(&key);
	if (!v) {
		kt_lost(KT_LOST_MAPS);
		return 0;
	}
	if (fresh) {
		v->reset_base = reset;
		v->size = size ? size : kt_vm_entries(pid, vm);
	}
	return v;
}

/*
 * The vm of the VM kvm (0 unknown) now found under (pid, fd): gen is that of the VM last
 * seen there, +1 when that was another VM or (fresh: KVM_CREATE_VM just returned fd) when
 * one was seen there at all. An entry whose kvm is unknown (0) is taken to be this VM.
 */
static __always_inline s32 kt_vm_gen(u32 pid, s32 fd, u64 kvm, int fresh)
{
	struct kt_vcpu_key k = { .pid = pid, .fd = fd };
	struct kt_vmfd_val *e = vmfds.lookup(&k);
	struct kt_vmfd_val nv = { .kvm = kvm };

	if (e) {
		if (!fresh && (e->kvm == kvm || !e->kvm)) {
			e->kvm = kvm;
			return fd | (e->gen << KT_GEN_SHIFT);
		}
		nv.gen = (e->gen + 1) & KT_GEN_MASK;
	}
	if (vmfds.update(&k, &nv))
		kt_lost(KT_LOST_MAPS);
	return fd | (nv.gen << KT_GEN_SHIFT);
}

#if KT_VM_PTR
static __always_inline u64 kt_read_ptr(u64 addr)
{
	u64 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
	return v;
}

/* The current task's open files: its fdtable's fd array (0 if none) and max_fds. */
static __always_inline u64 kt_fd_array(u32 *max)
{
	u64 files = kt_read_ptr(bpf_get_current_task() + KT_OFF_TASK_FILES);
	u64 fdt = files ? kt_read_ptr(files + KT_OFF_FILES_FDT) : 0;

	if (!fdt)
		return 0;
	bpf_probe_read_kernel(max, sizeof(*max), (void *)(fdt + KT_OFF_FDT_MAX));
	return kt_read_ptr(fdt + KT_OFF_FDT_FD);
}

/* file->private_data if file->f_op->unlocked_ioctl is ioctl, else 0. */
static __always_inline u64 kt_file_private(u64 file, u64 ioctl)
{
	u64 fop = kt_read_ptr(file + KT_OFF_FILE_FOP);

	if (!fop || kt_read_ptr(fop + KT_OFF_FOP_IOCTL) != ioctl)
		return 0;
	return kt_read_ptr(file + KT_OFF_FILE_PRIV);
}

/* private_data of the current task's file at fd if its unlocked_ioctl is ioctl, else 0. */
static __always_inline u64 kt_fd_private(s32 fd, u64 ioctl)
{
	u32 max = 0;
	u64 arr = kt_fd_array(&max);

	if (!arr || fd < 0 || (u32)fd >= max)
		return 0;
	u64 file = kt_read_ptr(arr + (u64)fd * 8);

	return file ? kt_file_private(file, ioctl) : 0;
}

/*
 * The lowest fd among the current task's first KT_FD_WALK that is a VM fd of kvm (its
 * file's private_data is kvm and its f_op->unlocked_ioctl is kvm_vm_ioctl; the VM's stats
 * fd has the same private_data but no unlocked_ioctl), -1 none.
 *
 * Written for the verifier, which checks a bounded loop once per iteration, and each
 * iteration once per path into it that it cannot prune (bcc 0.26 cannot load bpf_loop()
 * callbacks: it leaves the callback's ld_imm64 unrelocated, "R2 type=scalar
 * expected=func"): the fd array is read KT_FD_BATCH pointers at a time; every fd costs the
 * same reads whatever they give, and one test of them (no branch per outcome), so each fd
 * is one path; kt_find_vm_fd() has the one call site; the programs call kt_kvm_vm()
 * before state that differs from path to path (the exit's thread entry). About 15 k
 * instructions per program instead of 165-330 k (tools/bench_verifier.py).
 */
#define KT_FD_BATCH 16
#if KT_FD_WALK % KT_FD_BATCH
#error "KT_FD_WALK must be a multiple of KT_FD_BATCH (16)"
#endif
static __always_inline s32 kt_walk_vm_fd(u64 kvm)
{
	u32 max = 0;
	u64 arr = kt_fd_array(&max);

	if (!arr)
		return -1;
#pragma clang loop unroll(disable)
	for (u32 base = 0; base < KT_FD_WALK; base += KT_FD_BATCH) {
		u64 files[KT_FD_BATCH] = {};

		if (base >= max)
			break;
		/* max_fds is a multiple of BITS_PER_LONG (fs/file.c): the batch is in the array */
		bpf_probe_read_kernel(files, sizeof(files), (void *)(arr + (u64)base * 8));
#pragma unroll
		for (u32 j = 0; j < KT_FD_BATCH; j++) {
			u64 file = files[j];
			/* no file (0) or no f_op: a read fails and gives 0; both reads always, so
			 * that the verifier has one path per fd, not one per outcome */
			u64 priv = kt_read_ptr(file + KT_OFF_FILE_PRIV);
			u64 ioctl = kt_read_ptr(kt_read_ptr(file + KT_OFF_FILE_FOP) + KT_OFF_FOP_IOCTL);
			u64 differ = (priv ^ kvm) | (ioctl ^ KT_VM_IOCTL);

			asm volatile("" : "+r"(differ));   /* clang: no branch per operand */
			if (!differ)
				return base + j;
		}
	}
	return -1;
}

/*
 * The fd in VM kvm's debugfs name, -1 when there is none: KVM names a VM's debugfs
 * directory "PID-FD" after the creating process and the fd KVM_CREATE_VM returned
 * (virt/kvm/kvm_main.c, kvm_create_vm_debugfs(), Linux >= 4.7).
 */
static __always_inline s32 kt_debugfs_fd(u64 kvm)
{
	char name[24] = {};
	u64 dent = kt_read_ptr(kvm + KT_OFF_KVM_DENTRY);
	s32 fd = -1;

	if (!dent || dent >= (u64)-4095)   /* none, or an ERR_PTR: no debugfs */
		return -1;
	u64 str = kt_read_ptr(dent + KT_OFF_DENTRY_NAME);

	if (!str || bpf_probe_read_kernel_str(name, sizeof(name), (void *)str) <= 0)
		return -1;
#pragma unroll
	for (int i = 0; i < sizeof(name); i++) {
		char c = name[i];

		if (!c)
			break;
		if (c == '-' && fd < 0) {
			fd = 0;
		} else if (c < '0' || c > '9' || fd > KT_FD_MASK) {
			return -1;
		} else if (fd >= 0) {
			fd = fd * 10 + (c - '0');
		}
	}
	return fd > KT_FD_MASK ? -1 : fd;
}

/*
 * The VM fd of kvm in the current task: the fd of its debugfs name (kt_debugfs_fd()) if
 * the current task's file there is still a VM fd of kvm (not closed, dup2'ed away or in
 * another process), else kt_walk_vm_fd(). -1 when neither finds one.
 */
static __always_inline s32 kt_find_vm_fd(u64 kvm)
{
#ifdef KT_VM_NAME_OFF   /* tests: the fd-table walk alone */
	s32 fd = -1;
#else
	s32 fd = kt_debugfs_fd(kvm);
#endif

	if (fd >= 0 && kt_fd_private(fd, KT_VM_IOCTL) == kvm)
		return fd;
	return kt_walk_vm_fd(kvm);
}

/* Remember vm as the name of VM kvm in process pid; returns vm. */
static __always_inline s32 kt_kvm_set(u32 pid, u64 kvm, s32 vm)
{
	struct kt_kvm_key key = { .kvm = kvm, .pid = pid };

	if (kvms.update(&key, &vm))
		kt_lost(KT_LOST_MAPS);
	return vm;
}

/* The vm of VM kvm in process pid, one of whose fds is fd (a VM ioctl's): from `kvms`
 * (unless it says -1), else named after fd. */
static __always_inline s32 kt_kvm_vm_at(u32 pid, u64 kvm, s32 fd)
{
	struct kt_kvm_key key = { .kvm = kvm, .pid = pid };
	s32 *v = kvms.lookup(&key);

	if (v && *v >= 0)
		return *v;
	return kt_kvm_set(pid, kvm, kt_vm_gen(pid, fd, kvm, 0));
}

/*
 * The vm of VM kvm in process pid: from `kvms`, else by kt_find_vm_fd(); -1 when no fd of
 * it is found (remembered, until a VM ioctl names it: kt_kvm_vm_at()).
 */
static __always_inline s32 kt_kvm_vm(u32 pid, u64 kvm)
{
	struct kt_kvm_key key = { .kvm = kvm, .pid = pid };
	s32 *v = kvms.lookup(&key);

	if (v)
		return *v;
	if (!kvm)
		return -1;
	s32 fd = kt_find_vm_fd(kvm);

	return kt_kvm_set(pid, kvm, fd < 0 ? -1 : kt_vm_gen(pid, fd, kvm, 0));
}

/* struct kvm * of the vCPU whose ring (struct kvm_dirty_ring, embedded) is at ring_ptr */
static __always_inline u64 kt_ring_kvm(u64 ring_ptr)
{
	return kt_read_ptr(ring_ptr - KT_OFF_VCPU_RING + KT_OFF_VCPU_KVM);
}
#endif /* KT_VM_PTR */

/* The vm of the VM fd `fd` of the current process (a VM ioctl's fd). */
static __always_inline s32 kt_fd_vm(u32 pid, s32 fd)
{
#if KT_VM_PTR
	u64 kvm = kt_fd_private(fd, KT_VM_IOCTL);

	if (kvm)
		return kt_kvm_vm_at(pid, kvm, fd);
#endif
	struct kt_vcpu_key k = { .pid = pid, .fd = fd };
	struct kt_vmfd_val *e = vmfds.lookup(&k);

	return e ? fd | (e->gen << KT_GEN_SHIFT) : fd;
}

/*
 * KT_FOLLOW (with KT_PID, for `-- COMMAND`): trace KT_PID's whole process tree. A program on
 * sched:sched_process_fork adds each new task of a followed process to `followed` before
 * the task can run (so before a VMM it became could create a vCPU): a new process by its
 * tgid; a new thread by its tid too (the tracepoint does not tell them apart; a living
 * thread's tid is no other process's tgid). sched:sched_process_exit removes a thread's
 * tid, and a process's tgid when its thread group is dead (group_dead, KT_EXIT_GROUP_DEAD
 * where the kernel has that field; else when its main thread exits), so a reused pid is
 * not followed.
 */
#ifdef KT_FOLLOW
#ifndef KT_MAX_FOLLOW
#define KT_MAX_FOLLOW 16384
#endif
BPF_HASH(followed, u32, u8, KT_MAX_FOLLOW);

static __always_inline int kt_wanted(u32 pid)
{
	return pid == KT_PID || followed.lookup(&pid);
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
	u32 parent = bpf_get_current_pid_tgid() >> 32;   /* the forking task is current */
	u32 child = args->child_pid;
	u8 one = 1;

	if (kt_wanted(parent) && followed.update(&child, &one))
		kt_lost(KT_LOST_MAPS);
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
	u64 id = bpf_get_current_pid_tgid();   /* the exiting task is current */
	u32 tgid = id >> 32, tid = (u32)id;

	if (tid != tgid)
		followed.delete(&tid);
#ifdef KT_EXIT_GROUP_DEAD
	if (args->group_dead)
		followed.delete(&tgid);
#else
	else
		followed.delete(&tgid);
#endif
	return 0;
}
#else
static __always_inline int kt_wanted(u32 pid)
{
	return !KT_PID || pid == KT_PID;
}
#endif

#define KT_SELF()                                                   \
	u64 id = bpf_get_current_pid_tgid();                            \
	u32 pid = id >> 32, tid = (u32)id;                              \
	if (!kt_wanted(pid))                                            \
		return 0

#ifndef KT_NO_PUSH
#ifdef KT_PUSH_SLOTS
static __always_inline u32 kt_slot_of(u64 ring_ptr)
{
	return (u32)((ring_ptr * 0x9E3779B97F4A7C15ULL) >> (64 - KT_PUSH_SLOT_BITS));
}

/* The slot for the ring at ring_ptr (whoever owns it) and the vCPU-creation epoch now;
 * 0 when a lookup fails. */
static __always_inline struct kt_push_slot *kt_slot(u64 ring_ptr, u32 *epoch)
{
	u32 h = kt_slot_of(ring_ptr), zero = 0;
	struct kt_push_slot *s = push_slots.lookup(&h);
	u32 *e = vcpu_epoch.lookup(&zero);

	if (!s || !e)
		return 0;
	*epoch = *e;
	return s;
}

/* The slot of the ring at ring_ptr if the ring owns it (claim checked since the last
 * vCPU creation), else 0. */
static __always_inline struct kt_push_slot *kt_owned_slot(u64 ring_ptr)
{
	u32 epoch;
	struct kt_push_slot *s = kt_slot(ring_ptr, &epoch);

	if (!s || s->ptr != ring_ptr || s->epoch != epoch)
		return 0;
	return s;
}

/* Count a push of the ring at ring_ptr in its slot if the ring owns it: 1 done, 0 not. */
static __always_inline int kt_push_fast(u64 ring_ptr)
{
	struct kt_push_slot *s = kt_owned_slot(ring_ptr);

	if (!s)
		return 0;
	s->pushes++;   /* a ring's pushes run one at a time, on its vCPU's thread */
	return 1;
}

/* Take slot s's seqlock (seq even -> odd with a compare-and-swap): 1 taken, 0 busy. */
static __always_inline int kt_slot_lock(struct kt_push_slot *s)
{
	u64 seq = s->seq;

	return !(seq & 1) && __sync_val_compare_and_swap(&s->seq, seq, seq + 1) == seq;
}

static __always_inline void kt_slot_unlock(struct kt_push_slot *s)
{
	__sync_fetch_and_add(&s->seq, 1);
}

/*
 * After a push of ring (key, dirty) at ring_ptr took the hash-map path: claim its slot if
 * free; if the ring owns it but a vCPU was created since the claim, check that it is the
 * same ring (its dirty_index went on from the slot's) or else a new ring at a freed one's
 * address, whose slot counts move to the old ring's row before the slot is taken over.
 * A slot owned by another address stays with it (that ring takes the hash-map path).
 * Claims and folds run under the slot's seqlock (a busy slot: try at the next push), so a
 * snapshot that sees the same even seq before and after reading the rows saw neither.
 */
static __always_inline void kt_push_claim(u64 ring_ptr, u32 pid, s32 vm, s32 index, u32 dirty,
					  u32 gen)
{
	u32 epoch;
	struct kt_push_slot *s = kt_slot(ring_ptr, &epoch);

	if (!s)
		return;
	if (s->ptr == ring_ptr && dirty == s->dirty0 + (u32)s->pushes + 1) {
		/* the same ring: keep counting here (this push is in its row) */
		s->dirty0 = dirty - (u32)s->pushes;
		s->epoch = epoch;
		return;
	}
	if ((s->ptr && s->ptr != ring_ptr) || !kt_slot_lock(s))
		return;
	if (s->ptr && s->ptr != ring_ptr) {   /* claimed meanwhile by another ring */
		kt_slot_unlock(s);
		return;
	}
	if (s->ptr == ring_ptr && s->pushes) {   /* a new ring where a freed one was */
		struct kt_ring_val *old = rings.lookup(&s->key);

		if (old) {
			__sync_fetch_and_add(&old->pushes, s->pushes);
			if (old->gen == s->gen &&
			    (s32)(s->dirty0 + (u32)s->pushes - old->dirty_index) > 0)
				old->dirty_index = s->dirty0 + (u32)s->pushes;
		}
	}
	s->ptr = ring_ptr;
	s->pushes = 0;
	s->dirty0 = dirty;
	s->key.pid = pid;
	s->key.vm = vm;
	s->key.ring = index;
	s->gen = gen;
	s->epoch = epoch;
	kt_slot_unlock(s);
}

/*
 * Not attached: user space runs it with BPF_PROG_TEST_RUN (kvmtrace/bpf/loader.py
 * Probes.forget()) to free slot args[0] of a ring that is gone, if the slot's seq is still
 * args[1] (the value user space read with the slot): a compare-and-delete, so a ring that
 * claimed the slot since keeps it. Returns 0 freed, 1 left alone.
 */
int kt_free_slot(struct bpf_raw_tracepoint_args *ctx)
{
	u32 h = (u32)ctx->args[0];
	u64 want = ctx->args[1];
	struct kt_push_slot *s = push_slots.lookup(&h);

	if (!s || (want & 1) || __sync_val_compare_and_swap(&s->seq, want, want + 1) != want)
		return 1;
	s->ptr = 0;
	s->pushes = 0;
	s->dirty0 = 0;
	s->key.pid = 0;
	s->key.vm = 0;
	s->key.ring = 0;
	s->gen = 0;
	s->epoch = 0;
	kt_slot_unlock(s);
	return 0;
}
#endif

/* The vm (-1 unknown) of a push of ring index at ring_ptr on thread tid. */
static __always_inline s32 kt_push_vm(u32 pid, u32 tid, s32 index, u32 dirty, u64 ring_ptr)
{
#ifdef KT_FAST_VM
	struct kt_push_slot *s = kt_owned_slot(ring_ptr);

	if (s) {   /* the ring's slot names it */
		s->pushes++;
		return s->key.vm;
	}
#endif
	s32 vm = -1;
#if KT_VM_PTR && KT_RAW_PUSH
	vm = kt_kvm_vm(pid, kt_ring_kvm(ring_ptr));
#endif
#if !(KT_VM_PTR && KT_RAW_PUSH && KT_RAW_EXIT)
	/* the thread's ring for a tracepoint exit (which names no ring); its vm if need be */
	struct kt_tid *t = kt_thread(tid);

	if (t) {
#if !(KT_VM_PTR && KT_RAW_PUSH)
		vm = t->vm;
#endif
		t->ring = index;
	}
#endif
#ifdef KT_FAST_VM
	kt_push_claim(ring_ptr, pid, vm, index, dirty, 0);
#endif
	return vm;
}

static __always_inline int kt_on_push(s32 index, u32 dirty, u32 reset, u32 slot, u64 offset,
				      u32 size, u64 ring_ptr)
{
	KT_SELF();
	u64 now = KT_EVENT_NOW();
	s32 vm = kt_push_vm(pid, tid, index, dirty, ring_ptr);
#ifdef KT_AGGREGATE
	struct kt_ring_val *v = kt_ring(pid, vm, index, reset, size);

	if (v) {
		u32 used = dirty - reset;

		if (!v->pushes && !v->resets) {  /* first push: a ring first seen at an exit */
			v->reset_base = reset;
			v->reset_dirty = dirty - 1;
		}
		if (dirty == 1 && v->pushes) {   /* a new ring under a reused VM fd */
			v->gen++;
			v->reset_base = reset;
			v->reset_dirty = 0;
			v->size = size ? size : kt_vm_entries(pid, vm);
		}
		__sync_fetch_and_add(&v->pushes, 1);
		v->dirty_index = dirty;
		v->reset_index = reset;
		if (used > v->max_used)
			v->max_used = used;
		if (size)
			v->size = size;
	}
#ifdef KT_FAST_PUSH
	if (v)
		kt_push_claim(ring_ptr, pid, vm, index, dirty, v->gen);
#endif
#endif
	kt_emit(KT_PUSH, now, pid, tid, vm, index, dirty, reset, slot, offset);
	return 0;
}
#endif /* !KT_NO_PUSH */

/* kvm: the ring's struct kvm * (raw tracepoint with KT_VM_PTR), else 0 */
static __always_inline int kt_on_reset(s32 index, u32 dirty, u32 reset, u32 size, u64 kvm)
{
	KT_SELF();
	u64 now = KT_EVENT_NOW();
	s32 vm = -1;
	struct kt_tid *t = tids.lookup(&tid);
	int in_ioctl = t && t->pend_cmd == KT_KVM_RESET_RINGS;

#if KT_VM_PTR
	if (kvm && in_ioctl)
		vm = kt_kvm_vm_at(pid, kvm, t->pend_fd);
	else if (kvm)
		vm = kt_kvm_vm(pid, kvm);
	else
#endif
	if (in_ioctl)
		vm = t->pend_vm;
#ifdef KT_AGGREGATE
	/*
	 * A ring first seen here: its reset_index before this reset is unknown, unless the
	 * ring's pushes were counted under vm = -1 (a VM older than the probes).
	 */
	struct kt_ring_key key = { .pid = pid, .vm = vm, .ring = index };
	u32 base = reset;

	if (vm >= 0 && !rings.lookup(&key)) {
		struct kt_ring_key anon = { .pid = pid, .vm = -1, .ring = index };
		struct kt_ring_val *a = rings.lookup(&anon);

		if (a)
			base = a->reset_index;
		else if (kt_vm_entries(pid, vm))   /* VM created while tracing: from index 0 */
			base = 0;
	}
	struct kt_ring_val *v = kt_ring(pid, vm, index, base, size);

	if (v) {
#ifdef KT_NO_PUSH
		/* first reset of a VM created before tracing: its earlier pushes are unknown */
		kt_light_reset(v, dirty, !v->resets && !kt_vm_entries(pid, vm));
#else
		kt_full_reset(v, dirty, !v->resets && !v->pushes);
#endif
		kt_stuck_reset(v, dirty, reset);
		u32 advance = reset - v->reset_base;

		v->reset_base = reset;
		__sync_fetch_and_add(&v->resets, 1);
		__sync_fetch_and_add(&v->entries_reset, advance);
		v->dirty_index = dirty;
		v->reset_index = reset;
		if (size)
			v->size = size;
	}
#endif
	kt_emit(KT_RESET, now, pid, tid, vm, index, dirty, reset, 0, 0);
	return 0;
}

/* exact: dirty/reset/index were read from the vCPU's ring (raw tracepoint); kvm: the
 * vCPU's struct kvm * (raw tracepoint with KT_VM_PTR), else 0. */
static __always_inline int kt_on_exit(s32 vcpu_id, int exact, s32 index, u32 dirty, u32 reset,
				      u64 kvm)
{
	KT_SELF();
	u64 now = KT_EVENT_NOW();
	s32 vm = -1;

#if KT_VM_PTR
	if (kvm)   /* before the thread's entry: the verifier checks the fd walk on one path */
		vm = kt_kvm_vm(pid, kvm);
#endif
	struct kt_tid *t = kvm ? kt_thread(tid) : tids.lookup(&tid);

#if KT_VM_PTR
	if (kvm) {
		if (t)
			t->vm = vm;   /* the stall that follows is this VM's (kt_stall_end) */
	} else
#endif
	if (t)
		vm = t->vm;
	/*
	 * Not exact: the ring this thread last pushed to, else (light mode, no push probe)
	 * vcpu_id: kvm_vm_ioctl_create_vcpu() passes the vCPU id to kvm_dirty_ring_alloc() as
	 * the ring's index, so both agree (the built-in VMM and QEMU alike).
	 */
	if (!exact)
		index = (t && t->ring >= 0) ? t->ring : vcpu_id;
	if (t)
		t->ring = index;   /* the stall that follows is this ring's (kt_stall_end) */
#ifdef KT_AGGREGATE
	struct kt_ring_val *v = kt_ring(pid, vm, index, reset, 0);

	if (v) {
		if (!exact) {
			dirty = v->dirty_index;
			reset = v->reset_index;
		}
		u32 used = dirty - reset;
#ifdef KT_NO_PUSH
		if (!exact)
			used = 0;   /* indices of the last reset, not of now: no size inference */
#endif

		__sync_fetch_and_add(&v->soft_full_exits, 1);
		v->stuck_exits++;   /* zeroed by a reset that moves reset_index (kt_stuck_reset) */
		if (used && (!v->exit_used_min || used < v->exit_used_min))
			v->exit_used_min = used;
	}
#endif
	kt_emit(KT_EXIT, now, pid, tid, vm, index, dirty, reset, vcpu_id, 0);
	return 0;
}

static __always_inline int kt_on_userspace_exit(u32 reason, int err)
{
	if (reason != KT_EXIT_RING_FULL || err < 0)
		return 0;
	KT_SELF();
	struct kt_tid *t = kt_thread(tid);

	if (t)
		t->stall_ts = bpf_ktime_get_ns();
	return 0;
}

#ifdef KT_NO_PUSH
/* light mode: kvm_dirty_ring_push is not hooked */
#elif KT_RAW_PUSH
RAW_TRACEPOINT_PROBE(kvm_dirty_ring_push)
{
	/* TP_PROTO(struct kvm_dirty_ring *ring, u32 slot, u64 offset) */
#ifdef KT_FAST_PUSH
#if KT_PID
	u32 me = bpf_get_current_pid_tgid() >> 32;

	if (!kt_wanted(me))
		return 0;
#endif
	if (kt_push_fast(ctx->args[0]))
		return 0;
#endif
	u64 r[(KT_OFF_RING_SPAN + 7) / 8] = {};   /* 8-aligned copy of the ring's head */

	bpf_probe_read_kernel(r, sizeof(r), (void *)ctx->args[0]);
	return kt_on_push((s32)KT_U32(r, KT_OFF_RING_INDEX), KT_U32(r, KT_OFF_RING_DIRTY),
			  KT_U32(r, KT_OFF_RING_RESET), (u32)ctx->args[1], ctx->args[2],
			  KT_U32(r, KT_OFF_RING_SIZE), ctx->args[0]);
}
#else
TRACEPOINT_PROBE(kvm, kvm_dirty_ring_push)
{
	return kt_on_push(args->index, args->dirty_index, args->reset_index, args->slot,
			  args->offset, 0, 0);
}
#endif

#if KT_RAW_RESET
RAW_TRACEPOINT_PROBE(kvm_dirty_ring_reset)
{
	/* TP_PROTO(struct kvm_dirty_ring *ring) */
	u64 r[(KT_OFF_RING_SPAN + 7) / 8] = {};   /* 8-aligned copy of the ring's head */

	bpf_probe_read_kernel(r, sizeof(r), (void *)ctx->args[0]);
#if KT_VM_PTR
	u64 kvm = kt_ring_kvm(ctx->args[0]);
#else
	u64 kvm = 0;
#endif
	return kt_on_reset((s32)KT_U32(r, KT_OFF_RING_INDEX), KT_U32(r, KT_OFF_RING_DIRTY),
			   KT_U32(r, KT_OFF_RING_RESET), KT_U32(r, KT_OFF_RING_SIZE), kvm);
}
#else
TRACEPOINT_PROBE(kvm, kvm_dirty_ring_reset)
{
	return kt_on_reset(args->index, args->dirty_index, args->reset_index, 0, 0);
}
#endif

#if KT_RAW_EXIT
RAW_TRACEPOINT_PROBE(kvm_dirty_ring_exit)
{
	/* TP_PROTO(struct kvm_vcpu *vcpu) */
	u64 r[(KT_OFF_RING_SPAN + 7) / 8] = {};   /* 8-aligned copy of the ring's head */
	s32 vcpu_id = -1;
	void *vcpu = (void *)ctx->args[0];

	bpf_probe_read_kernel(&vcpu_id, sizeof(vcpu_id), vcpu + KT_OFF_VCPU_ID);
	bpf_probe_read_kernel(r, sizeof(r), vcpu + KT_OFF_VCPU_RING);
#if KT_VM_PTR
	u64 kvm = kt_read_ptr((u64)vcpu + KT_OFF_VCPU_KVM);
#else
	u64 kvm = 0;
#endif
	return kt_on_exit(vcpu_id, 1, (s32)KT_U32(r, KT_OFF_RING_INDEX),
			  KT_U32(r, KT_OFF_RING_DIRTY), KT_U32(r, KT_OFF_RING_RESET), kvm);
}
#else
TRACEPOINT_PROBE(kvm, kvm_dirty_ring_exit)
{
	return kt_on_exit(args->vcpu_id, 0, -1, 0, 0, 0);
}
#endif

#if KT_RAW_UEXIT
RAW_TRACEPOINT_PROBE(kvm_userspace_exit)
{
	/* TP_PROTO(__u32 reason, int errno) */
	return kt_on_userspace_exit((u32)ctx->args[0], (int)ctx->args[1]);
}
#else
TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
	return kt_on_userspace_exit(args->reason, args->errno);
}
#endif

/* KVM_RUN ends a pending stall: account it to the ring the thread last pushed to. */
static __always_inline void kt_stall_end(u64 now, u32 pid, u32 tid, struct kt_tid *t)
{
	u64 ns = now - t->stall_ts;

	t->stall_ts = 0;
#ifdef KT_AGGREGATE
	struct kt_ring_key key = { .pid = pid, .vm = t->vm, .ring = t->ring };
	struct kt_ring_val *v = rings.lookup(&key);

	if (v) {
		__sync_fetch_and_add(&v->stalls, 1);
		__sync_fetch_and_add(&v->stall_ns, ns);
		__sync_fetch_and_add(&v->stall_hist[kt_bucket(ns)], 1);
	}
#endif
	kt_emit(KT_STALL, now, pid, tid, t->vm, t->ring, 0, 0, 0, ns);
}

TRACEPOINT_PROBE(syscalls, sys_enter_ioctl)
{
	u32 cmd = args->cmd;

	if (cmd != KT_KVM_RUN && cmd != KT_KVM_CREATE_VCPU && cmd != KT_KVM_RESET_RINGS &&
	    cmd != KT_KVM_ENABLE_CAP && cmd != KT_KVM_CREATE_VM)
		return 0;
	KT_SELF();
	s32 fd = args->fd;
	u64 now = bpf_ktime_get_ns();
	struct kt_tid *t = kt_thread(tid);

	if (!t)
		return 0;
	if (cmd == KT_KVM_RUN) {
		struct kt_vcpu_key vk = { .pid = pid, .fd = fd };
		struct kt_vcpu_val *vc = vcpus.lookup(&vk);

		if (t->stall_ts)   /* the stall of the previous run, under its vm */
			kt_stall_end(now, pid, tid, t);
		if (vc) {
			t->vm = vc->vm;
			return 0;
		}
#if KT_VM_PTR
		/* a vCPU created before tracing: its fd's file is the struct kvm_vcpu */
		u64 vcpu = kt_fd_private(fd, KT_VCPU_IOCTL);

		if (vcpu) {
			struct kt_vcpu_val nv = { .vcpu_id = (u32)-1 };

			bpf_probe_read_kernel(&nv.vcpu_id, sizeof(nv.vcpu_id),
					      (void *)(vcpu + KT_OFF_VCPU_ID));
			nv.vm = kt_kvm_vm(pid, kt_read_ptr(vcpu + KT_OFF_VCPU_KVM));
			t->vm = nv.vm;
			if (vcpus.update(&vk, &nv))
				kt_lost(KT_LOST_MAPS);
		}
#endif
		return 0;
	}
	if (cmd == KT_KVM_ENABLE_CAP) {
		u32 cap = 0;
		u64 bytes = 0;
		void *arg = (void *)args->arg;

		/* struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ... } */
		bpf_probe_read_user(&cap, sizeof(cap), arg);
		bpf_probe_read_user(&bytes, sizeof(bytes), arg + 8);
		if (cap != KT_CAP_RING && cap != KT_CAP_RING_ACQ_REL)
			return 0;
		t->pend_vm = kt_fd_vm(pid, fd);
		t->pend_cap = cap;
		t->pend_val = bytes;
	} else if (cmd == KT_KVM_CREATE_VCPU) {
		t->pend_val = args->arg;
		t->pend_vm = kt_fd_vm(pid, fd);
#ifdef KT_PUSH_SLOTS
		u32 zero = 0;
		u32 *epoch = vcpu_epoch.lookup(&zero);

		if (epoch)   /* before the new vCPU's ring exists */
			__sync_fetch_and_add(epoch, 1);
#endif
	}
	if (cmd == KT_KVM_RESET_RINGS)
		t->pend_vm = kt_fd_vm(pid, fd);
	t->pend_cmd = cmd;
	t->pend_fd = fd;
	t->pend_ts = now;
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_ioctl)
{
	KT_SELF();
	struct kt_tid *t = tids.lookup(&tid);

	if (!t || !t->pend_cmd)
		return 0;
	u32 cmd = t->pend_cmd;
	s64 ret = args->ret;
	u64 now = bpf_ktime_get_ns();

	t->pend_cmd = 0;
	if (cmd == KT_KVM_CREATE_VCPU) {
		if (ret < 0)
			return 0;
		struct kt_vcpu_key vk = { .pid = pid, .fd = (s32)ret };
		struct kt_vcpu_val vc = { .vm = t->pend_vm, .vcpu_id = (u32)t->pend_val };

		if (vcpus.update(&vk, &vc))
			kt_lost(KT_LOST_MAPS);
		struct kt_vm_val *v = kt_vm(pid, t->pend_vm);

		if (v)
			__sync_fetch_and_add(&v->vcpus, 1);
	} else if (cmd == KT_KVM_ENABLE_CAP) {
		if (ret != 0)
			return 0;
		struct kt_vm_val *v = kt_vm(pid, t->pend_vm);

		if (v) {
			v->ring_bytes = t->pend_val;
			v->cap = t->pend_cap;
		}
		kt_emit(KT_RING_SIZE, now, pid, tid, t->pend_vm, -1, 0, 0, t->pend_cap,
			t->pend_val);
	} else if (cmd == KT_KVM_RESET_RINGS) {
		u64 ns = now - t->pend_ts;
#ifdef KT_AGGREGATE
		struct kt_vm_val *v = kt_vm(pid, t->pend_vm);

		if (v) {
			__sync_fetch_and_add(&v->reset_ioctls, 1);
			__sync_fetch_and_add(&v->reset_ns, ns);
			if (ret > 0)
				__sync_fetch_and_add(&v->reset_entries, ret);
			__sync_fetch_and_add(&v->reset_lat_hist[kt_bucket(ns)], 1);
		}
#endif
		kt_emit(KT_RESET_LAT, now, pid, tid, t->pend_vm, -1, 0, 0, 0, ns);
	} else if (cmd == KT_KVM_CREATE_VM) {
		if (ret < 0)
			return 0;
#if KT_VM_PTR
		/* a new VM, maybe where a freed one was (address and fd): name it now */
		u64 kvm = kt_fd_private((s32)ret, KT_VM_IOCTL);
		s32 vm = kt_vm_gen(pid, (s32)ret, kvm, 1);

		if (kvm)
			kt_kvm_set(pid, kvm, vm);
#else
		kt_vm_gen(pid, (s32)ret, 0, 1);
#endif
	}
	return 0;
}
