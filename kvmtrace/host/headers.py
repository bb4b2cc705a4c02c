"""Where bcc finds kernel headers for the running kernel.

bcc compiles the probes at load time. It looks in /lib/modules/$(uname -r)/build; on a
kernel whose distribution ships no matching headers, tools/setup.sh builds a private tree
of symlinks (the distribution's generic -common headers overlaid with its -amd64 ones) at
:data:`FALLBACK_ROOT`/<release>, and :func:`use_headers` points bcc there through
``BCC_KERNEL_SOURCE``. Tracepoint programs take their field layout from tracefs, so headers
of another kernel release are safe for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingFeature

__all__ = ["FALLBACK_ROOT", "Headers", "find_headers", "use_headers"]

FALLBACK_ROOT = Path("/var/lib/kvmtrace/kernel-headers")


@dataclass(frozen=True)
class Headers:
    path: Path
    how: str  # "system" (/lib/modules/R/build), "env" (BCC_KERNEL_SOURCE), "fallback"


def find_headers(release: str | None = None) -> Headers | None:
    release = release or os.uname().release
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env and Path(env, "include").is_dir():
        return Headers(Path(env), "env")
    system = Path("/lib/modules", release, "build")
    if (system / "include").is_dir():
        return Headers(system, "system")
    fallback = FALLBACK_ROOT / release
    if (fallback / "include").is_dir():
        return Headers(fallback, "fallback")
    return None


def use_headers() -> Headers:
    """Make bcc find headers (sets BCC_KERNEL_SOURCE for the fallback tree) or fail."""
    found = find_headers()
    if found is None:
        raise MissingFeature(
            f"no kernel headers for {os.uname().release}",
            "run tools/setup.sh (installs headers or builds the fallback tree)",
        )
    if found.how == "fallback":
        os.environ["BCC_KERNEL_SOURCE"] = str(found.path)
    return found
