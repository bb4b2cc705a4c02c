"""views (floor 4): output of every kind, from counters, intervals or replay results.

- :mod:`.top_render`: the ``top`` screen as plain lines (pure); :mod:`.top_curses` the
  interactive loop over it; :mod:`.topjson` the batch NDJSON; :mod:`.top_hist` its
  histogram pane (key ``H``, ``-b --hist``).
- :mod:`.histogram`: a log2 histogram as terminal lines (bcc's ``print_log2_hist`` habit).
- :mod:`.progress`: a progress bar on stderr when it is a terminal (tqdm), for long work.
- :mod:`.prometheus`: the ``/metrics`` exporter.
- :mod:`.replay_text`, :mod:`.replay_json`: the ``replay`` report; :mod:`.replay_migration` its
  migration iterations and stall split.
- :mod:`.compare_text`: the ``compare`` report; :mod:`.report_html` its HTML report
  with plots (``compare --html``).
- :mod:`.parquet`, :mod:`.perfetto`: exports of a recording.
"""
