"""Prometheus exporter of the per-ring counters (text exposition format 0.0.4, stdlib only).

Every scrape of ``/metrics`` reads one :class:`~kvmtrace.core.counters.Snapshot` from the
SnapshotSource (the in-kernel maps, once) and writes, per ring ``{pid, vm, vm_gen, ring,
comm}`` (``vm`` the VM's fd, ``vm_gen`` the VMs seen under that fd before it):

- counters ``kvmtrace_ring_pushes_total``, ``..._soft_full_exits_total``,
  ``..._resets_total``, ``..._entries_reset_total`` (entries), ``..._lost_entries_total``
  (lost pages: entries overwritten by an overflow + stranded by a stuck ring);
- gauges ``kvmtrace_ring_used_entries``, ``..._max_used_entries``, ``..._size_entries``
  (absent while the size is unknown);
- histograms ``kvmtrace_ring_stall_seconds`` (soft-full stall, exit 31 to the next KVM_RUN)
  and ``kvmtrace_reset_latency_seconds{pid,vm,comm}`` (KVM_RESET_DIRTY_RINGS, a vm ioctl:
  per VM, from ``Snapshot.vm_counters``; no ``_sum`` series), from the log2 ns buckets:
  bucket i holds values below ``2**(i+1)`` ns, so it becomes ``le="2**(i+1) / 1e9"``;
- ``kvmtrace_lost_events_total`` and ``kvmtrace_vm_info{pid,vm,comm,name,ring_bytes} 1``;
- the dirty rate in QEMU's terms (``calc-dirty-rate``): counter
  ``kvmtrace_ring_dirty_bytes_total`` (pushes x 4096: ``rate(...) / 2^20`` is MiB/s) and
  gauge ``kvmtrace_ring_dirty_rate_mbps`` (entries pushed per second x 4096 / 2**20 over the
  time since the exporter's previous scrape; absent on the first scrape), per ring and per
  VM (``kvmtrace_vm_dirty_rate_mbps{pid,vm,vm_gen,comm}``).

Other rates and percentiles are left to PromQL (``rate()``, ``histogram_quantile()``).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..analysis.rates import DIRTY_PAGE_BYTES, dirty_rate_mbps
from ..core.counters import HIST_BUCKETS, RingCounters, RingKey, Snapshot
from ..core.kvm_abi import vm_fd, vm_gen
from ..core.sources import SnapshotSource
from ..errors import UsageError

__all__ = ["CONTENT_TYPE", "DEFAULT_HOST", "parse_listen", "render_metrics", "Exporter"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_HOST = "127.0.0.1"

_COUNTERS = (
    ("pushes_total", "pushes", "Entries pushed to the dirty ring (kvm_dirty_ring_push)."),
    ("soft_full_exits_total", "soft_full_exits", "Soft-full exits (KVM_EXIT_DIRTY_RING_FULL)."),
    ("resets_total", "resets", "Ring resets (one per ring per KVM_RESET_DIRTY_RINGS)."),
    ("entries_reset_total", "entries_reset", "Entries the resets gave back to the ring."),
    ("lost_entries_total", "lost",
     "Lost pages: entries overwritten (overflow) + stranded by a stuck ring."),
    ("stranded_entries_total", "stranded",
     "Entries pushed after a reset left the ring stuck: never harvested, never reset."),
)
_GAUGES = (
    ("used_entries", "used", "Entries dirty and not yet reset (dirty_index - reset_index)."),
    ("max_used_entries", "max_used", "Largest used seen since tracing started."),
    ("size_entries", "size", "Ring size in entries (16-byte struct kvm_dirty_gfn)."),
)


def parse_listen(spec: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``:PORT`` (loopback) or ``[v6addr]:PORT`` -> (host, port)."""
    host, sep, port_s = spec.rpartition(":")
    if not sep or not port_s.isdigit() or int(port_s) > 65535:
        raise UsageError(
            f"bad --prometheus address {spec!r}", "give ADDR:PORT, e.g. 127.0.0.1:9877 or :9877"
        )
    host = host.strip("[]") or DEFAULT_HOST
    return host, int(port_s)


def _esc(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, object]]) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in pairs) + "}"


def _le(i: int) -> str:
    return "+Inf" if i == HIST_BUCKETS - 1 else repr((1 << (i + 1)) / 1e9)


def _histogram(
    out: list[str], name: str, base: list[tuple[str, object]], hist: list[int], sum_ns: int | None
) -> None:
    total = 0
    for i, n in enumerate(hist):
        total += n
        out.append(f"{name}_bucket{_labels(base + [('le', _le(i))])} {total}")
    lab = _labels(base)
    if sum_ns is not None:
        out.append(f"{name}_sum{lab} {sum_ns / 1e9!r}")
    out.append(f"{name}_count{lab} {total}")


def _dirty_rates(out: list[str], snap: Snapshot, prev: Snapshot | None,
                 ring_rows: list[tuple[RingKey, RingCounters]],
                 labels: dict[RingKey, list[tuple[str, object]]]) -> None:
    name = "kvmtrace_ring_dirty_bytes_total"
    out += [f"# HELP {name} Guest memory dirtied: entries pushed x {DIRTY_PAGE_BYTES} bytes.",
            f"# TYPE {name} counter"]
    out += [f"{name}{_labels(labels[k])} {c.pushes * DIRTY_PAGE_BYTES}" for k, c in ring_rows]
    dt = (snap.time_ns - prev.time_ns) / 1e9 if prev is not None else 0.0
    rates: dict[RingKey, float] = {}
    if prev is not None and dt > 0:
        for k, c in ring_rows:
            old = prev.rings.get(k)
            rates[k] = dirty_rate_mbps(max(0, c.pushes - (old.pushes if old else 0)) / dt) or 0.0
    help_ = ("Dirty rate as QEMU's calc-dirty-rate counts it: entries pushed per second x "
             "4096 / 2^20 (MiB/s), since the previous scrape.")
    name = "kvmtrace_ring_dirty_rate_mbps"
    out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
    out += [f"{name}{_labels(labels[k])} {v!r}" for k, v in rates.items()]
    name = "kvmtrace_vm_dirty_rate_mbps"
    out += [f"# HELP {name} {help_} Sum over the VM's rings.", f"# TYPE {name} gauge"]
    per_vm: dict[tuple[int, int], float] = {}
    for k, v in rates.items():
        per_vm[(k.pid, k.vm)] = per_vm.get((k.pid, k.vm), 0.0) + v
    for (pid, vm), v in sorted(per_vm.items()):
        info = snap.vms.get((pid, vm))
        base = [("pid", pid), *_vm(vm), ("comm", info.comm if info else "")]
        out.append(f"{name}{_labels(base)} {v!r}")


def render_metrics(snap: Snapshot, prev: Snapshot | None = None) -> str:
    """The text exposition of one snapshot; ``prev`` (the previous scrape's snapshot)
    gives the dirty-rate gauges."""
    rings = sorted(snap.rings.items())
    labels: dict[RingKey, list[tuple[str, object]]] = {}
    for key, _ in rings:
        info = snap.vms.get((key.pid, key.vm))
        labels[key] = [("pid", key.pid), *_vm(key.vm), ("ring", key.ring),
                       ("comm", info.comm if info else "")]
    ring_rows = [(k, c) for k, c in rings if k.ring >= 0 or _has_ring_events(c)]
    out: list[str] = []
    for suffix, attr, help_ in _COUNTERS:
        name = f"kvmtrace_ring_{suffix}"
        out += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
        out += [f"{name}{_labels(labels[k])} {getattr(c, attr)}" for k, c in ring_rows]
    for suffix, attr, help_ in _GAUGES:
        name = f"kvmtrace_ring_{suffix}"
        out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge"]
        for k, c in ring_rows:
            value = getattr(c, attr)
            if value is not None:
                out.append(f"{name}{_labels(labels[k])} {value}")
    _dirty_rates(out, snap, prev, ring_rows, labels)
    name = "kvmtrace_ring_stuck"
    out += [f"# HELP {name} 1 while the ring is stuck (reason label), else 0.",
            f"# TYPE {name} gauge"]
    out += [f"{name}{_labels(labels[k] + [('reason', c.stuck or '')])} {int(bool(c.stuck))}"
            for k, c in ring_rows]
    name = "kvmtrace_ring_stall_seconds"
    out += [f"# HELP {name} Soft-full stall: exit 31 to the vCPU's next KVM_RUN.",
            f"# TYPE {name} histogram"]
    for k, c in ring_rows:
        _histogram(out, name, labels[k], c.stall_hist, c.stall_ns)
    name = "kvmtrace_reset_latency_seconds"
    out += [f"# HELP {name} Duration of KVM_RESET_DIRTY_RINGS ioctls.",
            f"# TYPE {name} histogram"]
    for (pid, vm), vc in sorted(snap.vm_counters.items()):
        if any(vc.reset_lat_hist):
            info = snap.vms.get((pid, vm))
            base = [("pid", pid), *_vm(vm), ("comm", info.comm if info else "")]
            _histogram(out, name, base, vc.reset_lat_hist, None)
    name = "kvmtrace_lost_events_total"
    out += [f"# HELP {name} Events the kernel side could not deliver or count.",
            f"# TYPE {name} counter", f"{name} {snap.lost_events}"]
    name = "kvmtrace_vm_info"
    out += [f"# HELP {name} One series per traced VM (value 1).", f"# TYPE {name} gauge"]
    for (pid, vm), info in sorted(snap.vms.items()):
        pairs = [("pid", pid), *_vm(vm), ("comm", info.comm), ("name", info.name or ""),
                 ("ring_bytes", info.ring_bytes if info.ring_bytes else "")]
        out.append(f"{name}{_labels(pairs)} 1")
    return "\n".join(out) + "\n"


def _vm(vm: int) -> list[tuple[str, object]]:
    """Labels of a packed VM (kvmtrace.core.kvm_abi): its fd and generation."""
    return [("vm", vm_fd(vm)), ("vm_gen", vm_gen(vm))]


def _has_ring_events(c: RingCounters) -> bool:
    return bool(c.pushes or c.soft_full_exits or c.resets or c.stall_ns)


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class Exporter:
    """An HTTP server on (host, port) answering ``/metrics`` from ``source``.

    ``start()`` serves from a daemon thread, ``serve_forever()`` in the caller's thread;
    ``address`` is the bound (host, port) (port 0 picks a free one). Snapshots are taken
    under a lock, so a source shared with a batch loop is read by one thread at a time.
    """

    def __init__(self, source: SnapshotSource, host: str = DEFAULT_HOST, port: int = 9877,
                 lock: threading.Lock | None = None) -> None:
        self.source = source
        self.lock = lock or threading.Lock()
        self._prev: Snapshot | None = None  # the previous scrape's, for the dirty rate
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics here")
                    return
                body = exporter.scrape().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        server_class = _Server6 if ":" in host else ThreadingHTTPServer
        try:
            self.server = server_class((host, port), Handler)
        except OSError as err:
            raise UsageError(
                f"cannot listen on {host}:{port}: {err.strerror}",
                "pick a free port or an address of this host",
            ) from err
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def scrape(self) -> str:
        with self.lock:
            snap = self.source.snapshot()
            prev, self._prev = self._prev, snap
        return render_metrics(snap, prev)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()
