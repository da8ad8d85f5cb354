"""Error types.

``UserError`` is for mistakes the user can fix (bad path, bad ratio, mismatched data,
unsupported model). The command line prints it as one line without a traceback, exit 1.
``InternalError`` is a failure in something the library built (a cut graph, a pruned
copy that ONNX Runtime refuses, a check of the library's own output): a bug. The command
line prints its traceback and asks to report it (exit 2). Any other exception is a bug too:
one line asking to report it (exit 2; the traceback with ``--debug``).
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: the message names the problem and the fix."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class InfeasibleError(UserError):
    """The requested budget cannot be met under the given constraints."""


class InternalError(Exception):
    """A failure in what the library built (not the user's input): a bug to report."""
