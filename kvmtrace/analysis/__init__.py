"""analysis (floor 3): what the events mean.

- :mod:`.aggregate`: per-ring counters from any event stream (the maps' twin).
- :mod:`.rates`: per-interval rates and percentiles from two snapshots.
- :mod:`.stuck`: the rules that flag a ring stuck (``top`` and ``record``).
- :mod:`.replay`: rebuilds every ring over time and reports anomalies; its parts:
  :mod:`.colfeed` (columns from a recording block), :mod:`.ringorder` (causal order),
  :mod:`.ringbulk` (the vectorised fast path), :mod:`.ringstate` (one ring's state),
  :mod:`.ringexits` (soft-full exits and episodes), :mod:`.lostpages` (lost pages),
  :mod:`.workingset` (dirty rate, working set, hot pages), :mod:`.simulate` (other ring
  sizes, what-if).
- :mod:`.migration`: a VMM's dirty-log syncs (live-migration iterations);
  :mod:`.throttle`: soft-full stalls split into harvest and throttle.
- :mod:`.compare`: a trace's performance profile; :mod:`.comparison` compares two;
  :mod:`.distribution` holds exact distributions and the test of whether two differ.
"""
