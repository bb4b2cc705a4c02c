"""bpf: both live sources. The probes' BPF C is package data in ``probes/``
(dirty_ring.bpf.c; kvmtrace.h holds the structs shared with Python).

- :mod:`.loader`: compiles and attaches the probes (``-D`` defines only), reads their maps.
- :mod:`.objcache`: the probe cache: what compiling produced, keyed by sources, options
  and kernel; :mod:`.rawload` loads it with bpf(2) alone (no bcc); :mod:`.maptypes`:
  ctypes types from bcc's map type descriptions.
- :mod:`.layout`: numpy twins of the map structs in probes/kvmtrace.h.
- :mod:`.snapshot_source`: the live per-ring view's source (``kvmtrace top``), over the
  in-kernel maps.
- :mod:`.event_source`: the live event stream (``kvmtrace record``), over the per-CPU
  event rings; :mod:`.percpu` reads those rings and merges them into one stream.
- :mod:`.ringbuf`: bulk reader of a BPF ring buffer (the event output of tests' ``top``).
- :mod:`.vmident`: VM identity: pid, fd, generation and name.
- :mod:`.progstats`: the kernel's per-program run counters (bpf_stats).
"""
