"""The `park` command line and the tools built on the library: `graph`, `demo`.

Nothing in the library (`park`) imports from here; `park.cli.app` owns the
parser and the commands, `output` what they print, `targets` which service
holds a job, `graph` the condition graph, `demo` the two-site demonstration.
"""
from park.cli.app import main

__all__ = ["main"]
