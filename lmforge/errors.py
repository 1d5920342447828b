"""User errors: one exception family whose messages name the file, key or field at fault.

The CLI prints the message on one line and exits 2. Bugs raise ordinary exceptions.
"""


class LmforgeError(Exception):
    """A problem with the user's input (file, config, data, checkpoint)."""


class ConfigError(LmforgeError):
    """A bad config file, key or value."""


class DataError(LmforgeError):
    """Missing, unreadable, empty or mismatched data."""


class TokenizerError(LmforgeError):
    """A missing or unusable tokenizer."""


class CheckpointError(LmforgeError):
    """A missing, incomplete, corrupt or mismatched checkpoint."""


class OutputError(LmforgeError):
    """An output path that would destroy something lmforge did not write, or cannot be written."""
