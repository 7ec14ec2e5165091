"""The operator's database commands: `inference-server db ...`, `inference-server keys ...` and
`inference-server consumers ...`.

They work on the private API's database directly, so they run wherever IS_DATABASE_URL reaches
it (the private API's container, or the machine of the embedded platform), with no API running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.orm import Session

from inference_server.contract import (
    AUDIT_PAGE_DEFAULT,
    MAX_PRIORITY,
    ApiKeyRole,
    AuditAction,
    ConsumerPublic,
)
from inference_server.settings import ENV_PREFIX
from private_api.audit import OPERATOR_CLI, list_entries
from private_api.config import PrivateSettings
from private_api.consumer_registry import list_consumers, set_draining
from private_api.db import make_engine, make_session_factory, upgrade_database
from private_api.keys import create_key, list_keys, revoke_key, set_limits, webhook_secret


class DatabaseSettings(BaseSettings):
    """The database URL (and when a consumer counts as lost), read as the private API reads them:
    database work needs none of the service's secrets, so an operator's shell need not hold its
    token."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # The private API's own defaults, so both agree when the variables are unset.
    database_url: str = PrivateSettings.model_fields["database_url"].default
    consumer_lost_after_s: float = PrivateSettings.model_fields["consumer_lost_after_s"].default


def _database_url(args: argparse.Namespace) -> str:
    """--database-url, else IS_DATABASE_URL (or its default)."""
    return args.database_url or DatabaseSettings().database_url


def quiet_database_logs(verbose: bool) -> None:
    """Migration chatter and the private API's own log lines would bury the lines that matter."""
    if not verbose:
        for name in ("alembic", "private_api"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    url = _database_url(args)
    upgrade_database(url)
    print(f"database at {url.split('@')[-1]} is at the latest revision")
    return 0


@contextlib.contextmanager
def _key_session(args: argparse.Namespace) -> Iterator[Session]:
    """A session on the migrated database: the keys commands work on it directly, no API needed."""
    quiet_database_logs(args.verbose)
    url = _database_url(args)
    upgrade_database(url)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _cmd_keys_create(args: argparse.Namespace) -> int:
    role = ApiKeyRole.OPERATOR if args.operator else ApiKeyRole.USER
    with _key_session(args) as session:
        key, info = create_key(
            session=session,
            name=args.name,
            role=role,
            max_priority=args.max_priority,
            max_active_tasks=args.max_active_tasks,
            actor=OPERATOR_CLI,
        )
        secret, _info = webhook_secret(session=session, name_or_id=info.key_id)
    # The key alone on stdout, so `KEY=$(inference-server keys create alice)` works.
    print(key, flush=True)
    print(
        f"created {info.role} key {info.name!r} (id {info.key_id}). It is shown only this once: hand it "
        "to its owner, who sends it as 'Authorization: Bearer <key>' (infer --token, or IS_API_TOKEN).\n"
        f"Its webhook secret, which signs the webhooks of its tasks: {secret}\n"
        "(`keys webhook-secret NAME` shows it again, `--rotate` replaces it).",
        file=sys.stderr,
    )
    return 0


def _cmd_keys_webhook_secret(args: argparse.Namespace) -> int:
    with _key_session(args) as session:
        secret, info = webhook_secret(
            session=session, name_or_id=args.name_or_id, rotate=args.rotate, actor=OPERATOR_CLI
        )
    # The secret alone on stdout, so `SECRET=$(inference-server keys webhook-secret alice)` works.
    print(secret, flush=True)
    what = "new webhook secret (it signs every delivery from now on)" if args.rotate else "webhook secret"
    print(f"the {what} of key {info.name!r} (id {info.key_id})", file=sys.stderr)
    return 0


def _limit(value: int | None) -> str:
    return "default" if value is None else str(value)


def _cmd_keys_set(args: argparse.Namespace) -> int:
    changes: dict[str, int | None] = {}
    for field in ("max_priority", "max_active_tasks"):
        value = getattr(args, field)
        if value is not None:
            changes[field] = None if value == "default" else int(value)
    if not changes:
        print("nothing to change: give --max-priority and/or --max-active-tasks", file=sys.stderr)
        return 2
    with _key_session(args) as session:
        info = set_limits(session=session, name_or_id=args.name_or_id, actor=OPERATOR_CLI, **changes)
    print(
        f"key {info.name!r} (id {info.key_id}): max priority {_limit(info.max_priority)}, "
        f"max active tasks {_limit(info.max_active_tasks)} (from its next submission)"
    )
    return 0


def _limit_value(text: str) -> str:
    if text != "default" and not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number or 'default', not {text!r}")
    return text


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%SZ")


def _cmd_keys_list(args: argparse.Namespace) -> int:
    with _key_session(args) as session:
        keys = list_keys(session=session)
    if args.json:
        print(json.dumps([key.model_dump(mode="json") for key in keys], indent=2))
        return 0
    rows = [("NAME", "ROLE", "ID", "CREATED", "REVOKED", "LAST USED", "MAX_PRIORITY", "MAX_ACTIVE")]
    rows += [
        (key.name, str(key.role), key.key_id, _when(key.created_at), _when(key.revoked_at),
         _when(key.last_used_at), _limit(key.max_priority), _limit(key.max_active_tasks))
        for key in keys
    ]  # fmt: skip
    _print_table(rows)
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _key_session(args) as session:
        info = revoke_key(session=session, name_or_id=args.name_or_id, actor=OPERATOR_CLI)
    print(
        f"key {info.name!r} (id {info.key_id}) is revoked since {_when(info.revoked_at)}; "
        "the public API refuses it within seconds"
    )
    return 0


def _gpus(consumer: ConsumerPublic) -> str:
    if not consumer.gpus:
        return "-"
    return ",".join(
        f"{gpu.index}:{gpu.memory_total_mb}MiB{' (sim)' if gpu.simulated else ''}" for gpu in consumer.gpus
    )


def _print_table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _cmd_consumers_list(args: argparse.Namespace) -> int:
    with _key_session(args) as session:
        consumers = list_consumers(session=session, lost_after_s=DatabaseSettings().consumer_lost_after_s)
    if args.json:
        print(json.dumps([consumer.model_dump(mode="json") for consumer in consumers], indent=2))
        return 0
    if not consumers:
        print("no consumer is registered")
        return 0
    rows = [("ID", "STATE", "HOST", "GPUS", "RUNNING", "LAST SEEN")]
    rows += [
        (consumer.id, str(consumer.state), consumer.host, _gpus(consumer), str(len(consumer.running_tasks)),
         _when(consumer.last_seen_at))
        for consumer in consumers
    ]  # fmt: skip
    _print_table(rows)
    return 0


def _cmd_consumers_drain(args: argparse.Namespace) -> int:
    draining = args.consumers_command == "drain"
    with _key_session(args) as session:
        consumer = set_draining(
            session=session,
            consumer_id=args.consumer_id,
            draining=draining,
            lost_after_s=DatabaseSettings().consumer_lost_after_s,
            actor=OPERATOR_CLI,
        )
    if draining:
        running = len(consumer.running_tasks)
        print(
            f"consumer {consumer.id!r} is draining: it takes no new task and finishes the {running} it "
            "runs (it learns it at its next heartbeat); `consumers resume` undoes it"
        )
    else:
        print(f"consumer {consumer.id!r} takes tasks again ({consumer.state})")
    return 0


def _cmd_audit_list(args: argparse.Namespace) -> int:
    with _key_session(args) as session:
        entries = list_entries(
            session=session, action=args.action, actor=args.actor, target=args.target, limit=args.limit
        )
    if args.json:
        print(json.dumps([entry.model_dump(mode="json") for entry in entries], indent=2))
        return 0
    rows = [("ID", "AT", "ACTOR", "ACTION", "TARGET", "DETAILS")]
    rows += [
        (str(entry.id), _when(entry.at), entry.actor + (f" ({entry.actor_role})" if entry.actor_role else ""),
         str(entry.action), entry.target, json.dumps(entry.details, sort_keys=True) if entry.details else "-")
        for entry in entries
    ]  # fmt: skip
    _print_table(rows)
    return 0


def add_operator_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `db`, `keys`, `consumers` and `audit` to a command line; each sets `handler(args) -> exit
    code`, and expects the top-level parser to define `--verbose`."""
    database = commands.add_parser("db", help="database maintenance")
    db_commands = database.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="migrate the database to the latest revision")
    upgrade.add_argument("--database-url", help="default: IS_DATABASE_URL")
    upgrade.set_defaults(handler=_cmd_db_upgrade)

    keys = commands.add_parser(
        "keys",
        help="create, list, limit and revoke API keys",
        description="API keys, kept (hashed) in the platform's database: run this where "
        "IS_DATABASE_URL reaches it, e.g. `docker compose exec private_api inference-server keys list`.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("name", metavar="NAME", help="the owner's label; their tasks are recorded under it")
    create.add_argument("--operator", action="store_true", help="may also manage models and see every task")
    limits_help = (
        f"the highest priority its tasks may ask for (0..{MAX_PRIORITY}); default: IS_DEFAULT_MAX_PRIORITY "
        f"for users, {MAX_PRIORITY} for operators"
    )
    active_help = (
        "how many pending plus running tasks it may hold, 0 for no limit; default: "
        "IS_DEFAULT_MAX_ACTIVE_TASKS for users, no limit for operators"
    )
    create.add_argument("--max-priority", type=int, metavar="N", help=limits_help)
    create.add_argument("--max-active-tasks", type=int, metavar="N", help=active_help)
    create.set_defaults(handler=_cmd_keys_create)
    limit_cmd = key_commands.add_parser(
        "set", help="change a key's limits (by name or id); 'default' returns one to its role's default"
    )
    limit_cmd.add_argument("name_or_id", metavar="NAME_OR_ID")
    limit_cmd.add_argument("--max-priority", type=_limit_value, metavar="N|default", help=limits_help)
    limit_cmd.add_argument("--max-active-tasks", type=_limit_value, metavar="N|default", help=active_help)
    limit_cmd.set_defaults(handler=_cmd_keys_set)
    listing = key_commands.add_parser("list", help="name, role, id and dates of every key (never the key)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_cmd_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its name or id")
    revoke.add_argument("name_or_id", metavar="NAME_OR_ID")
    revoke.set_defaults(handler=_cmd_keys_revoke)
    secret_cmd = key_commands.add_parser(
        "webhook-secret",
        help="print the secret that signs a key's webhooks (by name or id); --rotate replaces it",
    )
    secret_cmd.add_argument("name_or_id", metavar="NAME_OR_ID")
    secret_cmd.add_argument(
        "--rotate", action="store_true", help="draw a new secret; the old one stops signing at once"
    )
    secret_cmd.set_defaults(handler=_cmd_keys_webhook_secret)
    for command in (create, limit_cmd, listing, revoke, secret_cmd):
        command.add_argument("--database-url", help="default: IS_DATABASE_URL")

    consumers = commands.add_parser(
        "consumers",
        help="list the job consumers; drain one for host maintenance, resume it after",
        description="The consumers registered in the platform's database: run this where "
        "IS_DATABASE_URL reaches it, e.g. `docker compose exec private_api inference-server consumers list`.",
    )
    consumer_commands = consumers.add_subparsers(dest="consumers_command", required=True)
    consumer_list = consumer_commands.add_parser(
        "list", help="every consumer: state (idle, busy, draining, lost), host, GPUs, running tasks"
    )
    consumer_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    consumer_list.set_defaults(handler=_cmd_consumers_list)
    drain = consumer_commands.add_parser("drain", help="let a consumer finish its tasks and take no more")
    resume = consumer_commands.add_parser("resume", help="let a drained consumer take tasks again")
    for command in (drain, resume):
        command.add_argument("consumer_id", metavar="ID")
        command.set_defaults(handler=_cmd_consumers_drain)
    for command in (consumer_list, drain, resume):
        command.add_argument("--database-url", help="default: IS_DATABASE_URL")

    audit = commands.add_parser(
        "audit",
        help="read the audit trail: who changed models, tasks, keys and consumers, and when",
        description="The audit trail in the platform's database, newest first: run this where "
        "IS_DATABASE_URL reaches it, e.g. `docker compose exec private_api inference-server audit list`.",
    )
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_list = audit_commands.add_parser("list", help="the newest entries, optionally filtered")
    audit_list.add_argument("--action", type=AuditAction, choices=list(AuditAction), help="only this action")
    audit_list.add_argument("--actor", help="only entries by this key name (or platform, operator CLI)")
    audit_list.add_argument("--target", help="only entries about this model id, task uid, key or consumer")
    audit_list.add_argument(
        "--limit",
        type=int,
        default=AUDIT_PAGE_DEFAULT,
        help=f"at most this many (default {AUDIT_PAGE_DEFAULT})",
    )
    audit_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    audit_list.add_argument("--database-url", help="default: IS_DATABASE_URL")
    audit_list.set_defaults(handler=_cmd_audit_list)
