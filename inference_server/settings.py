"""What every service's settings share: the IS_ prefix, the service token and its rule, the
broker's defaults, and one line naming the IS_ variable that is wrong when start-up fails."""

from __future__ import annotations

import sys
from typing import Annotated

from pydantic import AfterValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "IS_"
SERVICE_TOKEN_MIN_LENGTH = 16


def _hard_to_guess(token: SecretStr) -> SecretStr:
    value = token.get_secret_value()
    if not value.strip():
        raise ValueError("must not be empty or blank")
    if len(value) < SERVICE_TOKEN_MIN_LENGTH:
        raise ValueError(f"must be at least {SERVICE_TOKEN_MIN_LENGTH} characters long")
    return token


# Every token a service presents to the private API, or the private API accepts. A guessable
# token is an open door, so a short or blank one stops the service at start-up, not at first use.
ServiceToken = Annotated[SecretStr, AfterValidator(_hard_to_guess)]


class ServiceSettings(BaseSettings):
    """Read once from IS_* environment variables at start-up; variables of other services ignored."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # No default on purpose: a service that cannot prove itself (or, in the private API, check
    # others) is useless, so it must fail at start-up, not at the first request.
    service_token: ServiceToken


class BrokerSettings(ServiceSettings):
    """The services that use RabbitMQ: the private API publishes task ids, consumers take them."""

    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    queue_name: str = Field(default="inference_tasks", min_length=1, max_length=255)


def describe_settings_errors(exc: ValidationError) -> str:
    """One line naming each bad environment variable, e.g. `IS_SERVICE_TOKEN: Field required`."""
    return "; ".join(_describe(error["loc"], error["msg"]) for error in exc.errors())


def _describe(location: tuple[int | str, ...], message: str) -> str:
    # An error of the settings as a whole (several variables together) has no location.
    name = "_".join(str(part) for part in location).upper()
    return f"{ENV_PREFIX}{name}: {message}" if name else message


def refuse_to_start(service: str, exc: ValidationError) -> int:
    """Tell the operator, in one line on stderr, which settings are wrong; the exit status to return."""
    print(f"{service}: invalid settings: {describe_settings_errors(exc)}", file=sys.stderr)
    return 2
