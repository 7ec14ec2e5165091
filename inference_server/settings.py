"""What every service's settings share: naming the IS_ variable that is wrong when start-up fails."""

from __future__ import annotations

from pydantic import ValidationError

ENV_PREFIX = "IS_"


def describe_settings_errors(exc: ValidationError) -> str:
    """One line naming each bad environment variable, e.g. `IS_SERVICE_TOKEN: Field required`."""
    return "; ".join(
        f"{ENV_PREFIX}{'_'.join(str(part) for part in error['loc']).upper()}: {error['msg']}"
        for error in exc.errors()
    )
