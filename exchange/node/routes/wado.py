"""DICOMweb WADO-RS on the node (placeholder router, filled in by its own change)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
