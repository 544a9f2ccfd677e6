"""The one error type the inventory layer raises, always naming a place."""

from __future__ import annotations


class ConfigError(Exception):
    """Bad input found before any server is touched.

    ``where`` is a file path (or a host name for cross-host checks), ``key`` the
    setting concerned; ``str()`` gives a one-line message naming both.
    """

    def __init__(self, where: str, key: str | None, message: str) -> None:
        self.where = where
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.key:
            return f"{self.where}: {self.key}: {self.message}"
        return f"{self.where}: {self.message}"
