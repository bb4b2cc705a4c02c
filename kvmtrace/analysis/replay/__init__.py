"""replay (in analysis, floor 3): rebuild every dirty ring (``struct kvm_dirty_ring``) of an
event stream over time, check it against the kernel's rules, report anomalies.

It reads events only as EVENT_DTYPE records or as
:class:`~kvmtrace.core.columns.EventColumns` (never a file format), and keeps to the
semantics of the slow oracle :mod:`kvmtrace.testing.reference`, which shares its state
types (:mod:`kvmtrace.model.results`) and ring-size policy (:mod:`kvmtrace.model.sizes`),
not its rules.

- :mod:`.engine`: :class:`Replay`, :class:`ReplayReport`, :func:`replay_source`: routes
  events per ring, ring sizes, barriers, the report.
- :mod:`.colfeed`: per-ring columns from EventColumns.
- :mod:`.order`: each ring's events put in causal order (bounded look-ahead).
- :mod:`.ringstate`: one ring's state (:class:`~.ringstate.FastRing`), changed only by its
  own methods; the careful path, event by event.
- :mod:`.bulk`: the vectorised fast path over a clean stretch of one ring's events;
  :mod:`.exits`: its soft-full exits and soft-limit episodes.
- :mod:`.lostpages`: pages lost to overwrites or stranded.
- :mod:`.workingset`: dirty rate, working set, hottest pages per vCPU.
- :mod:`.simulate`: the exits another ring size would have caused (what-if).
- :mod:`.parallel`: the rings spread over worker processes (``replay -j N``);
  :mod:`.blockshm`: the decoded blocks they share through shared memory.
"""

from .engine import Replay, ReplayReport, replay_source

__all__ = ["Replay", "ReplayReport", "replay_source"]
