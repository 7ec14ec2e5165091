"""The consumer registry: consumers register and heartbeat; operators list, drain and resume them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path

from inference_server.contract import (
    CONSUMER_ID_HEADER,
    CONSUMER_ID_PATTERN,
    ConsumerHeartbeat,
    ConsumerHeartbeatReply,
    ConsumerPublic,
    ConsumerRegistration,
    PrivateRoutes,
)
from private_api import consumer_registry
from private_api.audit import AuditActor
from private_api.deps import (
    ActorDep,
    MaintenanceDep,
    SessionDep,
    SettingsDep,
    require_operator_actor,
    require_service_token,
)
from private_api.exceptions import Unprocessable

router = APIRouter(tags=["consumers"], dependencies=[Depends(require_service_token)])

ConsumerId = Annotated[str, Path(pattern=CONSUMER_ID_PATTERN, description="the consumer's id")]
CallerId = Annotated[
    str | None,
    Header(alias=CONSUMER_ID_HEADER, pattern=CONSUMER_ID_PATTERN, description="the calling consumer's id"),
]
_UNKNOWN: dict[int | str, dict[str, Any]] = {404: {"description": "no consumer with this id is registered"}}


def _same_consumer(consumer_id: str, caller_id: str | None) -> None:
    if caller_id is not None and caller_id != consumer_id:
        raise Unprocessable(
            f"{CONSUMER_ID_HEADER} {caller_id!r} is not the consumer {consumer_id!r} in the path"
        )


@router.put(PrivateRoutes.CONSUMER, response_model=ConsumerPublic)
def register_consumer(
    consumer_id: ConsumerId,
    registration: ConsumerRegistration,
    session: SessionDep,
    settings: SettingsDep,
    maintenance: MaintenanceDep,
    caller_id: CallerId = None,
) -> ConsumerPublic:
    _same_consumer(consumer_id, caller_id)
    consumer = consumer_registry.register_consumer(
        session=session,
        consumer_id=consumer_id,
        registration=registration,
        lost_after_s=settings.consumer_lost_after_s,
    )
    maintenance.publish_soon()  # tasks held for want of such a consumer may go out now
    return consumer


@router.post(PrivateRoutes.CONSUMER_HEARTBEAT, response_model=ConsumerHeartbeatReply, responses=_UNKNOWN)
def consumer_heartbeat(
    consumer_id: ConsumerId, beat: ConsumerHeartbeat, session: SessionDep, caller_id: CallerId = None
) -> ConsumerHeartbeatReply:
    _same_consumer(consumer_id, caller_id)
    return consumer_registry.heartbeat(session=session, consumer_id=consumer_id, beat=beat)


@router.get(
    PrivateRoutes.CONSUMERS,
    response_model=list[ConsumerPublic],
    dependencies=[Depends(require_operator_actor)],
)
def list_consumers(session: SessionDep, settings: SettingsDep) -> list[ConsumerPublic]:
    return consumer_registry.list_consumers(session=session, lost_after_s=settings.consumer_lost_after_s)


@router.post(
    PrivateRoutes.CONSUMER_DRAIN,
    response_model=ConsumerPublic,
    responses=_UNKNOWN,
    dependencies=[Depends(require_operator_actor)],
)
def drain_consumer(
    consumer_id: ConsumerId, session: SessionDep, settings: SettingsDep, actor: ActorDep
) -> ConsumerPublic:
    return consumer_registry.set_draining(
        session=session,
        consumer_id=consumer_id,
        draining=True,
        lost_after_s=settings.consumer_lost_after_s,
        actor=AuditActor.of(actor),
    )


@router.delete(
    PrivateRoutes.CONSUMER_DRAIN,
    response_model=ConsumerPublic,
    responses=_UNKNOWN,
    dependencies=[Depends(require_operator_actor)],
)
def resume_consumer(
    consumer_id: ConsumerId,
    session: SessionDep,
    settings: SettingsDep,
    maintenance: MaintenanceDep,
    actor: ActorDep,
) -> ConsumerPublic:
    consumer = consumer_registry.set_draining(
        session=session,
        consumer_id=consumer_id,
        draining=False,
        lost_after_s=settings.consumer_lost_after_s,
        actor=AuditActor.of(actor),
    )
    maintenance.publish_soon()
    return consumer
