"""What every section of the config is made of: strict models (unknown keys are errors), strings that may
read the environment, and secrets given by reference only (connector.references)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, WrapValidator

from connector.references import SecretRef, expand_env


def _key_of_32_bytes(value: SecretRef) -> SecretRef:
    """A key given as base64 of exactly 32 bytes (AES-256, HMAC-SHA256), checked at load when it can be read
    then (else where it is used); the message never echoes it."""
    if value.problem() is not None:
        return value
    try:
        raw = base64.b64decode(value.get_secret_value(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("must be base64 of exactly 32 random bytes (e.g. `openssl rand -base64 32`)")
    return value


EnvStr = Annotated[str, WrapValidator(expand_env)]  # ${VAR} expanded at load; unset: kept, refused where needed
Secret = SecretRef  # ${VAR} or {file: path}, read when first used
Key32 = Annotated[SecretRef, AfterValidator(_key_of_32_bytes)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
