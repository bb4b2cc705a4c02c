"""Cycles of concurrent built-in VMs in one process, held before they start.

``python -m kvmtrace.testing.vm_cycles PLAN`` (PLAN: a JSON list of cycles, each a list of
:class:`~kvmtrace.vmm.workload.WorkloadConfig` field dicts) waits for one byte on stdin (so
a tracer can attach first), then runs each cycle's VMs together on threads, one cycle after
another (a later cycle's VMs reuse the fds of the earlier ones), and prints the VMs' ground
truths (``WorkloadResult.to_dict()``) as one JSON list (stdin at EOF starts it at once).
Used by the live-top and VM identity tests, ``tools/soak_top.py`` and
``tools/soak_identity.py``.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from typing import Any

from ..vmm.workload import WorkloadConfig, run_workload

__all__ = ["run_cycles", "main"]


def run_cycles(plan: list[list[dict[str, Any]]]) -> list[dict[str, Any] | None]:
    """Run every cycle of ``plan`` (its VMs at once); the ground truths in plan order
    (None for a VM whose thread failed: its traceback is on stderr)."""
    out: list[dict[str, Any] | None] = []
    for cycle in plan:
        res: list[dict[str, Any] | None] = [None] * len(cycle)

        def go(i: int, cfg: dict[str, Any], res: list[dict[str, Any] | None] = res) -> None:
            res[i] = run_workload(WorkloadConfig(**cfg)).to_dict()

        threads = [threading.Thread(target=go, args=(i, c)) for i, c in enumerate(cycle)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.extend(res)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    # vCPU threads are kicked out of KVM_RUN by SIGUSR1 from any thread
    signal.signal(signal.SIGUSR1, lambda *_: None)
    sys.stdin.buffer.read(1)
    print(json.dumps(run_cycles(json.loads(args[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
