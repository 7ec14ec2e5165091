"""`infer`: the command line for users of the public API.

Exit status: 0 success, 1 any failure (one line `infer: error: ...` on stderr), 2 bad usage,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from pydantic import BaseModel

from inference_client.client import InferenceClient, InferenceClientError
from inference_server.contract import (
    AUDIT_PAGE_MAX,
    MAX_PRIORITY,
    TASK_UID_SEARCH_MIN_CHARS,
    AuditAction,
    ConsumerPublic,
    GpuInfo,
    ModelPublic,
    TaskPublic,
    TaskStatus,
)
from inference_server.zipsafe import UnsafeZipError, ZipLimits, extract_zip

DEFAULT_URL = "http://127.0.0.1:8000"
# Outputs come from our own server, and segmentation masks legitimately compress far beyond any
# bomb-guard ratio; the size limit on what is written still applies.
OUTPUT_ZIP_LIMITS = ZipLimits(max_ratio=float("inf"), allow_empty=True)

Handler = Callable[[InferenceClient, argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as every other failure."""

    def error(self, message: str) -> NoReturn:
        _say_error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


WARM_HELP = "consumers keep a container of the model created ahead, even before its first task"


def _say_error(message: str) -> None:
    print(f"infer: error: {' '.join(str(message).split())}", file=sys.stderr)


def _print_json(value: BaseModel | Sequence[BaseModel]) -> None:
    if isinstance(value, BaseModel):
        print(value.model_dump_json(indent=2))
    else:
        print(json.dumps([item.model_dump(mode="json") for item in value], indent=2))


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Left-aligned columns two spaces apart; trailing blanks cut, so an empty last cell leaves none."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _progress(args: argparse.Namespace) -> bool | None:
    # None lets tqdm decide: bars only when stderr is a terminal.
    return True if args.progress else None


def _save_output(client: InferenceClient, uid: str, out: str | None, progress: bool | None) -> None:
    """Write the output zip to `out` (default <uid>.zip), or unpack it when `out` is a folder."""
    if out is None:
        out = f"{uid}.zip"
    if not (out.endswith(("/", os.sep)) or Path(out).is_dir()):
        saved = client.download(uid, out, progress=progress)
        print(f"infer: output of task {uid} saved to {saved}", file=sys.stderr)
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="infer-download-") as scratch:
        archive = client.download(uid, Path(scratch) / f"{uid}.zip", progress=progress)
        extract_zip(archive, folder, OUTPUT_ZIP_LIMITS)
    print(f"infer: output of task {uid} unpacked in {folder}", file=sys.stderr)


def _models_list(client: InferenceClient, args: argparse.Namespace) -> int:
    models = client.list_models()
    if args.json:
        _print_json(models)
        return 0
    rows = [("ID", "CONTAINER TAG", "GPU", "MODEL ZIP", "DESCRIPTION")]
    rows += [
        (m.human_readable_id, m.container_tag, _model_gpu(m), "yes" if m.model_available else "no",
         m.description)
        for m in models
    ]  # fmt: skip
    _print_table(rows)
    return 0


def _model_gpu(model: ModelPublic) -> str:
    """'no', 'yes', or 'yes (8000 MiB)' when the model declares the GPU memory one task needs."""
    if not model.use_gpu:
        return "no"
    return "yes" if model.gpu_memory_mb is None else f"yes ({model.gpu_memory_mb} MiB)"


def _read_json_object(path: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise InferenceClientError(None, f"{what} {path} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InferenceClientError(None, f"{what} {path} must hold a JSON object")
    return value


def _param(text: str) -> tuple[str, Any]:
    """--param key=value: the value as JSON when it parses (0.1, true, [1,2]), else the text."""
    key, separator, raw = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected key=value: {text!r}")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _task_params(args: argparse.Namespace) -> dict[str, Any] | None:
    """--params-file first, then each --param over it; None when neither was given."""
    if args.params_file is None and not args.param:
        return None
    params = {} if args.params_file is None else _read_json_object(args.params_file, "--params-file")
    params.update(dict(args.param))
    return params


def _models_add(client: InferenceClient, args: argparse.Namespace) -> int:
    schema = None if args.params_schema is None else _read_json_object(args.params_schema, "--params-schema")
    model = client.add_model(
        args.container_tag,
        args.human_readable_id,
        args.description,
        # Declaring GPU memory only means something for a GPU model, so it implies --gpu.
        use_gpu=args.gpu or args.gpu_memory_mb is not None,
        model_zip=args.model_zip,
        progress=_progress(args),
        params_schema=schema,
        cacheable=args.cacheable,
        warm=args.warm,
        gpu_memory_mb=args.gpu_memory_mb,
        cpus=args.cpus,
        memory_mb=args.memory_mb,
    )
    _print_json(model)
    return 0


def _models_update(client: InferenceClient, args: argparse.Namespace) -> int:
    changes = {"warm": args.warm} if args.warm is not None else {}
    if not changes:
        raise InferenceClientError(None, "nothing to change: give --warm or --no-warm")
    _print_json(client.update_model(args.model, **changes))
    return 0


def _submit(client: InferenceClient, args: argparse.Namespace) -> int:
    uid = client.submit(
        args.model,
        args.path,
        priority=args.priority,
        progress=_progress(args),
        params=_task_params(args),
        webhook_url=args.webhook,
        input_from=args.input_from,
        model_from=args.model_from,
        cache=not args.no_cache,
    )
    print(uid, flush=True)
    if not args.wait:
        return 0
    task = client.wait(uid, poll_interval=args.poll_interval, timeout=args.timeout, on_change=_report_change)
    if task.status != TaskStatus.FINISHED:
        reason = f": {task.error}" if task.error else ""
        raise InferenceClientError(None, f"task {uid} {task.status}{reason}")
    _save_output(client, uid, args.output, _progress(args))
    return 0


def _report_change(task: TaskPublic) -> None:
    """One stderr line per change while `submit --wait` waits, so a user sees why nothing happens."""
    reason = f": {task.waiting_reason}" if task.waiting_reason else ""
    if task.progress is not None and not task.status.is_terminal:
        reason += f" {task.progress:.0%}" + (f" {task.progress_message}" if task.progress_message else "")
    print(f"infer: task {task.uid} {task.status}{reason}", file=sys.stderr, flush=True)


def _list(client: InferenceClient, args: argparse.Namespace) -> int:
    tasks = client.list_tasks(
        status=args.status, limit=args.limit, model=args.model, owner=args.owner, uid=args.uid
    )
    if args.json:
        _print_json(tasks)
        return 0
    rows = [("UID", "STATUS", "MODEL", "CREATED", "WAITING")]
    rows += [
        (
            task.uid,
            str(task.status),
            task.model_human_readable_id,
            _time(task.created_at),
            # Only a pending task has a reason; others leave the last column empty.
            task.waiting_reason or "",
        )
        for task in tasks
    ]
    _print_table(rows)
    return 0


def _status(client: InferenceClient, args: argparse.Namespace) -> int:
    _print_json(client.status(args.uid))
    return 0


def _get(client: InferenceClient, args: argparse.Namespace) -> int:
    _save_output(client, args.uid, args.output, _progress(args))
    return 0


def _logs(client: InferenceClient, args: argparse.Namespace) -> int:
    if args.follow:
        text = ""
        for text in client.follow_logs(args.uid):
            sys.stdout.write(text)
            sys.stdout.flush()
        if text and not text.endswith("\n"):
            sys.stdout.write("\n")
        return 0
    text = client.logs(args.uid)
    sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
    return 0


def _cancel(client: InferenceClient, args: argparse.Namespace) -> int:
    _print_json(client.cancel(args.uid))
    return 0


def _delete(client: InferenceClient, args: argparse.Namespace) -> int:
    _print_json(client.delete(args.uid))
    return 0


def _consumers_list(client: InferenceClient, args: argparse.Namespace) -> int:
    consumers = client.list_consumers()
    if args.json:
        _print_json(consumers)
        return 0
    rows = [("ID", "STATE", "HOST", "RUNTIME", "GPU", "RUNNING", "LAST SEEN")]
    rows += [
        (
            consumer.id,
            str(consumer.state),
            consumer.host,
            consumer.runtime,
            _consumer_gpus(consumer),
            str(len(consumer.running_tasks)),
            _time(consumer.last_seen_at),
        )
        for consumer in consumers
    ]
    _print_table(rows)
    return 0


def _consumer_gpus(consumer: ConsumerPublic) -> str:
    """'-' without a GPU, else each GPU's memory, e.g. '24576 MiB simulated, 81920 MiB'."""
    return ", ".join(_gpu_label(gpu) for gpu in consumer.gpus) or "-"


def _gpu_label(gpu: GpuInfo) -> str:
    return f"{gpu.memory_total_mb} MiB simulated" if gpu.simulated else f"{gpu.memory_total_mb} MiB"


def _consumers_drain(client: InferenceClient, args: argparse.Namespace) -> int:
    _print_json(client.drain_consumer(args.consumer_id))
    return 0


def _consumers_resume(client: InferenceClient, args: argparse.Namespace) -> int:
    _print_json(client.resume_consumer(args.consumer_id))
    return 0


def _audit(client: InferenceClient, args: argparse.Namespace) -> int:
    entries = client.list_audit_entries(
        action=args.action,
        actor=args.actor,
        target=args.target,
        since=args.since,
        until=args.until,
        before_id=args.before_id,
        limit=args.limit,
    )
    if args.json:
        _print_json(entries)
        return 0
    rows = [("ID", "AT", "ACTOR", "ACTION", "TARGET", "DETAILS")]
    rows += [
        (
            str(entry.id),
            _time(entry.at),
            entry.actor if entry.actor_role is None else f"{entry.actor} ({entry.actor_role})",
            str(entry.action),
            entry.target,
            json.dumps(entry.details, sort_keys=True) if entry.details else "-",
        )
        for entry in entries
    ]
    _print_table(rows)
    return 0


def _aware_time(text: str) -> datetime:
    """An ISO 8601 time; one without an offset is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an ISO 8601 time like 2026-12-02T09:00Z, not {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _list_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be 1-1000: {text!r}")
    return value


def _uid_start(text: str) -> str:
    if len(text) < TASK_UID_SEARCH_MIN_CHARS:
        raise argparse.ArgumentTypeError(f"give at least {TASK_UID_SEARCH_MIN_CHARS} characters: {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="infer",
        description="Submit zips to models on an InferenceServer and fetch the results.",
        epilog="Token: --token, else IS_API_TOKEN, else <IS_DATA_DIR or ./data>/operator.key.",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("IS_URL") or DEFAULT_URL,
        help=f"public API base URL (env IS_URL, default {DEFAULT_URL})",
    )
    parser.add_argument("--token", help="API token, sent as 'Authorization: Bearer'")
    parser.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    parser.add_argument(
        "--progress", action="store_true", help="show progress bars even when stderr is not a terminal"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="list or register models")
    model_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    models_list = model_commands.add_parser("list", help="list the models")
    models_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models_list.set_defaults(handler=_models_list)
    models_add = model_commands.add_parser("add", help="register a model (operators)")
    models_add.add_argument("--container-tag", required=True, help="Docker image of the model")
    models_add.add_argument("--id", dest="human_readable_id", required=True, help="name tasks use")
    models_add.add_argument("--description", required=True)
    models_add.add_argument("--gpu", action="store_true", help="the model needs a GPU")
    models_add.add_argument("--model-zip", metavar="PATH", help="zip or folder mounted at /model")
    models_add.add_argument(
        "--gpu-memory-mb",
        type=_positive_int,
        metavar="N",
        help="GPU memory one task needs, in MiB; GPUs take several tasks while they fit (implies --gpu)",
    )
    models_add.add_argument("--cpus", type=_positive_float, metavar="X", help="CPU cores one task may use")
    models_add.add_argument(
        "--memory-mb", type=_positive_int, metavar="N", help="memory one task may use, in MiB"
    )
    models_add.add_argument(
        "--params-schema", metavar="FILE", help="JSON Schema file every task's params must satisfy"
    )
    models_add.add_argument(
        "--cacheable",
        action="store_true",
        help="deterministic: a task with the same image, model zip, input and params reuses an output",
    )
    models_add.add_argument("--warm", action="store_true", help=WARM_HELP)
    models_add.set_defaults(handler=_models_add)
    models_update = model_commands.add_parser("update", help="change a registered model (operators)")
    models_update.add_argument("model", metavar="MODEL", help="the model's id")
    models_update.add_argument(
        "--warm", action=argparse.BooleanOptionalAction, default=None, help=f"{WARM_HELP} (--no-warm: not)"
    )
    models_update.set_defaults(handler=_models_update)

    submit = commands.add_parser("submit", help="submit a zip or a folder as a task; prints its uid")
    submit.add_argument("model", metavar="MODEL", help="the model's id")
    submit.add_argument(
        "path", metavar="PATH", nargs="?", help="a zip file, or a folder to zip (none with --after)"
    )
    submit.add_argument(
        "--param",
        type=_param,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a param the model reads at /params.json (repeatable; VALUE as JSON when it parses, else text)",
    )
    submit.add_argument("--params-file", metavar="FILE", help="a JSON object of params; --param adds to it")
    submit.add_argument("--webhook", metavar="URL", help="POSTed to when the task runs and ends (signed)")
    submit.add_argument(
        "--after",
        "--input-from",
        dest="input_from",
        metavar="UID",
        help="the input is task UID's output (it may still be running: this task waits), instead of PATH",
    )
    submit.add_argument(
        "--model-from", metavar="UID", help="task UID's output is mounted at /model (fine-tuning)"
    )
    submit.add_argument(
        "--no-cache", action="store_true", help="run even when a cacheable model has this result already"
    )
    submit.add_argument("--wait", action="store_true", help="wait for the task, then fetch its output")
    submit.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="with --wait: where to save (default <uid>.zip; a folder unzips)",
    )
    submit.add_argument(
        "--priority",
        type=int,
        default=0,
        choices=range(MAX_PRIORITY + 1),
        metavar="N",
        help=f"0-{MAX_PRIORITY}, higher runs sooner",
    )
    submit.add_argument("--timeout", type=_positive_float, metavar="S", help="with --wait: give up after S s")
    submit.add_argument(
        "--poll-interval",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="with --wait, on servers without long polls (?wait=): seconds between polls (default 2)",
    )
    submit.set_defaults(handler=_submit)

    listing = commands.add_parser("list", help="your tasks, newest first (an operator's key: all)")
    listing.add_argument("--status", choices=[str(status) for status in TaskStatus], help="only these")
    listing.add_argument("--limit", type=_list_limit, default=100, metavar="N", help="1-1000 (default 100)")
    listing.add_argument("--model", metavar="ID", help="only this model's tasks")
    listing.add_argument("--owner", metavar="NAME", help="only the tasks of this key name (operators)")
    listing.add_argument(
        "--uid",
        type=_uid_start,
        metavar="START",
        help=f"only tasks whose uid starts with this ({TASK_UID_SEARCH_MIN_CHARS} characters or more)",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_list)

    for name, handler, text in (
        ("status", _status, "a task's status as JSON"),
        ("logs", _logs, "a task's container log"),
        ("cancel", _cancel, "cancel a pending or running task"),
        ("delete", _delete, "delete a task and its data"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("uid", metavar="UID")
        command.set_defaults(handler=handler)
        if name == "logs":
            command.add_argument(
                "-f", "--follow", action="store_true", help="print the log as it grows, until the task ends"
            )

    consumers = commands.add_parser("consumers", help="list, drain or resume job consumers (operators)")
    consumer_commands = consumers.add_subparsers(dest="consumers_command", required=True, metavar="COMMAND")
    consumers_list = consumer_commands.add_parser("list", help="the consumers and their state")
    consumers_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    consumers_list.set_defaults(handler=_consumers_list)
    for name, handler, text in (
        ("drain", _consumers_drain, "let a consumer finish its tasks and take no new one"),
        ("resume", _consumers_resume, "let a drained consumer take tasks again"),
    ):
        command = consumer_commands.add_parser(name, help=text)
        command.add_argument("consumer_id", metavar="ID", help="the consumer's id (see 'consumers list')")
        command.set_defaults(handler=handler)

    audit = commands.add_parser(
        "audit", help="who changed models, tasks, keys and consumers, and when, newest first (operators)"
    )
    audit.add_argument("--action", type=AuditAction, choices=list(AuditAction), help="only this action")
    audit.add_argument("--actor", help="only entries by this key name (or platform, 'operator CLI')")
    audit.add_argument("--target", help="only entries about this model id, task uid, key name or consumer id")
    audit.add_argument("--since", type=_aware_time, metavar="TIME", help="only at or after this ISO time")
    audit.add_argument("--until", type=_aware_time, metavar="TIME", help="only before this ISO time")
    audit.add_argument(
        "--before-id", type=_positive_int, metavar="ID", help="the next page: entries older than ID"
    )
    audit.add_argument(
        "--limit",
        type=_positive_int,
        metavar="N",
        help=f"at most N entries (default 100, at most {AUDIT_PAGE_MAX})",
    )
    audit.add_argument("--json", action="store_true", help="print JSON instead of a table")
    audit.set_defaults(handler=_audit)

    get = commands.add_parser("get", help="download a finished task's output")
    get.add_argument("uid", metavar="UID")
    get.add_argument("-o", "--output", metavar="OUT", help="default <uid>.zip; a folder (or OUT/) unzips")
    get.set_defaults(handler=_get)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        with InferenceClient(args.url, token=args.token, verify=not args.insecure) as client:
            return handler(client, args)
    except InferenceClientError as exc:
        _say_error(str(exc))
    except UnsafeZipError as exc:
        _say_error(f"the output zip cannot be unpacked safely: {exc}")
    except OSError as exc:
        _say_error(str(exc))
    except KeyboardInterrupt:
        _say_error("interrupted")
        return 130
    except Exception as exc:  # a bug still ends in one line, never a traceback
        _say_error(f"unexpected {type(exc).__name__}: {exc}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
