"""source (floor 2): event sources read from files (the live ones are in :mod:`kvmtrace.bpf`).

- :mod:`.detect`: open any trace file (recording, tracefs text, ``perf script``).
- :mod:`.recording`: the ``.kvt`` writer and reader (docs/FORMAT.md); its EVENTS blocks
  are laid out by :mod:`.recording_format`, encoded by :mod:`.recording_codec` and decoded
  by :mod:`.recording_decode` to :class:`~kvmtrace.core.columns.EventColumns`.
- :mod:`.ftrace`, :mod:`.perfscript`: importers of tracefs and ``perf script`` text, over
  :mod:`.textsource` (the common EventSource), :mod:`.textscan` (vectorised scanner),
  :mod:`.swar` (8-byte field loads) and :mod:`.textvms` (telling VMs apart without fds).
"""
