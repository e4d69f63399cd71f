"""Baseline: the node's schema as ``create_all`` made it before migrations existed.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Each table (with its indexes) is created only if it is missing, so a database
that a crash left half-made by an earlier start still reaches this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def _missing(name: str) -> bool:
    if op.get_context().as_sql:
        return True
    return not sa.inspect(op.get_bind()).has_table(name)


def _table(name: str, *items: sa.schema.SchemaItem, indexes: dict[str, list[str]]) -> None:
    if not _missing(name):
        return
    op.create_table(name, *items)
    for index, columns in indexes.items():
        op.create_index(index, name, columns, unique=False)


def upgrade() -> None:
    _table(
        "api_key",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("revoked_at", WHEN, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_hash"),
        indexes={"ix_api_key_tenant": ["tenant"]},
    )
    _table(
        "instance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("series_key", sa.String(length=64), nullable=False),
        sa.Column("sop_key", sa.String(length=64), nullable=False),
        sa.Column("patient_key", sa.String(length=64), nullable=False),
        sa.Column("accession_key", sa.String(length=64), nullable=True),
        sa.Column("study_date", sa.String(length=8), nullable=True),
        sa.Column("modality", sa.String(length=16), nullable=True),
        sa.Column("series_number", sa.Integer(), nullable=True),
        sa.Column("instance_number", sa.Integer(), nullable=True),
        sa.Column("transfer_syntax_uid", sa.String(length=64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("blob", sa.String(length=200), nullable=False),
        sa.Column("preamble_sanitised", sa.Boolean(), nullable=False),
        sa.Column("stored_at", WHEN, nullable=False),
        sa.Column("attributes", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "sop_key"),
        indexes={
            "ix_instance_accession_key": ["accession_key"],
            "ix_instance_patient_key": ["patient_key"],
            "ix_instance_series_key": ["series_key"],
            "ix_instance_study_date": ["study_date"],
            "ix_instance_study_key": ["study_key"],
            "ix_instance_tenant": ["tenant"],
        },
    )
    _table(
        "outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("study_key", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.Float(), nullable=False),
        sa.Column("claimed_until", sa.Float(), nullable=True),
        sa.Column("sealed_uid", sa.LargeBinary(), nullable=False),
        sa.Column("last_error", sa.String(length=2000), nullable=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant", "study_key"),
        indexes={"ix_outbox_due_at": ["due_at"], "ix_outbox_state": ["state"]},
    )


def downgrade() -> None:
    for name in ("outbox", "instance", "api_key"):
        op.drop_table(name)
