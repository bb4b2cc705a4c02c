"""commands (floor 5): one module per subcommand, thin over the library, and
:mod:`.args`, the argument helpers they share.

:mod:`.top`, :mod:`.record`, :mod:`.replay`, :mod:`.compare`, :mod:`.export`,
:mod:`.workload`, :mod:`.doctor`, :mod:`.bench` (with :mod:`.bench_qemu`, its QEMU runs).
"""
