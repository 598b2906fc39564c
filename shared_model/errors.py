"""The one base class of errors a user can act on.

Every error whose message names the file, key, tag or setting at fault and says what to do
subclasses :class:`UserError` (most also subclass the built-in type callers already expect, e.g.
``ValueError``). The three command-line tools catch this class alone and print it as one line
with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message says which file or setting, and what to do."""

    def __str__(self) -> str:
        # KeyError quotes its message; a user reads the sentence, not its repr.
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()
