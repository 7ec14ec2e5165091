"""The dashboard's overview as JSON: queues, consumers, recent outcomes and per-model timings."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from inference_server.contract import (
    OVERVIEW_HOURS_DEFAULT,
    OVERVIEW_HOURS_MAX,
    PlatformOverview,
    PublicRoutes,
)
from public_api import service
from public_api.deps import KeyHolderDep, PrivateAPIDep, require_key
from public_api.routes._docs import COMMON_RESPONSES

router = APIRouter(tags=["overview"], dependencies=[Depends(require_key)], responses=COMMON_RESPONSES)


@router.get(
    PublicRoutes.OVERVIEW,
    summary="The platform at a glance (any key)",
    description=(
        "Tasks pending and running, finished and failed in the last hour, each model's median "
        "queue wait and run time, and a history of the last `hours` hours in 24 buckets. Operators "
        "see every task (`scope` all); a user's task figures count their own tasks (`scope` own). "
        "Queue depths and consumer counts are the platform's for everyone."
    ),
    response_model=PlatformOverview,
)
async def get_overview(
    api: PrivateAPIDep,
    caller: KeyHolderDep,
    hours: Annotated[
        int, Query(ge=1, le=OVERVIEW_HOURS_MAX, description="How many hours of history.")
    ] = OVERVIEW_HOURS_DEFAULT,
) -> PlatformOverview:
    return await service.overview(api, caller=caller, hours=hours)
