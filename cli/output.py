"""What every command prints to, and the one kind of error it raises for the user."""

from __future__ import annotations

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)
# An error is one line whatever the terminal's width, so that it can be read and grepped whole.
errors = Console(stderr=True, highlight=False, soft_wrap=True)
USER_ERROR, INTERRUPTED = 2, 130


class UserError(Exception):
    """A mistake in what the user asked for; the message says what and where (exit 2)."""
