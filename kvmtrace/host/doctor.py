"""Preflight: is this host ready for kvmtrace? One :class:`Check` per requirement.

Each check says ok or not, what was found, and the exact command that fixes it. Checks
marked ``required=False`` describe optional extras (kprobes, fentry, perf) that add detail
on kernels that have them; kvmtrace works without them.

Run by a user who is not root, the checks only root can make (tracefs is mode 0700, and
/dev/kvm often 0600; BPF programs load for root only) are reported ``checked=False``
("unknown") rather than missing, so the one thing wrong is said once: not root.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ..core.kvm_abi import entries_from_bytes
from ..errors import MissingFeature
from . import features, headers, tracefs

__all__ = ["Check", "run_checks", "ready"]

SETUP_FIX = "run tools/setup.sh as root"
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225  # Linux 6.3+, arm64 (needs a bitmap as well)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True
    #: False: only root can tell (the user is not root); ``ok`` is then False
    checked: bool = True

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _is_root() -> bool:
    return os.geteuid() == 0


def _unknown(name: str, what: str, required: bool = True) -> Check:
    """A check only root can make, for a user who is not root."""
    return Check(name, False, f"{what}; run as root to check", required=required,
                 checked=False)


def _root() -> Check:
    ok = _is_root()
    return Check("root", ok, "euid 0" if ok else
                 f"euid {os.geteuid()}: BPF programs and tracefs (mode 0700) need root",
                 "run it as root: sudo kvmtrace ...")


def _mounted_tracefs() -> str | None:
    """A tracefs mount point from /proc/self/mounts (readable by anyone), or None."""
    try:
        with open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "tracefs":
            return parts[1]
    return None


def _kvm() -> list[Check]:
    from . import kvm as k
    from .kvm import open_kvm, probe_ring_caps

    ring_fix = "a kernel with KVM_CAP_DIRTY_LOG_RING (Linux 5.11+ on x86)"
    try:
        fd = open_kvm()
    except MissingFeature as err:
        if not _is_root() and os.path.exists(k.KVM_DEV) and not os.access(k.KVM_DEV, os.W_OK):
            return [_unknown("/dev/kvm", f"{k.KVM_DEV} present, root only"),
                    _unknown("dirty ring", f"{k.KVM_DEV} root only")]
        return [
            Check("/dev/kvm", False, err.message, err.fix or ""),
            Check("dirty ring", False, "no /dev/kvm", ring_fix),
        ]
    try:
        api = k.ioctl(fd, k.KVM_GET_API_VERSION)
        caps = probe_ring_caps(fd)
        plain = k.ioctl(fd, k.KVM_CHECK_EXTENSION, k.KVM_CAP_DIRTY_LOG_RING)
        bitmap = k.ioctl(fd, k.KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
    finally:
        os.close(fd)
    checks = [Check("/dev/kvm", api == 12, f"API version {api}", "a KVM with API version 12")]
    if caps.max_bytes:
        detail = (
            f"max {caps.max_bytes} bytes ({entries_from_bytes(caps.max_bytes)} entries); "
            f"plain {'yes' if plain else 'no'}, "
            f"ACQ_REL {'yes' if caps.cap == k.KVM_CAP_DIRTY_LOG_RING_ACQ_REL else 'no'}, "
            f"WITH_BITMAP {'yes' if bitmap else 'no'}"
        )
        checks.append(Check("dirty ring", True, detail))
    else:
        checks.append(Check("dirty ring", False, "KVM_CAP_DIRTY_LOG_RING not offered", ring_fix))
    return checks


def _tracefs() -> list[Check]:
    root = tracefs.find_tracefs()
    mount = _mounted_tracefs()
    if root is None and mount is not None and not _is_root():  # mounted, root only
        checks = [Check("tracefs", True, f"{mount} (mounted; root only)")]
        return checks + [_unknown(f"{system}:{name}", "tracefs is root only")
                         for system, name in tracefs.DIRTY_RING_EVENTS]
    checks = [
        Check(
            "tracefs",
            root is not None,
            str(root) if root else "not mounted",
            tracefs.MOUNT_FIX,
        )
    ]
    for system, name in tracefs.DIRTY_RING_EVENTS:
        present = root is not None and tracefs.has_event(system, name, root)
        if root is None:
            detail = "tracefs not mounted"
        else:
            detail = "present" if present else "missing"
        fix = tracefs.MOUNT_FIX if root is None else "a kernel with this tracepoint (5.11+)"
        checks.append(Check(f"{system}:{name}", present, detail, fix))
    return checks


def _bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except ImportError as err:
        return Check("bcc", False, f"import failed: {err}", "apt-get install python3-bpfcc")
    version = getattr(bcc, "__version__", "?")
    return Check("bcc", True, f"version {version}")


def _headers() -> Check:
    found = headers.find_headers()
    if found is None:
        return Check("kernel headers", False, "none for " + os.uname().release, SETUP_FIX)
    how = {
        "system": "matching distribution headers",
        "env": "BCC_KERNEL_SOURCE",
        "fallback": "generic distribution headers, private tree",
    }[found.how]
    return Check("kernel headers", True, f"{found.path} ({how})")


def _btf(present: bool) -> Check:
    return Check("BTF", present, "/sys/kernel/btf/vmlinux" if present else "missing",
                 "CONFIG_DEBUG_INFO_BTF=y (needed for raw tracepoints only)", required=False)


def _features() -> list[Check]:
    if not _is_root():  # probing loads BPF programs: root only
        unknown = [_unknown(name, "BPF programs load for root only", required=False)
                   for name in ("raw tracepoints", "kprobes", "fentry/fexit")]
        return [unknown[0], _btf(os.path.exists("/sys/kernel/btf/vmlinux")), *unknown[1:]]
    f = features.detect()
    return [
        Check(
            "raw tracepoints",
            f.raw_tracepoint,
            "BPF_PROG_TYPE_RAW_TRACEPOINT loads" if f.raw_tracepoint else "unavailable",
            "none needed: kvmtrace falls back to tracepoints",
            required=False,
        ),
        _btf(f.btf),
        Check(
            "kprobes",
            f.kprobes,
            "available" if f.kprobes else "CONFIG_KPROBES off",
            "optional extra detail only",
            required=False,
        ),
        Check(
            "fentry/fexit",
            f.fentry,
            "available" if f.fentry else "tracing programs refused",
            "optional extra detail only",
            required=False,
        ),
    ]


def _perf() -> Check:
    path = shutil.which("perf")
    return Check(
        "perf",
        path is not None,
        path or "not installed",
        "apt-get install linux-perf (a peer for cross-checks)",
        required=False,
    )


CHECKS: tuple[Callable[[], Check | list[Check]], ...] = (
    _root,
    _kvm,
    _tracefs,
    _bcc,
    _headers,
    _features,
    _perf,
)


def run_checks() -> list[Check]:
    out: list[Check] = []
    for check in CHECKS:
        result = check()
        out.extend(result if isinstance(result, list) else [result])
    return out


def ready(checks: list[Check]) -> bool:
    """True when every required check passed."""
    return all(c.ok for c in checks if c.required)
