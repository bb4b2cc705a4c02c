"""analysis (floor 3): what the events mean.

- :mod:`.aggregate`: per-ring counters from any event stream (the maps' twin), and the
  windows of ``top --replay``; :mod:`.spread_snapshots`: those windows with a recording's
  rings counted in several processes (``top --replay -j N``).
- :mod:`.rates`: per-interval rates and percentiles from two snapshots.
- :mod:`.stuck`: the rules that flag a ring stuck (``top`` and ``record``).
- :mod:`.replay`: a subpackage, the replay engine: rebuilds every ring over time from
  events or event columns and reports anomalies (engine, ring state, causal order, bulk
  path, exits, working set, lost pages, what-if simulation).
- :mod:`.migration`: a VMM's dirty-log syncs (live-migration iterations);
  :mod:`.throttle`: soft-full stalls split into harvest and throttle.
- :mod:`.profile`: a trace's performance profile; :mod:`.comparison` compares two;
  :mod:`.distribution` holds exact distributions and the test of whether two differ;
  :mod:`.ringseries`: per-ring time series and exact distributions a report draws.
- :mod:`.bundle`: ``kvmtrace bench`` bundles (runs of one scenario) and the per-run
  metrics of a trace; :mod:`.rep_comparison` compares two bundles over their runs.
"""
