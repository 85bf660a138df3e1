"""The project's error base: every refusal or failure a user can cause or meet derives from it.

The CLI prints any ArthurError as one line (its message names the file or URL and the fix) and exits 1;
a traceback is shown only with --debug. Raise the most precise subclass; keep messages one line.
"""

from __future__ import annotations


class ArthurError(Exception):
    """Base of the project's own errors: expected, explained, never a traceback for the user."""
