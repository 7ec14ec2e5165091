"""The settings every service shares: one token rule, the IS_ prefix, one start-up error line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from inference_server.settings import ServiceSettings, describe_settings_errors, refuse_to_start
from job_consumer.config import ConsumerSettings
from private_api.config import PrivateSettings
from public_api.config import PublicSettings

SERVICES = [PrivateSettings, PublicSettings, ConsumerSettings]
GOOD_TOKEN = "settings-tests-token-0123"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("IS_SERVICE_TOKEN", "IS_RABBITMQ_URL", "IS_QUEUE_NAME", "IS_CONSUMER_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("settings_class", SERVICES)
@pytest.mark.parametrize(
    ("token", "problem"),
    [
        (None, "IS_SERVICE_TOKEN: Field required"),
        ("", "IS_SERVICE_TOKEN: Value error, must not be empty or blank"),
        (" " * 20, "IS_SERVICE_TOKEN: Value error, must not be empty or blank"),
        ("x" * 15, "IS_SERVICE_TOKEN: Value error, must be at least 16 characters long"),
    ],
)
def test_every_service_refuses_the_same_bad_tokens(settings_class, token, problem, monkeypatch):
    if token is not None:
        monkeypatch.setenv("IS_SERVICE_TOKEN", token)
    with pytest.raises(ValidationError) as refused:
        settings_class()
    assert describe_settings_errors(refused.value) == problem


@pytest.mark.parametrize("settings_class", SERVICES)
def test_every_service_reads_its_token_from_the_environment_and_ignores_others(settings_class, monkeypatch):
    monkeypatch.setenv("IS_SERVICE_TOKEN", "x" * 16)
    monkeypatch.setenv("IS_SOME_OTHER_SERVICES_SETTING", "1")
    settings = settings_class()
    assert isinstance(settings, ServiceSettings)
    assert settings.service_token.get_secret_value() == "x" * 16
    assert "x" * 16 not in repr(settings)


def test_broker_defaults_are_shared():
    private = PrivateSettings(service_token=GOOD_TOKEN)
    consumer = ConsumerSettings(service_token=GOOD_TOKEN)
    assert private.rabbitmq_url == consumer.rabbitmq_url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert private.queue_name == consumer.queue_name == "inference_tasks"


def test_the_private_apis_role_tokens_follow_the_same_rule():
    with pytest.raises(ValidationError) as refused:
        PrivateSettings(service_token=GOOD_TOKEN, public_api_token="short", consumer_token=" " * 16)
    assert describe_settings_errors(refused.value) == (
        "IS_PUBLIC_API_TOKEN: Value error, must be at least 16 characters long; "
        "IS_CONSUMER_TOKEN: Value error, must not be empty or blank"
    )


def test_errors_of_the_settings_as_a_whole_carry_no_variable_name():
    with pytest.raises(ValidationError) as refused:
        ConsumerSettings(service_token=GOOD_TOKEN, consumer_id="no spaces")
    assert describe_settings_errors(refused.value).startswith("Value error, consumer id 'no spaces'")


def test_refuse_to_start_says_it_in_one_line_and_fails(capsys):
    with pytest.raises(ValidationError) as refused:
        PublicSettings()
    assert refuse_to_start("public_api", refused.value) == 2
    assert capsys.readouterr().err == "public_api: invalid settings: IS_SERVICE_TOKEN: Field required\n"
