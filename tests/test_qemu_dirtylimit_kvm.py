"""QEMU's dirty limit (``set-vcpu-dirty-limit``) traced: replay shows the throttle apart
from the soft-full stall, held to QEMU's own trace (kvmtrace.testing.qemu_dirtylimit).

QEMU (1 vCPU, ring of 4096 entries) runs the multiboot guest (16384 pages, an ``out``
every 16 writes: about 300 MB/s unthrottled) limited to 100 MB/s for 4 s while
``kvmtrace record -p`` runs. Per vCPU, against QEMU's ``kvm_dirty_ring_full`` and
``dirtylimit_vcpu_execute``: soft-full exits and stalls exactly, and stall by stall the
throttle after the vCPU's own reset (see ``dirty_limit_failures`` for the one case QEMU's
trace cannot decide: a sleep a signal cut short).
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import kvmtrace_cmd
from test_qemu_kvm import qemu_ok  # noqa: F401  (fixture)

from kvmtrace.source.recording import open_recording
from kvmtrace.testing.qemu import Qemu
from kvmtrace.testing.qemu_dirtylimit import dirty_limit_failures, record_dirty_limit
from kvmtrace.testing.qemu_trace import read_trace, trace_args
from kvmtrace.vmm.multiboot import MultibootGuest


@pytest.mark.kernel
def test_dirty_limit_throttle_apart_from_the_stall(tmp_path, qemu_ok):  # noqa: F811
    guest = MultibootGuest(vcpus=1, pages=16384, exit_every=16)
    log = tmp_path / "qemu-trace.log"
    with Qemu(guest, ring_entries=4096, name="kvmtrace-dirtylimit",
              extra_args=trace_args(log)) as qemu:
        qemu.wait_guest()
        run = record_dirty_limit(qemu, tmp_path / "limit.kvt", 100, 4.0)
    assert [a["limit-rate"] for a in run.answer] == [100]
    p = subprocess.run(kvmtrace_cmd("replay", "--json", str(run.path)), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    report = json.loads(p.stdout)
    qtrace = read_trace(log)
    assert len(qtrace.throttle_sleeps.get(0, [])) >= 3  # the limit throttled the vCPU
    events = open_recording(run.path).read_all()
    assert dirty_limit_failures(run, report, qtrace, events, 1) == []
    text = subprocess.run(kvmtrace_cmd("replay", str(run.path)), capture_output=True,
                          text=True, timeout=300).stdout
    assert "soft-full stalls: harvest vs after the reset (a dirty limit's throttle)" in text
