"""Consumer routes (operator keys): list the consumers with their state, drain and resume one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from inference_server.contract import CONSUMER_ID_PATTERN, ConsumerPublic, PublicRoutes
from public_api import service
from public_api.deps import OperatorKeyDep, PrivateAPIDep, require_operator_key
from public_api.routes._docs import COMMON_RESPONSES, error

router = APIRouter(
    tags=["consumers"], dependencies=[Depends(require_operator_key)], responses=COMMON_RESPONSES
)

ConsumerId = Annotated[
    str, Path(pattern=CONSUMER_ID_PATTERN, max_length=128, description="The consumer's id.")
]
OPERATOR_KEY_ONLY: dict[int | str, dict[str, Any]] = {
    403: error("The key is valid but not an operator's."),
}
UNKNOWN_CONSUMER: dict[int | str, dict[str, Any]] = {404: error("No consumer with this id is registered.")}


@router.get(
    PublicRoutes.CONSUMERS,
    summary="List the consumers and their state (operators)",
    description=(
        "Every registered consumer, newest first: its host, GPUs, capacity, running tasks and "
        "state: `idle`, `busy`, `draining`, or `lost` once not heard from for IS_CONSUMER_LOST_AFTER_S."
    ),
    response_model=list[ConsumerPublic],
    responses=OPERATOR_KEY_ONLY,
)
async def list_consumers(api: PrivateAPIDep, caller: OperatorKeyDep) -> list[ConsumerPublic]:
    return await service.list_consumers(api, caller=caller)


@router.post(
    PublicRoutes.CONSUMER_DRAIN,
    summary="Drain a consumer: it finishes its tasks and takes no new one (operators)",
    response_model=ConsumerPublic,
    responses={**OPERATOR_KEY_ONLY, **UNKNOWN_CONSUMER},
)
async def drain_consumer(
    consumer_id: ConsumerId, api: PrivateAPIDep, caller: OperatorKeyDep
) -> ConsumerPublic:
    return await service.set_consumer_draining(api, consumer_id, draining=True, caller=caller)


@router.delete(
    PublicRoutes.CONSUMER_DRAIN,
    summary="Resume a drained consumer (operators)",
    response_model=ConsumerPublic,
    responses={**OPERATOR_KEY_ONLY, **UNKNOWN_CONSUMER},
)
async def resume_consumer(
    consumer_id: ConsumerId, api: PrivateAPIDep, caller: OperatorKeyDep
) -> ConsumerPublic:
    return await service.set_consumer_draining(api, consumer_id, draining=False, caller=caller)
