"""Where command-line tools get key passphrases: from a named environment variable, never argv."""

from __future__ import annotations

import os

from .errors import ConfigError

__all__ = ["passphrase_from_env"]


def passphrase_from_env(env_name: str | None) -> bytes | None:
    """The passphrase held in ``$env_name``, or None when no variable is named.

    A passphrase on the command line would show in ``ps`` and shell history, so the CLI takes the
    *name* of a variable. Raises :class:`ConfigError` when the named variable is unset or empty.
    """
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if not value:
        raise ConfigError(f"environment variable {env_name} is not set or empty")
    return value.encode()
