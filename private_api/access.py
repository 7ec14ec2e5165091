"""Who may see and change what: the user a relayed request acts for, and the rules on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement
from sqlalchemy.orm import Session

from inference_server.contract import MODEL_SWITCHES, Principal, TaskStatus
from private_api.exceptions import ActorForbidden, NotFound
from private_api.models import Task
from private_api.task_rows import load_task


@dataclass(frozen=True)
class Actor:
    """Whom a relayed user request acts for, as the public API states it (X-Acting-* headers).

    `name` None is an anonymous caller. An operator sees every task; anyone else sees only the
    tasks recorded under their name, and anonymous callers only anonymous tasks. A task someone
    may not see answers exactly like an unknown one, so its existence is never revealed.
    Functions given no actor serve the platform itself (consumers, operator tools): no limits.
    """

    name: str | None
    is_operator: bool = False

    @classmethod
    def acting_for(cls, principal: Principal | None) -> Actor:
        """The actor for a key's principal; None is an anonymous caller."""
        if principal is None:
            return cls(name=None)
        return cls(name=principal.name, is_operator=principal.is_operator)


def owner_conditions(actor: Actor | None) -> tuple[ColumnElement[bool], ...]:
    """SQL conditions restricting tasks to those `actor` may see (none for the platform, operators)."""
    if actor is None or actor.is_operator:
        return ()
    if actor.name is None:
        return (Task.owner.is_(None),)
    return (Task.owner == actor.name,)


def may_see(actor: Actor | None, task: Task) -> bool:
    return actor is None or actor.is_operator or task.owner == actor.name


def visible_task(session: Session, uid: str, actor: Actor | None = None) -> Task:
    """The task, unless it is unknown, deleted or not `actor`'s: all three answer the same."""
    task = load_task(session, uid)
    if task is None or task.status == TaskStatus.DELETED or not may_see(actor, task):
        raise NotFound(f"task {uid} is unknown or was deleted")
    return task


def refuse_loosened_isolation(actor: Actor | None, values: dict[str, Any]) -> None:
    """Only operators loosen a model's isolation. Others reach the model routes only through
    the IS_ANONYMOUS_MODELS compatibility switch, which must not open the host to them."""
    if actor is None or actor.is_operator:
        return
    for switch in MODEL_SWITCHES:
        if values.get(switch):
            raise ActorForbidden(f"only an operator key may set {switch}")
