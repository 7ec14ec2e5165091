"""Model routes: the v1.2 list and register, plus change and remove (operators)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from inference_server.contract import (
    CONTAINER_TAG_PATTERN,
    HUMAN_READABLE_ID_PATTERN,
    ModelLimits,
    ModelPublic,
    ModelUpdate,
    PublicRoutes,
)
from public_api import service
from public_api.deps import ModelManagerDep, PrivateAPIDep, SettingsDep, model_reader, require_operator
from public_api.json_body import json_request_body, read_json
from public_api.relay import upload_body
from public_api.routes._docs import COMMON_RESPONSES, OPERATOR_ONLY, error, zip_upload_body

_LIMITS = ModelLimits.model_fields

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
    },
    openapi_extra=zip_upload_body(
        required=False, description="Optional static files for the model, unpacked at /model."
    ),
)
async def register_model(
    request: Request,
    caller: ModelManagerDep,
    api: PrivateAPIDep,
    settings: SettingsDep,
    container_tag: Annotated[str, Query(pattern=CONTAINER_TAG_PATTERN, description="Docker image.")],
    human_readable_id: Annotated[
        str, Query(pattern=HUMAN_READABLE_ID_PATTERN, description="Stable name tasks are sent to.")
    ],
    description: Annotated[str, Query(max_length=10_000)] = "",
    model_available: Annotated[bool | None, Query(description="True when zip_file is sent.")] = None,
    use_gpu: bool | None = None,
    # Same bounds as the private API applies, taken from the shared schema, so /docs tells the truth.
    timeout_s: Annotated[
        int | None, *_LIMITS["timeout_s"].metadata, Query(description="Seconds per task.")
    ] = None,
    memory_mb: Annotated[int | None, *_LIMITS["memory_mb"].metadata, Query()] = None,
    cpus: Annotated[float | None, *_LIMITS["cpus"].metadata, Query()] = None,
    pids: Annotated[int | None, *_LIMITS["pids"].metadata, Query()] = None,
    tmp_mb: Annotated[
        int | None, *_LIMITS["tmp_mb"].metadata, Query(description="Size of the tmpfs at /tmp, in MB.")
    ] = None,
    allow_network: bool | None = None,
    run_as_root: bool | None = None,
    writable_rootfs: Annotated[
        bool | None, Query(description="Let the model write its root filesystem (read-only by default).")
    ] = None,
) -> ModelPublic:
    params = {
        "container_tag": container_tag,
        "human_readable_id": human_readable_id,
        "description": description,
        "model_available": model_available,
        "use_gpu": use_gpu,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "cpus": cpus,
        "pids": pids,
        "tmp_mb": tmp_mb,
        "allow_network": allow_network,
        "run_as_root": run_as_root,
        "writable_rootfs": writable_rootfs,
    }
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
