"""The audit trail: AuditEvents in IHE BALP shapes (``events``), written append-only and
hash-chained with signed checkpoints (``log``)."""

from exchange.audit.events import AuditAction, What, Who, build
from exchange.audit.log import AuditLog, Checkpoint, Verification

__all__ = ["AuditAction", "AuditLog", "Checkpoint", "Verification", "What", "Who", "build"]
