"""The private API's side of the shared contract: the models table and the acting identity."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect

from inference_server.contract import (
    TASK_UID_RE,
    ActingHeadersError,
    ApiKeyRole,
    ModelCreate,
    ModelLimits,
    ModelPublic,
    ModelUpdate,
    Principal,
    TaskPublic,
    decode_acting_headers,
    encode_acting_headers,
)
from private_api.access import Actor
from private_api.models import Model, Task
from private_api.task_rows import new_task_uid

# Where a model's zip lies in the blob store: the platform's business, never shown.
RECORDED_ONLY = {"model_zip_key"}


def test_the_models_table_has_a_column_for_every_contract_field_and_no_other() -> None:
    """A field added to the contract without a column (and a migration) fails here."""
    columns = set(inspect(Model).columns.keys())
    assert columns - RECORDED_ONLY == set(ModelPublic.model_fields)
    for view in (ModelLimits, ModelCreate, ModelUpdate):
        assert set(view.model_fields) <= columns, view.__name__


def test_every_task_field_of_the_contract_is_a_column_or_derived_from_one() -> None:
    columns = set(inspect(Task).columns.keys())
    # Answered from the row's relations and keys rather than stored under their own name.
    derived = {"model_human_readable_id", "output_present", "webhook"}
    # Computed when the status is read (scheduling.waiting_reason), never stored.
    computed = {"waiting_reason"}
    assert set(TaskPublic.model_fields) - derived - computed <= columns
    assert derived <= {name for name in dir(Task) if isinstance(getattr(Task, name), property)}


@pytest.mark.parametrize(
    ("caller", "actor"),
    [
        (None, Actor(name=None)),
        (Principal(name="alice", role=ApiKeyRole.USER), Actor(name="alice")),
        (Principal(name="root", role=ApiKeyRole.OPERATOR), Actor(name="root", is_operator=True)),
    ],
)
def test_the_acting_identity_survives_the_headers(caller: Principal | None, actor: Actor) -> None:
    acting = decode_acting_headers(encode_acting_headers(caller))
    assert acting is not None and acting.principal == caller
    assert Actor.acting_for(acting.principal) == actor


def test_no_acting_headers_is_the_platform_and_half_of_them_is_refused() -> None:
    assert decode_acting_headers({}) is None
    with pytest.raises(ActingHeadersError, match="X-Acting-Role"):
        decode_acting_headers({"X-Acting-Owner": "alice"})


def test_task_uids_are_valid_and_never_read_as_a_command_line_option() -> None:
    # One uid in 64 would start with "-" if drawn plainly: 5,000 draws would all but surely show one.
    uids = [new_task_uid() for _ in range(5000)]
    assert all(TASK_UID_RE.match(uid) for uid in uids)
    assert not [uid for uid in uids if uid.startswith("-")]
    assert len(set(uids)) == len(uids)
