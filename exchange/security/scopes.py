"""SMART on FHIR scopes (v2 ``user/Type.cruds`` and v1 ``user/Type.read|write``)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from exchange.errors import Forbidden

_SCOPE = re.compile(r"^(patient|user|system)/([A-Za-z]+|\*)\.([cruds]+|read|write|\*)(\?.*)?$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


def permits(scopes: Iterable[str], resource_type: str, interaction: str) -> bool:
    """Whether any scope grants ``interaction`` (one of c, r, u, d, s) on ``resource_type``."""
    for scope in scopes:
        match = _SCOPE.match(scope)
        if not match:
            continue
        _context, rtype, perms, _query = match.groups()
        if rtype not in ("*", resource_type):
            continue
        if interaction in _V1.get(perms, perms):
            return True
    return False


def require(scopes: Iterable[str], resource_type: str, interaction: str) -> None:
    if not permits(scopes, resource_type, interaction):
        names = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
        raise Forbidden(f"the token's scopes do not allow {names[interaction]} on {resource_type}")
