"""Model routes: the v1.2 list and register, plus change and remove (operators)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from inference_server.contract import (
    HUMAN_READABLE_ID_PATTERN,
    MODEL_PARAMS_SCHEMA_FIELD,
    ModelCreate,
    ModelPublic,
    ModelUpdate,
    PublicRoutes,
)
from public_api import service
from public_api.deps import ModelManagerDep, PrivateAPIDep, SettingsDep, model_reader, require_operator
from public_api.json_body import json_request_body, read_json
from public_api.relay import upload_body
from public_api.routes._docs import COMMON_RESPONSES, OPERATOR_ONLY, error, zip_upload_body

router = APIRouter(tags=["models"], responses=COMMON_RESPONSES)

ModelId = Annotated[
    str, Path(pattern=HUMAN_READABLE_ID_PATTERN, max_length=128, description="The model's human_readable_id.")
]


@router.get(PublicRoutes.MODELS.rstrip("/"), include_in_schema=False, dependencies=[Depends(model_reader)])
@router.get(
    PublicRoutes.MODELS,
    summary="List models (v1.2)",
    response_model=list[ModelPublic],
    dependencies=[Depends(model_reader)],
)
async def list_models(api: PrivateAPIDep) -> list[ModelPublic]:
    return await service.list_models(api)


@router.post(
    PublicRoutes.MODELS.rstrip("/"), include_in_schema=False, dependencies=[Depends(require_operator)]
)
@router.post(
    PublicRoutes.MODELS,
    summary="Register a model (v1.2; operators)",
    response_model=ModelPublic,
    dependencies=[Depends(require_operator)],
    responses={
        **OPERATOR_ONLY,
        400: error("The model zip is not a valid, safe zip."),
        409: error("A model with this human_readable_id exists."),
        413: error("The upload is larger than allowed."),
        422: error("The params_schema is not valid JSON Schema."),
    },
    openapi_extra=zip_upload_body(
        required=False,
        description="Optional static files for the model, unpacked at /model.",
        text_fields={
            MODEL_PARAMS_SCHEMA_FIELD: "A JSON Schema (its $schema's draft, else the latest) that "
            "the params of each task must satisfy; a task without params is checked as {}.",
        },
    ),
)
async def register_model(
    request: Request,
    caller: ModelManagerDep,
    api: PrivateAPIDep,
    settings: SettingsDep,
    # The private API's own schema, so /docs states the bounds the private API applies.
    params: Annotated[ModelCreate, Query()],
) -> ModelPublic:
    return await service.register_model(
        api, caller=caller, params=params, body=upload_body(request, settings.max_upload_bytes)
    )


@router.patch(
    PublicRoutes.MODEL,
    summary="Change a model's description or limits (operators)",
    description=(
        "Only the fields sent change; a limit sent as `null` returns to the platform default. "
        "Tasks started from now on run with the new values."
    ),
    response_model=ModelPublic,
    dependencies=[Depends(require_operator)],
    responses={
        **OPERATOR_ONLY,
        400: error("The body is not valid JSON."),
        404: error("No model with this id."),
        413: error("The body is larger than IS_MAX_JSON_BYTES."),
        415: error("The body is not sent as application/json."),
    },
    # The body is read by the handler, after require_operator: never for a refused caller.
    openapi_extra=json_request_body(ModelUpdate),
)
async def update_model(
    human_readable_id: ModelId, request: Request, caller: ModelManagerDep, api: PrivateAPIDep
) -> ModelPublic:
    changes = await read_json(request, ModelUpdate)
    return await service.update_model(api, human_readable_id, changes, caller=caller)


@router.delete(
    PublicRoutes.MODEL,
    summary="Remove a model, its zip and its finished tasks (operators)",
    response_model=ModelPublic,
    dependencies=[Depends(require_operator)],
    responses={
        **OPERATOR_ONLY,
        404: error("No model with this id."),
        409: error("The model still has pending or running tasks; cancel them first."),
    },
)
async def delete_model(
    human_readable_id: ModelId, caller: ModelManagerDep, api: PrivateAPIDep
) -> ModelPublic:
    return await service.delete_model(api, human_readable_id, caller=caller)
