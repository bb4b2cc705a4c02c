"""QEMU live migration traced: replay's iterations against QEMU's own ``query-migrate``.

QEMU (2 vCPUs, dirty ring of 4096 entries) runs the multiboot guest (each vCPU writes its
4096 pages over and over, an ``out`` every 16 writes) and migrates to ``exec:cat >
/dev/null`` at 32 MiB/s, too slow for the guest's dirty rate, so it iterates without
converging until the test raises ``downtime-limit``; ``pause-before-switchover`` stops it
once the VM is stopped, so ``query-migrate`` gives the exact count of live syncs
(``dirty-sync-count``), then the final count. QEMU writes its own trace (its syncs, the
entries each reap collected and its soft-full exits, with thread ids:
:mod:`kvmtrace.testing.qemu_trace`). ``kvmtrace record -p`` records throughout.
:func:`kvmtrace.testing.qemu_migrate.migration_failures` lists what it checks exactly.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import kvmtrace_cmd
from test_qemu_kvm import qemu_ok  # noqa: F401  (fixture)

from kvmtrace.core.events import Kind
from kvmtrace.source.recording import open_recording
from kvmtrace.testing.qemu import Qemu
from kvmtrace.testing.qemu_migrate import migration_failures, record_migration
from kvmtrace.testing.qemu_trace import read_trace, trace_args
from kvmtrace.vmm.multiboot import MultibootGuest

VCPUS, PAGES = 2, 4096


@pytest.mark.kernel
@pytest.mark.parametrize("attempt", range(2))
def test_migration_iterations_match_qemu(tmp_path, qemu_ok, attempt):  # noqa: F811
    guest = MultibootGuest(vcpus=VCPUS, pages=PAGES, exit_every=16)
    log = tmp_path / "qemu-trace.log"
    with Qemu(guest, ring_entries=4096, name="kvmtrace-migrate",
              extra_args=trace_args(log)) as qemu:
        qemu.wait_guest()
        run = record_migration(qemu, tmp_path / "mig.kvt")
    assert run.final["status"] == "completed"
    p = subprocess.run(kvmtrace_cmd("replay", "--json", str(run.path)), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode in (0, 1) and "Traceback" not in p.stderr, p.stderr
    report = json.loads(p.stdout)
    assert report["lost"] == 0
    ev = open_recording(run.path).read_all()
    assert set(ev["pid"][ev["kind"] == Kind.PUSH].tolist()) == {run.pid}
    assert migration_failures(run, report, read_trace(log), VCPUS, PAGES) == []
    (mig,) = report["migrations"]
    syncs = mig["syncs"]
    assert syncs >= run.live_sync_count >= 3  # several iterations: the bandwidth limit held
    text = subprocess.run(kvmtrace_cmd("replay", str(run.path)), capture_output=True,
                          text=True, timeout=300).stdout
    assert f"(migration iterations) of pid {run.pid} vm " in text
    assert f"  {syncs} syncs by thread {mig['tid']}; " in text
    assert "no push after the last sync: the VM stopped" in text
    out = tmp_path / "mig.json"
    e = subprocess.run(kvmtrace_cmd("export", str(run.path), "--perfetto", str(out)),
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    trace = json.loads(out.read_text())["traceEvents"]
    slices = [x for x in trace if x.get("name", "").startswith("iteration ")]
    assert [x["name"] for x in slices] == [f"iteration {n}" for n in range(1, syncs + 1)]
    assert [x["args"]["pages"] for x in slices] == [it["pages"] for it in mig["iterations"]]
