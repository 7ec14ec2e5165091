"""The registered models: list, look up, register, change and remove them, and their zips."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from inference_server.contract import AuditAction, ModelCreate, ModelPublic, ModelUpdate
from private_api import audit, blob_sharing
from private_api.access import Actor, refuse_loosened_isolation
from private_api.blobs import BlobStore, StoredBlob
from private_api.exceptions import ActorForbidden, Conflict, NotFound, Unprocessable
from private_api.models import Model, Task, utcnow
from private_api.task_params import checked_schema
from private_api.task_rows import ACTIVE_STATUSES

log = logging.getLogger(__name__)


def _load_model(session: Session, human_readable_id: str) -> Model | None:
    return session.scalars(select(Model).where(Model.human_readable_id == human_readable_id)).first()


def required_model(session: Session, human_readable_id: str) -> Model:
    model = _load_model(session, human_readable_id)
    if model is None:
        raise NotFound(f"model {human_readable_id!r} is not registered")
    return model


def list_models(*, session: Session) -> list[ModelPublic]:
    models = session.scalars(select(Model).order_by(Model.human_readable_id))
    return [ModelPublic.model_validate(model) for model in models]


def get_model(*, session: Session, human_readable_id: str) -> ModelPublic:
    return ModelPublic.model_validate(required_model(session, human_readable_id))


def ensure_model_name_free(*, session: Session, human_readable_id: str) -> None:
    """Cheap early refusal, so a duplicate does not upload a large zip first (create re-checks)."""
    if _load_model(session, human_readable_id) is not None:
        raise Conflict(f"a model named {human_readable_id!r} already exists")


def create_model(
    *,
    session: Session,
    params: ModelCreate,
    model_zip: StoredBlob | None,
    actor: Actor | None = None,
    params_schema: dict[str, Any] | None = None,
) -> ModelPublic:
    """Register a model; the caller deletes `model_zip` if this raises."""
    refuse_loosened_isolation(actor, params.model_dump())
    if params.model_available and model_zip is None:
        raise Unprocessable("model_available=true needs the model zip in the multipart file field 'zip_file'")
    if model_zip is not None and not params.model_available:
        raise Unprocessable("a model zip was sent but model_available is false; send model_available=true")
    model = Model(
        **params.model_dump(),
        params_schema=checked_schema(params_schema),
        model_zip_key=model_zip.key if model_zip else None,
        model_zip_sha256=model_zip.sha256 if model_zip else None,
        created_at=utcnow(),
    )
    session.add(model)
    try:
        session.flush()
        public = ModelPublic.model_validate(model)
        details = {"container_tag": params.container_tag, "model_available": params.model_available}
        audit.record(
            session,
            audit.AuditActor.of(actor),
            AuditAction.MODEL_REGISTERED,
            model.human_readable_id,
            details,
        )
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"a model named {params.human_readable_id!r} already exists") from exc
    log.info("registered model %s (%s)", model.human_readable_id, model.container_tag)
    return public


def update_model(
    *, session: Session, human_readable_id: str, changes: ModelUpdate, actor: Actor | None = None
) -> ModelPublic:
    """Change a model's description or limits: only the fields present in `changes` (a limit set
    to None returns to the platform default). Tasks claimed from now on run with the new values."""
    values = changes.model_dump(exclude_unset=True)
    refuse_loosened_isolation(actor, values)
    if "params_schema" in values:
        checked_schema(values["params_schema"])
    model = required_model(session, human_readable_id)
    for field, value in values.items():
        setattr(model, field, value)
    public = ModelPublic.model_validate(model)
    audit.record(
        session,
        audit.AuditActor.of(actor),
        AuditAction.MODEL_UPDATED,
        human_readable_id,
        _update_details(changes),
    )
    session.commit()
    log.info("updated model %s: %s", human_readable_id, sorted(changes.model_fields_set))
    return public


# Fields whose values may run to kilobytes: an audit entry names them, without their values.
_BULKY_FIELDS = frozenset({"description", "params_schema"})


def _update_details(changes: ModelUpdate) -> dict[str, Any]:
    """What an update's audit entry says: every field it set, and the new values of the limits
    and switches (a model holds no secret)."""
    changed = changes.model_dump(mode="json", exclude_unset=True)
    values = {field: value for field, value in changed.items() if field not in _BULKY_FIELDS}
    return {"fields": sorted(changed), "values": values}


def model_zip_key(*, session: Session, human_readable_id: str) -> str:
    model = required_model(session, human_readable_id)
    if model.model_zip_key is None:
        raise NotFound(f"model {human_readable_id!r} has no model zip")
    return model.model_zip_key


def delete_model(
    *, session: Session, blobs: BlobStore, human_readable_id: str, actor: Actor | None = None
) -> ModelPublic:
    """Remove a model with its zip and its finished tasks; refused while tasks are pending or
    running, and to anyone but an operator while it holds tasks of other owners."""
    model = required_model(session, human_readable_id)
    public = ModelPublic.model_validate(model)
    if actor is not None and not actor.is_operator:
        others = session.scalar(
            select(func.count())
            .select_from(Task)
            .where(Task.model_id == model.id, Task.owner.is_distinct_from(actor.name))
        )
        if others:
            raise ActorForbidden(
                f"model {human_readable_id!r} holds {others} tasks of other owners; "
                "only an operator may remove it"
            )
    active = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(Task.model_id == model.id, Task.status.in_(ACTIVE_STATUSES))
    )
    if active:
        raise Conflict(
            f"model {human_readable_id!r} has {active} pending or running tasks; cancel them first"
        )
    old_tasks = session.execute(
        select(Task.input_blob_key, Task.output_blob_key, Task.log_blob_key, Task.model_from_blob_key).where(
            Task.model_id == model.id
        )
    ).all()
    session.execute(
        delete(Task)
        .where(Task.model_id == model.id, Task.status.not_in(ACTIVE_STATUSES))
        .execution_options(synchronize_session=False)
    )
    session.delete(model)
    audit.record(session, audit.AuditActor.of(actor), AuditAction.MODEL_REMOVED, human_readable_id)
    try:
        session.commit()
    except IntegrityError as exc:
        # A task was submitted between the check and the delete: its foreign key stops us.
        session.rollback()
        raise Conflict(f"model {human_readable_id!r} received a task meanwhile; try again") from exc
    # A cached result or a chained task of another model may share one of these blobs.
    blob_sharing.release(session, blobs, (key for keys in old_tasks for key in keys))
    blobs.delete(model.model_zip_key)
    log.info("deleted model %s and %d finished tasks", human_readable_id, len(old_tasks))
    return public
