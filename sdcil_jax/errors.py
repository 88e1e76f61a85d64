"""User-facing errors.

Every mistake a user can make (bad config, unknown dataset, missing weights, corrupt file...) raises a
:class:`UserError` whose message is one sentence naming the problem and the fix. The command line
prints that sentence alone (no traceback) and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; its message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """Unknown config key, wrong type or invalid value."""


class DataError(UserError):
    """Unknown dataset, dataset not prepared, impossible class split."""


class GenerationError(UserError):
    """Missing or unreachable generator weights, mismatched or corrupt replay store."""
