"""The config's `handoff:` section: who is told when a notification cannot reach a patient (no usable
address, opted out, a hard bounce, a failed send) — a FHIR Task for the front desk on the appointment's
source, or a signed JSON POST to a work queue elsewhere (connector.handoff, connector.sending.handoff)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from connector.config.base import EnvStr, Secret, Strict
from connector.urls import check_url

Reason = Literal["no-address", "opted-out", "bounce", "failed"]
ALL_REASONS: list[Reason] = ["no-address", "opted-out", "bounce", "failed"]
OWNER_PATTERN = r"^(Organization|PractitionerRole|Practitioner|CareTeam|HealthcareService|Group)/[A-Za-z0-9\-.]{1,64}$"


class HandoffConfig(Strict):
    to: Literal["task", "webhook"] = "task"
    reasons: list[Reason] = Field(default_factory=lambda: list(ALL_REASONS), min_length=1)
    mappings: list[str] | None = Field(None, description="only notifications of these mappings; None: every one")
    owner: str | None = Field(
        None,
        pattern=OWNER_PATTERN,
        description="task: who the Task is for, e.g. Organization/front-desk",
    )
    category_optouts: bool = Field(
        False,
        description="hand off a notification skipped because the patient opted out of its (non-essential) "
        "category too; by default only opt-outs of every email, and skips of essential mappings, are",
    )
    secret: Secret | None = None  # webhook: the Standard Webhooks signing secret (whsec_...), before `url`
    url: EnvStr | None = None  # webhook: where the events are POSTed

    @field_validator("url")
    @classmethod
    def _url_safe(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_url(value, credentials=info.data.get("secret") is not None)

    @model_validator(mode="after")
    def _complete(self) -> HandoffConfig:
        if self.to == "webhook" and (self.url is None or self.secret is None):
            raise ValueError("handoff to a webhook needs `url` and `secret` (a Standard Webhooks whsec_ secret)")
        return self


def handoff_to(settings: HandoffConfig | None) -> str:
    """Where hand-offs go: the config's `handoff.to`, or a Task when only mappings turn them on."""
    return settings.to if settings is not None else "task"
