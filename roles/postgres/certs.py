"""PostgreSQL's TLS: every member serves a certificate of its cluster's own CA, every client verifies it.

The CA and the members' certificates derive from the secret ``postgres_tls_ca_key_<cluster>``
(an ECDSA P-256 key; webstack/tls.py ``pg_ca``, ``pg_server``): the same inventory renders the
same files, so a second run changes nothing. Clients (the application, the worker, the other
members for replication, rewind and fencing) connect with :func:`client_options`:
``sslmode=verify-full`` against the CA (the certificate names the member and its address, so a
relay or another server on the path is refused) and ``channel_binding=require`` (SCRAM-SHA-256-PLUS:
the password exchange is bound to this TLS session, which a man in the middle cannot forward).
"""

from __future__ import annotations

from pyinfra.api.operation import OperationMeta
from pyinfra.operations import files

from roles._lib import validated_file
from webstack import tls
from webstack.inventory import HostConfig

CA_DIR = "/etc/webstack"
# Not in /etc/postgresql, whose entries are PostgreSQL versions to Debian's tools (and to scripts).
SERVER_KEY = f"{CA_DIR}/postgres-server.key"
SERVER_CERT = f"{CA_DIR}/postgres-server.crt"


def secret_name(cluster: str) -> str:
    return f"postgres_tls_ca_key_{cluster}"


def ca_path(cluster: str) -> str:
    """Where every host that connects to ``cluster`` keeps its CA certificate."""
    return f"{CA_DIR}/postgres-{cluster}-ca.crt"


def client_options(cluster: str) -> str:
    """libpq options of every TCP connection to a member of ``cluster``."""
    return f"sslmode=verify-full sslrootcert={ca_path(cluster)} channel_binding=require"


def _ca_name(cluster: str) -> str:
    return f"webstack PostgreSQL {cluster} CA"


def install_ca(cfg: HostConfig, cluster: str) -> OperationMeta:
    """The CA certificate of ``cluster`` at :func:`ca_path` (public: 0644)."""
    files.directory(name=CA_DIR, path=CA_DIR, mode="755")
    return validated_file(name=f"CA of PostgreSQL cluster {cluster}", dest=ca_path(cluster), mode="644",
                          content=tls.pg_ca(cfg.secret(secret_name(cluster)).unmask(), _ca_name(cluster)))


def install_server(cfg: HostConfig, cluster: str, owes: str) -> list[OperationMeta]:
    """This member's certificate and key (the key 0600 postgres), owing ``owes`` (a reload)."""
    key, cert = tls.pg_server(cfg.secret(secret_name(cluster)).unmask(), _ca_name(cluster), cfg.name, [cfg.address])
    return [
        validated_file(name="PostgreSQL TLS key", dest=SERVER_KEY, content=key,
                       user="postgres", group="postgres", mode="600", owes=owes),
        validated_file(name="PostgreSQL TLS certificate", dest=SERVER_CERT, content=cert,
                       user="postgres", group="postgres", mode="644", owes=owes),
    ]

