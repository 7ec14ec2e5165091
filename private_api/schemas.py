"""Request schemas only the private API reads; every answer schema lives in the shared contract."""

from __future__ import annotations

from pydantic import Field

from inference_server.contract import CONTAINER_TAG_PATTERN, HUMAN_READABLE_ID_PATTERN, ModelLimits


class ModelCreate(ModelLimits):
    """The query parameters of POST /models (the v1.2 ones plus the optional limits)."""

    human_readable_id: str = Field(pattern=HUMAN_READABLE_ID_PATTERN, max_length=128)
    container_tag: str = Field(pattern=CONTAINER_TAG_PATTERN, max_length=512)
    description: str = Field(default="", max_length=10_000)
    model_available: bool = False
    use_gpu: bool = False
