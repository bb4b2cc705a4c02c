"""tracefs: where it is mounted and what the dirty-ring tracepoints look like.

Field layouts are always read from ``events/<system>/<name>/format``, never hard-coded:
``kvm_dirty_ring_push`` gained ``dirty_index``/``reset_index`` fields over the versions, and
its TP_PROTO changed (Linux 5.11 introduced it; 6.x passes the ring pointer).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingFeature

__all__ = [
    "CANDIDATES",
    "DIRTY_RING_EVENTS",
    "MOUNT_FIX",
    "find_tracefs",
    "require_tracefs",
    "event_format",
    "has_event",
]

CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
MOUNT_FIX = "mount -t tracefs nodev /sys/kernel/tracing"

#: (system, event) kvmtrace hooks; the first three are the dirty ring's own.
DIRTY_RING_EVENTS = (
    ("kvm", "kvm_dirty_ring_push"),
    ("kvm", "kvm_dirty_ring_reset"),
    ("kvm", "kvm_dirty_ring_exit"),
    ("kvm", "kvm_userspace_exit"),
    ("syscalls", "sys_enter_ioctl"),
    ("syscalls", "sys_exit_ioctl"),
)


def find_tracefs() -> Path | None:
    """The mounted tracefs root, or None."""
    for root in CANDIDATES:
        try:
            if (root / "events").is_dir():
                return root
        except PermissionError:  # mounted, but only root may look (mode 0700)
            continue
    return None


def require_tracefs() -> Path:
    root = find_tracefs()
    if root is None:
        raise MissingFeature("tracefs is not mounted", MOUNT_FIX)
    return root


def has_event(system: str, name: str, root: Path | None = None) -> bool:
    root = root or find_tracefs()
    try:
        return root is not None and (root / "events" / system / name / "format").is_file()
    except PermissionError:
        return False


def event_format(system: str, name: str, root: Path | None = None) -> str:
    """The text of events/<system>/<name>/format."""
    root = root or require_tracefs()
    path = root / "events" / system / name / "format"
    try:
        return path.read_text()
    except FileNotFoundError:
        raise MissingFeature(
            f"tracepoint {system}:{name} is missing from {root}",
            "use a kernel with KVM dirty-ring tracepoints (Linux >= 5.11, CONFIG_KVM)",
        ) from None
