"""The `vae-rt` command: loads the CLI, whose imports (torch and the engines) take a second or more.

Ctrl-C in that second ends the command like Ctrl-C anywhere else, with one line and exit code 130,
instead of Python's traceback from inside some library's import: nothing has started yet. Once the
command has ended, Ctrl-C is ignored: the interpreter and the native libraries then take a second or
more to shut down, and a Ctrl-C there killed the process with no word about the finished work.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Import the CLI and run it; Ctrl-C during the import is one line, exit 130, and after the command is ignored."""
    try:
        from vae_rt.cli import main as run_cli
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: while loading, before anything was done\n")
        sys.exit(130)
    try:
        run_cli()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # kept while the process exits: SIGTERM and SIGKILL still end it
