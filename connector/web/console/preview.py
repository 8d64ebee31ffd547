"""A notification's email as it would be sent now, for the console's preview: read from the sources at this
moment by the same preparer the dispatcher uses, rendered, shown once and never stored (operators only,
each preview audited by the caller)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from connector.models import Email
from connector.sending.preparer import Gone, NoSource, NotSendable, NotYet

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from connector.ledger import NotificationRecord
    from connector.mapping.loader import MappingSet
    from connector.sending.preparer import Preparer


@dataclass(frozen=True)
class Shown:
    """The rendered email, or why there is none (`problem`)."""

    email: Email | None
    problem: str | None = None


class Previewer:
    def __init__(self, mappings: MappingSet, preparers: Mapping[str, Preparer], clock: Callable[[], datetime]) -> None:
        self.mappings, self.preparers, self.clock = mappings, preparers, clock

    async def __call__(self, n: NotificationRecord) -> Shown:
        mapping = self.mappings.get(n.mapping)
        preparer = self.preparers.get(n.resource_type)
        if mapping is None or preparer is None:
            return Shown(None, f"no mapping {n.mapping!r} or no preparer for {n.resource_type} in this process")
        prepared = await preparer.prepare(n, mapping, self.clock())
        if isinstance(prepared, Email):
            return Shown(prepared)
        if isinstance(prepared, NotSendable):
            return Shown(None, f"it would not be sent now ({prepared.state.value}): {prepared.reason}")
        if isinstance(prepared, NotYet):
            return Shown(None, f"the source cannot be read now: {prepared.reason}")
        if isinstance(prepared, NoSource):
            return Shown(None, f"source {prepared.source!r} is not configured in this process")
        assert isinstance(prepared, Gone)
        return Shown(None, f"Appointment/{prepared.resource_id} is no longer on source {prepared.source!r}")
