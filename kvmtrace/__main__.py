import importlib
import os
import signal
import sys

# Ctrl-C while the modules load ends the run at once and quietly: nothing is loaded or
# started yet (caught as KeyboardInterrupt, numpy's import turns it into an ImportError)
signal.signal(signal.SIGINT, lambda *_: os._exit(130))
from .cli import commands_for, main  # noqa: E402

for _name in commands_for(sys.argv[1:]):  # the modules main() will load, as it chooses
    importlib.import_module(f"kvmtrace.commands.{_name}")
signal.signal(signal.SIGINT, signal.default_int_handler)

sys.exit(main())
