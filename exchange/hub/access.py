"""Which stored resources a caller may see: the one hook every read and search passes.

Searches call ``filter_visible`` on *candidates* (type, id and the facts a
policy needs: an ImagingStudy's subject, identifiers and endpoints, a
Consent's patient, …) before anything is counted, paged or included, so a
hidden resource cannot show through ``total``, ``_include``, paging links or
``_summary=count``. Direct reads, version reads and history call
``require_visible``, which refuses with a 403 instead.

Until the policy engine decides per resource (a later issue), every
authenticated caller sees what the type-level check already let through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, TypeVar

from exchange.errors import Forbidden
from exchange.security.tokens import Principal


class Visible(Protocol):
    """What the hook is given: the resource's identity and its access facts."""

    @property
    def resource_type(self) -> str: ...

    @property
    def id(self) -> str: ...

    @property
    def facts(self) -> Mapping[str, Sequence[str]]: ...


T = TypeVar("T", bound=Visible)


def filter_visible(principal: Principal, items: Sequence[T]) -> list[T]:
    """The items ``principal`` may see, in their original order (a batch: one decision
    round for a whole page of candidates)."""
    del principal  # every authenticated caller, until the policy decides per resource
    return list(items)


def require_visible(principal: Principal, item: Visible) -> None:
    """403 unless ``principal`` may see ``item``."""
    if not filter_visible(principal, [item]):
        raise Forbidden(f"you may not see this {item.resource_type}")
