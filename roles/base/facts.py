"""Facts the base role reads from servers."""

from __future__ import annotations

from collections.abc import Sequence

from pyinfra.api import FactBase


class Container(FactBase):
    """The container technology the host runs in (``systemd-nspawn``...), or None on a VM/metal.

    Services that cannot work in a container (clock setting, kernel sysctls)
    are configured but not forced to run there.
    """

    def command(self) -> str:
        return "systemd-detect-virt --container || true"

    def process(self, output: Sequence[str]) -> str | None:
        value = "".join(output).strip()
        return None if value in ("", "none") else value


class Codename(FactBase):
    """The Debian codename from /etc/os-release (``bookworm``, ``trixie``), or "" without one.

    What pyinfra's ``LinuxDistribution`` reports as ``release_meta["VERSION_CODENAME"]``, read by
    the shell alone (``LinuxDistribution`` runs ``ls``, ``grep`` and a ``cat`` per release file:
    five processes on every host in every run for one word)."""

    def command(self) -> str:
        return '. /etc/os-release 2>/dev/null; echo "${VERSION_CODENAME:-}"'

    def process(self, output: Sequence[str]) -> str:
        return "".join(output).strip()


class WeakSshModuli(FactBase):
    """Number of Diffie-Hellman moduli under 3072 bits left in /etc/ssh/moduli."""

    def command(self) -> str:
        return "awk '$1 !~ /^#/ && $5 < 3071' /etc/ssh/moduli 2>/dev/null | wc -l"

    def process(self, output: Sequence[str]) -> int:
        return int("".join(output).strip() or 0)
