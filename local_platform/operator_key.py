"""The operator key of the embedded platform: made on its first start, kept where `infer` finds it."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from inference_server.contract import ApiKeyRole
from private_api.db import make_engine, make_session_factory, upgrade_database
from private_api.keys import create_key, free_key_name, revoke_key

log = logging.getLogger(__name__)

OPERATOR_KEY_NAME = "operator"


def ensure_operator_key(database_url: str, key_file: Path) -> str | None:
    """For one person on one machine: unless `key_file` exists, create an operator key (named
    `operator`, or `operator-<n>` when taken) and store it there, readable by its owner only.

    Returns the new key's name, or None when the file was already there (it is left alone).
    """
    if key_file.exists():
        return None
    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            name = free_key_name(session=session, base=OPERATOR_KEY_NAME)
            key, _info = create_key(session=session, name=name, role=ApiKeyRole.OPERATOR)
            try:
                key_file.parent.mkdir(parents=True, exist_ok=True)
                descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(key + "\n")
            except OSError:
                # A key nobody holds is only a liability.
                revoke_key(session=session, name_or_id=name)
                raise
    finally:
        engine.dispose()
    log.info("created operator key %r in %s", name, key_file)
    return name
