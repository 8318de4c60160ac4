"""One exception type for mistakes a user can fix.

Every public entry point turns bad input into a :class:`HistofmError` whose
message is one sentence saying what is wrong and what to do. The command line
prints that sentence and exits with a non-zero code instead of a traceback.
"""

from __future__ import annotations


class HistofmError(Exception):
    """A user-facing error: bad path, corrupt file, unknown name, wrong shape."""
