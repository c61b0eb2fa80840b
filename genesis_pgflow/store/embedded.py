"""The embedded default database: a real PostgreSQL from the pgserver wheel, kept under GENESIS_HOME."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from genesis_pgflow.errors import ConfigurationError

log = logging.getLogger(__name__)


def embedded_dsn(home: Path) -> str:
    """Start (or reuse: it outlives this process) the server in <home>/pgdata and return a
    key/value DSN for it. pgserver answers on a unix socket only, and libraries that misread
    `?host=` URIs are happy with key/value DSNs."""
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():   # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import pgserver
    except ImportError as exc:  # pgserver ships wheels for CPython 3.9-3.12 on x86_64 only
        raise ConfigurationError(
            f"no database configured and the embedded default is unavailable ({exc}); "
            "set GENESIS_DATABASE_URL or pass --dsn") from None
    pgdata = Path(home).expanduser().resolve() / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode=None)
        info = server.get_postmaster_info()
    except Exception as exc:  # noqa: BLE001 - any failure to start is a configuration problem here
        raise ConfigurationError(f"cannot start the embedded PostgreSQL in {pgdata}: {exc}") from None
    host = info.socket_dir if info.socket_dir is not None else info.hostname
    log.info("using the embedded PostgreSQL in %s", pgdata)
    return f"host={host} port={info.port} user=postgres dbname=postgres"
