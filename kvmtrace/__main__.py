import importlib
import os
import signal
import sys

# Ctrl-C while the modules load ends the run at once and quietly: nothing is loaded or
# started yet (caught as KeyboardInterrupt, numpy's import turns it into an ImportError)
signal.signal(signal.SIGINT, lambda *_: os._exit(130))
from .cli import COMMANDS, main  # noqa: E402

# only the named subcommand's module where one is named (as main() does)
_named = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in COMMANDS else None
for _name in (_named,) if _named else COMMANDS:
    importlib.import_module(f"kvmtrace.commands.{_name}")
signal.signal(signal.SIGINT, signal.default_int_handler)

sys.exit(main())
