"""Model registration and lookup (operators, through the public API)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from inference_server.contract import (
    MODEL_PARAMS_SCHEMA_FIELD,
    ModelCreate,
    ModelPublic,
    ModelUpdate,
    PrivateRoutes,
)
from private_api import access, model_registry, task_params
from private_api.deps import (
    ActorDep,
    BlobsDep,
    SessionDep,
    SettingsDep,
    ZipUploadsDep,
    require_service_token,
)
from private_api.responses import zip_response
from private_api.uploads import zip_request_body

router = APIRouter(tags=["models"], dependencies=[Depends(require_service_token)])


@router.post(
    PrivateRoutes.MODELS,
    status_code=201,
    response_model=ModelPublic,
    openapi_extra=zip_request_body(required=False),
)
async def create_model(
    params: Annotated[ModelCreate, Query()],
    session: SessionDep,
    settings: SettingsDep,
    uploads: ZipUploadsDep,
    actor: ActorDep,
) -> ModelPublic:
    # Refused before the zip streams in, like a duplicate name.
    access.refuse_loosened_isolation(actor, params.model_dump())
    await run_in_threadpool(
        model_registry.ensure_model_name_free, session=session, human_readable_id=params.human_readable_id
    )
    # Hand the connection back while the zip streams in; a large model zip takes a while.
    await run_in_threadpool(session.close)
    async with uploads.optional_zip("models", settings.input_zip_limits) as model_zip:
        # A refused schema deletes the stored zip (the `async with`), like any refusal here.
        params_schema = task_params.schema_from_form(uploads.text_fields.get(MODEL_PARAMS_SCHEMA_FIELD))
        return await run_in_threadpool(
            model_registry.create_model,
            session=session,
            params=params,
            model_zip=model_zip,
            actor=actor,
            params_schema=params_schema,
        )


@router.get(PrivateRoutes.MODELS, response_model=list[ModelPublic])
def list_models(session: SessionDep) -> list[ModelPublic]:
    return model_registry.list_models(session=session)


@router.get(PrivateRoutes.MODEL, response_model=ModelPublic)
def get_model(human_readable_id: str, session: SessionDep) -> ModelPublic:
    return model_registry.get_model(session=session, human_readable_id=human_readable_id)


@router.patch(PrivateRoutes.MODEL, response_model=ModelPublic)
def update_model(
    human_readable_id: str, changes: ModelUpdate, session: SessionDep, actor: ActorDep
) -> ModelPublic:
    return model_registry.update_model(
        session=session, human_readable_id=human_readable_id, changes=changes, actor=actor
    )


@router.get(PrivateRoutes.MODEL_ZIP, response_class=StreamingResponse)
def get_model_zip(human_readable_id: str, session: SessionDep, blobs: BlobsDep) -> StreamingResponse:
    key = model_registry.model_zip_key(session=session, human_readable_id=human_readable_id)
    return zip_response(
        blobs,
        key,
        f"{human_readable_id}.zip",
        f"the zip file of model {human_readable_id!r} is missing from storage",
    )


@router.delete(PrivateRoutes.MODEL, response_model=ModelPublic)
def delete_model(
    human_readable_id: str, session: SessionDep, blobs: BlobsDep, actor: ActorDep
) -> ModelPublic:
    return model_registry.delete_model(
        session=session, blobs=blobs, human_readable_id=human_readable_id, actor=actor
    )
