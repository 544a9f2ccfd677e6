"""Remote output that is not UTF-8 does not end the run.

pyinfra's SSH connector reads a command's output through paramiko's channel files in
text mode, which decode each line as strict UTF-8: one byte that is not (a log line
from another locale, a binary file's name, pgBackRest quoting a corrupt path) raises
UnicodeDecodeError in the reader, and pyinfra stops the whole run with a traceback,
on every host. Here the channel files are read as bytes and decoded with
replacement characters instead, as ``journalctl`` and ``less`` show such bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

_INSTALLED: list[bool] = []


def lenient(buffer: Any) -> Iterable:
    """Lines of a paramiko channel file decoded with replacement; any other iterable as it is."""
    if not hasattr(buffer, "FLAG_BINARY"):
        return buffer
    buffer._flags |= buffer.FLAG_BINARY  # readline() then returns bytes, undecoded

    def lines() -> Iterator[str]:
        for line in buffer:
            yield line.decode("utf-8", "replace") if isinstance(line, bytes) else line

    return lines()


def install() -> None:
    """Wrap the output reader of pyinfra's SSH connector (idempotent)."""
    if _INSTALLED:
        return
    from pyinfra.connectors import ssh

    read = ssh.read_output_buffers

    def read_output_buffers(stdout_buffer: Any, stderr_buffer: Any, *args: Any, **kwargs: Any) -> Any:
        return read(lenient(stdout_buffer), lenient(stderr_buffer), *args, **kwargs)

    ssh.read_output_buffers = read_output_buffers  # type: ignore[assignment]
    _INSTALLED.append(True)
