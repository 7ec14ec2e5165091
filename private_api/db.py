"""Engine, sessions and schema upgrades; the private API is the only component touching the DB."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from alembic import command
from alembic.config import Config
from fastapi import Depends, Request
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from inference_server.serving import app_state

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30
T = TypeVar("T")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers run while one writer commits; foreign keys are off by default in SQLite.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _create_private_file(path: Path) -> None:
    """The database file, 0600 from its first byte on; SQLite gives its journal and WAL files
    the mode of the database file, so they are private too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for `sqlite:///PATH` or `postgresql[+psycopg]://...` (psycopg 3 either way);
    `pool_size` connections stay open, as many again may open for a burst."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _create_private_file(Path(parsed.database))
        engine = create_engine(
            parsed,
            # Sessions hop between the event loop's worker threads; SQLite's own locks guard the file.
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S},
            pool_size=pool_size,
            max_overflow=pool_size,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)
    raise ValueError(f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Answers are built from objects after commit; expiring them would re-query for nothing.
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Alembic's configuration built in code, so upgrades work from any directory or a wheel."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would eat the '%' of URL-escaped passwords.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _migrate(url: str, step: Callable[[Config, str], None], revision: str) -> None:
    """Run an Alembic command (`command.upgrade`, `command.downgrade`) in one transaction."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(url)
            config.attributes["connection"] = connection
            step(config, revision)
    finally:
        engine.dispose()


def upgrade_database(url: str, revision: str = "head") -> None:
    """Bring the schema to `revision` (the latest by default); safe to run on every start."""
    _migrate(url, command.upgrade, revision)


def downgrade_database(url: str, revision: str) -> None:
    _migrate(url, command.downgrade, revision)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for one request. Opening one does no I/O, so it happens on the event loop; a
    generator `def` would cost two thread-pool hops per request. Closing gives a held connection
    back (a rollback: I/O), so that alone goes to the pool, and only when a connection is held."""
    session: Session = request.app.state.session_factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


class QuickQueries:
    """Short database work, each call in a session of its own, on a few threads reserved for it.

    For the hottest routes (status polls): the session opens, works and closes in one hop, and
    on few threads, because each one runnable competes with the event loop for the GIL. With the
    shared pool of 40, 200 polling clients saw a p99 of 70-110 ms; with 2 threads, 34 ms and
    twice the requests per second at saturation.
    """

    def __init__(self, sessions: sessionmaker[Session], threads: int) -> None:
        self._sessions = sessions
        self._limiter = anyio.CapacityLimiter(threads)

    def _in_session(self, work: Callable[..., T], kwargs: dict[str, Any]) -> T:
        with self._sessions() as session:
            return work(session=session, **kwargs)

    async def run(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        """`work(session=..., **kwargs)` in a new session, on one of the reserved threads."""
        return await anyio.to_thread.run_sync(self._in_session, work, kwargs, limiter=self._limiter)


QuickQueriesDep = Annotated[QuickQueries, Depends(app_state("quick_queries"))]


def schema_revision_problem(engine: Engine) -> str | None:
    """None when the database is at the newest migration, else what to do about it."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string())).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return None
    return (
        f"database schema is at revision {current or 'none'}, this code needs {head}: "
        "run `python -m private_api` (it upgrades first) or private_api.db.upgrade_database(url)"
    )
