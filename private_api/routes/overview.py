"""The dashboard's overview, for the acting caller (PlatformOverview)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from inference_server.contract import (
    OVERVIEW_HOURS_DEFAULT,
    OVERVIEW_HOURS_MAX,
    PlatformOverview,
    PrivateRoutes,
)
from private_api import overview
from private_api.deps import ActorDep, SessionDep, SettingsDep, require_service_token

router = APIRouter(tags=["overview"], dependencies=[Depends(require_service_token)])


@router.get(PrivateRoutes.OVERVIEW, response_model=PlatformOverview)
def get_overview(
    session: SessionDep,
    actor: ActorDep,
    settings: SettingsDep,
    hours: Annotated[int, Query(ge=1, le=OVERVIEW_HOURS_MAX)] = OVERVIEW_HOURS_DEFAULT,
) -> PlatformOverview:
    return overview.platform_overview(
        session=session, actor=actor, lost_after_s=settings.consumer_lost_after_s, hours=hours
    )
