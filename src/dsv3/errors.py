"""The errors dsv3 reports to its users.

Every problem with what a user gave us (a config value, a data path, a checkpoint, a flag) is a
`UserError` whose message names the thing that is wrong and what would be right. Command-line
entry points print it on one line and exit with status 2, before any work starts; anything else
that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input; the message names what is wrong and what would be right."""


class ConfigError(UserError):
    """An invalid configuration value; the message names the field, its value and the rule."""


class DataError(UserError):
    """Bad data input (missing path, empty corpus, unusable tokenizer); raised before training starts."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or corrupt; the message names the folder or file."""
