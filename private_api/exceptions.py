"""The domain errors the service raises; errors.py turns each into one HTTP status, in one place."""

from __future__ import annotations

from inference_server.contract import ACTOR_REFUSED_HEADER, CLAIM_REFUSED_DRAINING


class DomainError(Exception):
    """Base of every error a caller can cause; the message is the `detail` the caller sees."""

    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadInput(DomainError):
    """The request is well-formed but its content is unusable (not a zip, unsafe zip, bad multipart)."""

    status_code = 400


class Unauthorized(DomainError):
    status_code = 401


class Forbidden(DomainError):
    """A known caller without the right to this request (a service token of another role)."""

    status_code = 403


class ActorForbidden(DomainError):
    """The user a relayed request acts for may not do this (the calling service may)."""

    status_code = 403
    headers = {ACTOR_REFUSED_HEADER: "true"}


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    """The resource is not in a state that allows the request (already claimed, finished, named)."""

    status_code = 409


class ConsumerDraining(DomainError):
    """A draining consumer asked for a new task (CLAIM_REFUSED_DRAINING)."""

    status_code = CLAIM_REFUSED_DRAINING


class TooLarge(DomainError):
    status_code = 413


class Unprocessable(DomainError):
    """A required part of the request is missing or contradicts another part."""

    status_code = 422


class TooManyActiveTasks(DomainError):
    """The key has as many pending and running tasks as it may; another is welcome once one ends."""

    status_code = 429

    def __init__(self, detail: str, retry_after_s: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after_s)}
