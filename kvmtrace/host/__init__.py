"""host (floor 1): facts about the running kernel and the ways to ask it.

- :mod:`.doctor`: the preflight checks of ``kvmtrace doctor``.
- :mod:`.features`: which BPF program types and hooks the kernel accepts.
- :mod:`.bpf_syscall`: the one ``bpf(2)`` shim (typed ``union bpf_attr`` members).
- :mod:`.perf_event`: attach a BPF program to a tracepoint (perf_event_open + SET_BPF).
- :mod:`.tracefs`: the mount and the dirty-ring tracepoints' formats.
- :mod:`.btf`: struct member offsets from /sys/kernel/btf/vmlinux.
- :mod:`.headers`: kernel headers for bcc.
- :mod:`.kallsyms`: kernel symbol addresses.
- :mod:`.kvm`: KVM ioctls (numbers, structs, /dev/kvm, dirty-ring caps).
- :mod:`.child`: run ``-- COMMAND`` held before exec until the tracer is attached.
- :mod:`.outfile`: every file kvmtrace writes: 0600, O_EXCL|O_NOFOLLOW, atomic rename,
  never over an input or through a symlink.
"""
