"""`inference-server`: the operator's command line.

inference-server standalone --port 8000 --data-dir ./data --consumers 1
inference-server private-api|public-api [--host H --port P]
inference-server consumer [--gpu ID]
inference-server db upgrade
inference-server keys create NAME [--operator] | keys list | keys revoke NAME_OR_ID
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger("inference_server")


def _exec_module(module: str, args: list[str]) -> int:
    os.execv(sys.executable, [sys.executable, "-m", module, *args])
    return 0  # not reached: execv replaces this process


def _database_url(args: argparse.Namespace) -> str:
    """--database-url, else IS_DATABASE_URL (or its default), as the private API would read it."""
    from private_api.config import PrivateSettings

    # The service token is irrelevant to database work; a stand-in satisfies the settings class.
    return args.database_url or PrivateSettings.model_validate({"service_token": "x" * 32}).database_url


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from private_api.db import upgrade_database

    url = _database_url(args)
    upgrade_database(url)
    print(f"database at {url.split('@')[-1]} is at the latest revision")
    return 0


def _quiet_database_logs(args: argparse.Namespace) -> None:
    """Migration chatter and the private API's own log lines would bury the lines that matter."""
    if not args.verbose:
        for name in ("alembic", "private_api"):
            logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def _key_session(args: argparse.Namespace) -> Iterator[Session]:
    """A session on the migrated database: the keys commands work on it directly, no API needed."""
    from private_api.db import make_engine, make_session_factory, upgrade_database

    _quiet_database_logs(args)
    url = _database_url(args)
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from inference_server.contract import ApiKeyRole
    from private_api.keys import create_key

    role = ApiKeyRole.OPERATOR if args.operator else ApiKeyRole.USER
    with _key_session(args) as session:
        key, info = create_key(session=session, name=args.name, role=role)
    # The key alone on stdout, so `KEY=$(inference-server keys create alice)` works.
    print(key, flush=True)
    print(
        f"created {info.role} key {info.name!r} (id {info.key_id}). It is shown only this once: hand it "
        "to its owner, who sends it as 'Authorization: Bearer <key>' (infer --token, or IS_API_TOKEN).",
        file=sys.stderr,
    )
    return 0


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _cmd_keys_list(args: argparse.Namespace) -> int:
    from private_api.keys import list_keys

    with _key_session(args) as session:
        keys = list_keys(session=session)
    if args.json:
        print(json.dumps([key.model_dump(mode="json") for key in keys], indent=2))
        return 0
    rows = [("NAME", "ROLE", "ID", "CREATED", "REVOKED", "LAST USED")]
    rows += [
        (key.name, str(key.role), key.key_id, _when(key.created_at), _when(key.revoked_at),
         _when(key.last_used_at))
        for key in keys
    ]  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    from private_api.keys import revoke_key

    with _key_session(args) as session:
        info = revoke_key(session=session, name_or_id=args.name_or_id)
    print(
        f"key {info.name!r} (id {info.key_id}) is revoked since {_when(info.revoked_at)}; "
        "the public API refuses it within seconds"
    )
    return 0


def _parse_gpus(value: str | None, consumers: int) -> list[str | None]:
    if not value:
        return [None] * consumers
    gpus = [gpu.strip() for gpu in value.split(",") if gpu.strip()]
    return gpus


def _cmd_standalone(args: argparse.Namespace) -> int:
    from inference_server.examples import register_examples
    from inference_server.launcher import LocalPlatform

    gpus = _parse_gpus(args.gpus, args.consumers)
    _quiet_database_logs(args)  # the operator key is made in this process, migrations first
    platform = LocalPlatform(
        data_dir=Path(args.data_dir),
        public_port=args.port,
        consumers=0,
        host=args.host,
        # One person on one machine: they get the operator key, kept where `infer` finds it.
        create_operator_key=True,
    )
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame) -> None:
        log.info("received %s; stopping every service", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    platform.start()
    try:
        for index, gpu in enumerate(gpus):
            platform.start_consumer(index, gpu=gpu)
        if args.register_examples:
            registered = register_examples(platform.private_url, platform.service_token)
            print(f"example models ready: {', '.join(registered)}")
        print(
            f"InferenceServer is up at {platform.public_url} (API docs: {platform.public_url}/docs); "
            f"{len(gpus)} consumer(s); data in {platform.data_dir}; logs in {platform.data_dir / 'logs'}"
        )
        key_file = platform.operator_key_file
        if platform.operator_key_created:
            print(
                f"Operator key {platform.operator_key_created!r} created, stored in {key_file} (mode 0600)."
            )
        else:
            print(f"Operator key: {key_file} (from an earlier start).")
        # infer reads <IS_DATA_DIR or ./data>/operator.key by itself when run from here.
        env_hint = "" if platform.data_dir == Path("data").resolve() else f"IS_DATA_DIR={platform.data_dir} "
        print(
            f"Submit a task:  {env_hint}.venv/bin/infer --url {platform.public_url} submit passthrough "
            f"./some-folder --wait -o result/"
        )
        print("More keys:  .venv/bin/inference-server keys create NAME [--operator]")
        print("Press Ctrl-C to stop.", flush=True)
        while not stop_requested.wait(1.0):
            platform.supervise_once()
    finally:
        platform.stop()
        print("all services stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    standalone = commands.add_parser("standalone", help="all services as local processes (embedded default)")
    standalone.add_argument("--host", default="127.0.0.1")
    standalone.add_argument("--port", type=int, default=8000, help="public API port")
    standalone.add_argument("--data-dir", default="./data")
    standalone.add_argument("--consumers", type=int, default=1)
    standalone.add_argument(
        "--gpus", help="comma-separated GPU ids, one consumer each (replaces --consumers)"
    )
    standalone.add_argument(
        "--register-examples",
        action="store_true",
        help="build the images in models_examples/ and register them",
    )
    standalone.set_defaults(handler=_cmd_standalone)

    for name, module in (
        ("private-api", "private_api"),
        ("public-api", "public_api"),
        ("consumer", "job_consumer"),
    ):
        sub = commands.add_parser(name, help=f"run the {name} service in the foreground", add_help=False)
        sub.set_defaults(handler=None, module=module)

    database = commands.add_parser("db", help="database maintenance")
    db_commands = database.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="migrate the database to the latest revision")
    upgrade.add_argument("--database-url", help="default: IS_DATABASE_URL")
    upgrade.set_defaults(handler=_cmd_db_upgrade)

    keys = commands.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="API keys, kept (hashed) in the platform's database: run this where "
        "IS_DATABASE_URL reaches it, e.g. `docker compose exec private_api inference-server keys list`.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("name", metavar="NAME", help="the owner's label; their tasks are recorded under it")
    create.add_argument("--operator", action="store_true", help="may also manage models and see every task")
    create.set_defaults(handler=_cmd_keys_create)
    listing = key_commands.add_parser("list", help="name, role, id and dates of every key (never the key)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_cmd_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its name or id")
    revoke.add_argument("name_or_id", metavar="NAME_OR_ID")
    revoke.set_defaults(handler=_cmd_keys_revoke)
    for command in (create, listing, revoke):
        command.add_argument("--database-url", help="default: IS_DATABASE_URL")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request to our own services is noise in the operator's terminal.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if args.handler is None:
        return _exec_module(args.module, rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        return args.handler(args)
    except Exception as exc:  # one clear line for the operator; details are in the service logs
        log.debug("command failed", exc_info=True)
        print(f"inference-server: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
