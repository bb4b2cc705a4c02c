"""VM names: which VMM a process is and what it calls its VM, from ``/proc/PID/cmdline``.

One resolver for live views and recordings (pid -> :class:`~kvmtrace.core.counters.VmName`).
The VMM kinds and where each puts the VM's name on its command line:

- ``qemu``: ``-name NAME`` or ``-name guest=NAME[,debug-threads=on,...]`` (QEMU's option
  syntax: fields split by ``,``; a literal comma is written ``,,``; ``--name`` and
  ``-name=`` work too).
- ``libvirt``: QEMU started by libvirt, which passes ``-name guest=DOMAIN,debug-threads=on``
  and paths under a ``libvirt`` directory (its per-domain files); the name is the domain.
- ``firecracker``: ``--id ID`` (the jailer execs firecracker with the same ``--id``).
- ``cloud-hypervisor``: it has no name option; ``--api-socket path=FILE`` (or a bare
  ``FILE``) names the VM by its socket file, without the ``-socket``/``.sock``/``.socket``
  suffix libvirt's ch driver and users add (``fd=N`` names nothing).
- ``kvmtrace``: the built-in VMM, ``kvmtrace workload --name NAME`` (also run as
  ``python -m kvmtrace workload``).

Any other process: kind None, name None; its ``comm`` is still reported. A process gone
(or a zombie) before it was asked: every field empty, never an error.

The kernel keeps argv and comm as bytes, in no particular encoding: a byte that is not
UTF-8 is shown as a ``\\xNN`` escape (:func:`decode`), so a VMM named ``b"vmm\\xff"`` is
``"vmm\\xff"`` in every view, JSON and recording, and never an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..core.counters import VmName

__all__ = ["VMM_KINDS", "decode", "cmdline", "comm", "parse_argv", "vm_name", "resolve"]

#: the VMM kinds :func:`parse_argv` reports
VMM_KINDS = ("qemu", "libvirt", "firecracker", "cloud-hypervisor", "kvmtrace")

PROC = Path("/proc")


def decode(raw: bytes) -> str:
    """Text of bytes from /proc: UTF-8, any other byte as a ``\\xNN`` escape."""
    return raw.decode("utf-8", errors="backslashreplace")


def cmdline(pid: int) -> list[str]:
    """argv of ``pid`` from ``/proc/PID/cmdline`` (empty if the process is gone)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [decode(a) for a in raw.split(b"\0") if a]


def comm(pid: int) -> str:
    """``/proc/PID/comm`` ("" if the process is gone)."""
    try:
        return decode((PROC / str(pid) / "comm").read_bytes()).strip()
    except OSError:
        return ""


def _opt(argv: list[str], *names: str) -> str | None:
    """Value of the first ``NAME VALUE`` or ``NAME=VALUE`` among names."""
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    return None


def _qemu_name(value: str) -> str | None:
    fields = [f.replace("\0", ",") for f in value.replace(",,", "\0").split(",")]
    for f in fields:
        if f.startswith("guest="):
            return f[len("guest=") :] or None
    return fields[0] if fields and fields[0] and "=" not in fields[0] else None


def _ch_name(value: str) -> str | None:
    parts = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
    if "path" in parts:
        path = parts["path"]
    elif parts:  # fd=N: no file, no name
        return None
    else:
        path = value
    base = os.path.basename(path)
    for suffix in ("-socket", ".sock", ".socket"):
        base = base.removesuffix(suffix)
    return base or None


def _is_kvmtrace_workload(argv: list[str]) -> bool:
    """The first ``kvmtrace`` word (the program, or ``-m kvmtrace``) runs ``workload``: not
    ``kvmtrace record -- kvmtrace workload``, the recorder."""
    for i, arg in enumerate(argv[:-1]):
        if os.path.basename(arg) == "kvmtrace":
            return argv[i + 1] == "workload"
    return False


def parse_argv(argv: list[str]) -> tuple[str | None, str | None]:
    """(VMM kind, VM name) from a command line; (None, None) for anything else."""
    if not argv:
        return None, None
    prog = os.path.basename(argv[0])
    if _is_kvmtrace_workload(argv):
        return "kvmtrace", _opt(argv, "--name") or None
    if "firecracker" in prog:
        return "firecracker", _opt(argv, "--id") or None
    if "cloud-hypervisor" in prog:
        sock = _opt(argv, "--api-socket")
        return "cloud-hypervisor", _ch_name(sock) if sock else None
    if "qemu" in prog or "-name" in argv:
        value = _opt(argv, "-name", "--name")
        name = _qemu_name(value) if value else None
        libvirt = any("/libvirt/" in a for a in argv)
        return ("libvirt" if libvirt else "qemu"), name
    return None, None


def vm_name(argv: list[str]) -> str | None:
    """The VM's name from a VMM command line, or None."""
    return parse_argv(argv)[1]


def resolve(pid: int) -> VmName:
    """What ``/proc/PID`` says of process ``pid``: VMM kind, VM name and ``comm`` (the
    kernel's 15-byte task name). All empty once the process is gone, and also while it
    is a zombie (exited, not yet reaped: the kernel then shows an empty cmdline), so an
    empty ``comm`` always means "ask earlier next time", never "a VMM without a name"."""
    argv = cmdline(pid)
    if not argv:
        return VmName()
    vmm, name = parse_argv(argv)
    return VmName(vmm=vmm, name=name, comm=comm(pid))
