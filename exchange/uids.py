"""DICOM UIDs (PS3.5 §9.1): one rule for the node's intake and the hub's profiles."""

from __future__ import annotations

import re
from typing import Any

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_LENGTH = 64


def is_uid(value: Any) -> bool:
    """Digits separated by single dots, at most 64 characters.

    Leading zeros in a component are tolerated: the standard forbids them, but
    equipment in the field writes them, and refusing such studies loses images.
    """
    return isinstance(value, str) and len(value) <= MAX_LENGTH and bool(_UID.fullmatch(value))
