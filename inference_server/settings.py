"""What the services' settings share: the IS_ prefix, the service token and its rule, the
broker's defaults, the zip limits, and one line naming the IS_ variable that is wrong when
start-up fails."""

from __future__ import annotations

import sys
from typing import Annotated

from pydantic import AfterValidator, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from inference_server.zipsafe import ZipLimits

ENV_PREFIX = "IS_"
SERVICE_TOKEN_MIN_LENGTH = 16
_DEFAULT_ZIP_LIMITS = ZipLimits()


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


class ZipLimitSettings(ServiceSettings):
    """The services that take zips apart: the private API checks every zip before storing it, a
    consumer checks it again before unpacking. Set them equal on both (the defaults are)."""

    zip_max_total_bytes: int = Field(default=_DEFAULT_ZIP_LIMITS.max_total_bytes, ge=1)
    # Files and folders, explicit or implied by a deeper path.
    zip_max_files: int = Field(default=_DEFAULT_ZIP_LIMITS.max_files, ge=1)
    zip_max_ratio: float = Field(default=_DEFAULT_ZIP_LIMITS.max_ratio, gt=1)
    # Shape of what is unpacked, and of what a model's /output may be to be zipped: path
    # components, UTF-8 bytes of a whole path and of one name.
    zip_max_depth: int = Field(default=_DEFAULT_ZIP_LIMITS.max_depth, ge=1, le=4096)
    zip_max_path_bytes: int = Field(default=_DEFAULT_ZIP_LIMITS.max_path_bytes, ge=1, le=65535)
    zip_max_name_bytes: int = Field(default=_DEFAULT_ZIP_LIMITS.max_name_bytes, ge=1, le=255)

    @property
    def input_zip_limits(self) -> ZipLimits:
        """Limits for zips users send: task inputs and model zips."""
        return ZipLimits(
            max_total_bytes=self.zip_max_total_bytes,
            max_files=self.zip_max_files,
            max_ratio=self.zip_max_ratio,
            max_depth=self.zip_max_depth,
            max_path_bytes=self.zip_max_path_bytes,
            max_name_bytes=self.zip_max_name_bytes,
        )

    @property
    def output_zip_limits(self) -> ZipLimits:
        """What a consumer zips a model's /output under, and the private API checks it against."""
        return self.input_zip_limits.for_output()


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
