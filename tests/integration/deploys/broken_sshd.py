"""Test deploy: try to swap in an sshd_config that `sshd -t` rejects."""

from roles._lib import validated_file

validated_file(
    name="Broken sshd_config (must be refused)",
    dest="/etc/ssh/sshd_config",
    content="PermitRootLogin sometimes\nNoSuchOption yes\n",
    validate="sshd -t -f {}",
    owes="reload-ssh",
)
