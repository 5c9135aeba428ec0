"""The `vae-rt` command: loads the CLI, whose imports (torch and the engines) take a second or more.

Ctrl-C in that second ends the command like Ctrl-C anywhere else, with one line and exit code 130,
instead of Python's traceback from inside some library's import: nothing has started yet.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Import the CLI and run it; Ctrl-C during the import is one line, exit 130."""
    try:
        from vae_rt.cli import main as run_cli
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: while loading, before anything was done\n")
        sys.exit(130)
    run_cli()
