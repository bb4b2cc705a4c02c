"""Kernel symbol addresses from /proc/kallsyms (root sees them unless kernel.kptr_restrict=2).

The probes compare a file's ``f_op->unlocked_ioctl`` with ``kvm_vm_ioctl`` and
``kvm_vcpu_ioctl`` (virt/kvm/kvm_main.c) to tell a VM or vCPU file from any other: the
``file_operations`` structs themselves (``kvm_vm_fops``) are data symbols, listed only with
CONFIG_KALLSYMS_ALL, while functions always are.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["KALLSYMS", "addresses"]

KALLSYMS = Path("/proc/kallsyms")


def addresses(names: set[str], path: Path = KALLSYMS) -> dict[str, int]:
    """name -> address of the named symbols (of vmlinux or of a module such as kvm.ko; the
    first one listed wins); names missing or hidden (address 0) are left out."""
    out: dict[str, int] = {}
    want = set(names)
    try:
        with path.open() as f:
            for line in f:
                parts = line.split()
                # "ADDR TYPE NAME" for vmlinux, "ADDR TYPE NAME [module]" for modules
                if len(parts) < 3 or parts[2] not in want:
                    continue
                addr = int(parts[0], 16)
                if addr and parts[2] not in out:
                    out[parts[2]] = addr
                if len(out) == len(want):
                    break
    except OSError:
        return {}
    return out
