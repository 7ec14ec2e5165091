"""ConsumerSettings: read from IS_* variables once, refusing a missing token at start-up."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from job_consumer.config import ConsumerSettings

TOKEN = "consumer-config-token-0123"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("IS_SERVICE_TOKEN", "IS_GPU", "IS_CONSUMER_ID", "IS_WORK_DIR", "IS_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_missing_short_or_blank_service_token_is_refused(monkeypatch):
    with pytest.raises(ValidationError, match="service_token"):
        ConsumerSettings()
    monkeypatch.setenv("IS_SERVICE_TOKEN", "   ")
    with pytest.raises(ValidationError, match="must not be empty"):
        ConsumerSettings()
    monkeypatch.setenv("IS_SERVICE_TOKEN", "short-token")
    with pytest.raises(ValidationError, match="at least 16 characters"):
        ConsumerSettings()


def test_reads_is_prefixed_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IS_SERVICE_TOKEN", TOKEN)
    monkeypatch.setenv("IS_QUEUE_NAME", "q1")
    monkeypatch.setenv("IS_DEFAULT_MEMORY_MB", "1024")
    monkeypatch.setenv("IS_DATA_DIR", str(tmp_path))
    settings = ConsumerSettings()
    assert settings.service_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings)
    assert settings.queue_name == "q1"
    assert settings.default_memory_mb == 1024
    assert settings.resolved_work_dir == tmp_path / "work"
    assert settings.input_zip_limits.max_files == settings.zip_max_files


def test_consumer_id_defaults(monkeypatch):
    monkeypatch.setenv("IS_SERVICE_TOKEN", TOKEN)
    host = socket.gethostname()
    cpu = ConsumerSettings()
    assert cpu.gpu is None
    assert cpu.consumer_id.startswith(host[:20])
    monkeypatch.setenv("IS_GPU", "")
    assert ConsumerSettings().gpu is None
    monkeypatch.setenv("IS_GPU", "1")
    gpu = ConsumerSettings()
    assert gpu.gpu == "1"
    assert gpu.consumer_id.endswith("-gpu1")  # stable across restarts, so crash leftovers are found


def test_work_dir_is_made_absolute_and_bad_consumer_ids_refused(monkeypatch):
    monkeypatch.setenv("IS_SERVICE_TOKEN", TOKEN)
    monkeypatch.setenv("IS_WORK_DIR", "relative/work")
    assert ConsumerSettings().resolved_work_dir == Path("relative/work").resolve()
    with pytest.raises(ValidationError, match="consumer id"):
        ConsumerSettings(consumer_id="bad id/../x")


def test_zip_shape_limits_and_tmp_size_are_settings(monkeypatch):
    monkeypatch.setenv("IS_SERVICE_TOKEN", TOKEN)
    defaults = ConsumerSettings()
    assert defaults.default_tmp_mb == 256
    assert (defaults.input_zip_limits.max_depth, defaults.input_zip_limits.max_path_bytes) == (64, 1024)
    assert defaults.input_zip_limits.max_name_bytes == 255
    monkeypatch.setenv("IS_ZIP_MAX_DEPTH", "12")
    monkeypatch.setenv("IS_ZIP_MAX_PATH_BYTES", "300")
    monkeypatch.setenv("IS_ZIP_MAX_NAME_BYTES", "100")
    monkeypatch.setenv("IS_DEFAULT_TMP_MB", "64")
    settings = ConsumerSettings()
    assert settings.default_tmp_mb == 64
    for limits in (settings.input_zip_limits, settings.output_zip_limits):
        assert (limits.max_depth, limits.max_path_bytes, limits.max_name_bytes) == (12, 300, 100)
    # The output may hold more than an input, never names the private API would refuse.
    assert settings.output_zip_limits.allow_empty
    assert settings.output_zip_limits.max_files >= settings.input_zip_limits.max_files
    # More than a filesystem allows for one name cannot be set.
    monkeypatch.setenv("IS_ZIP_MAX_NAME_BYTES", "256")
    with pytest.raises(ValidationError, match="zip_max_name_bytes"):
        ConsumerSettings()
