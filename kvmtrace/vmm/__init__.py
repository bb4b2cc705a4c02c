"""vmm (floor 2): the built-in VMM of ``kvmtrace workload``, the ground truth the tests
hold kvmtrace to. Its KVM ioctl layer is :mod:`kvmtrace.host.kvm`.

- :mod:`.guest`: the 32-bit guest program, assembled here; :mod:`.multiboot` the same loop
  as a multiboot ELF for QEMU (``-kernel``), every vCPU started by INIT/SIPI.
- :mod:`.traced`: the trace-driven guest of ``workload --replay FILE``: per vCPU, the
  (slot, offset) sequence one ring of a trace pushed, in memory slots with the trace's ids.
- :mod:`.vm`: VM and vCPU objects and :class:`~.vm.MappedRing`, the mmap'd view of a
  vCPU's kernel ring (ctypes ioctl + mmap).
- :mod:`.workload`: N VMs of M vCPU threads, harvested like a VMM; :mod:`.harvest` one
  VM's harvest, :mod:`.reset` what a KVM_RESET_DIRTY_RINGS did, :mod:`.helpers` the side
  threads (reset interrupter, vCPU migrator).
- :mod:`.truth`: the ground-truth report, :class:`~.truth.WorkloadResult` with one
  :class:`~.truth.RingTruth` per ring.
"""
