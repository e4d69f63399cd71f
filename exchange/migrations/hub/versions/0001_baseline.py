"""Baseline: the hub's schema as ``create_all`` made it before migrations existed.

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

#: Row keys: 64-bit on PostgreSQL, SQLite's rowid alias (INTEGER PRIMARY KEY) there.
KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
#: Normalised search strings compare byte-wise on both databases.
NORM = sa.String(length=200).with_variant(sa.String(length=200, collation="C"), "postgresql")


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
        "access_code",
        sa.Column("id", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("patient", sa.String(length=64), nullable=False),
        sa.Column("studies", sa.Text(), nullable=False),
        sa.Column("organization", sa.String(length=64), nullable=True),
        sa.Column("issued_by", sa.String(length=255), nullable=False),
        sa.Column("issued_ms", sa.BigInteger(), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("verified_ms", sa.BigInteger(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("expires_ms", sa.BigInteger(), nullable=False),
        sa.Column("revoked_ms", sa.BigInteger(), nullable=True),
        sa.Column("revoked_by", sa.String(length=255), nullable=True),
        sa.Column("replaced_by", sa.String(length=16), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("locked_until_ms", sa.BigInteger(), nullable=False),
        sa.Column("backoff_ms", sa.BigInteger(), nullable=False),
        sa.Column("lockouts", sa.Integer(), nullable=False),
        sa.Column("redemptions", sa.Integer(), nullable=False),
        sa.Column("last_redeemed_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        indexes={"ix_access_code_patient": ["patient"]},
    )
    _table(
        "access_code_address",
        sa.Column("address", sa.String(length=64), nullable=False),
        sa.Column("window_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("address"),
        indexes={},
    )
    _table(
        "audit_chain",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("resource_id", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("recorded_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("resource_id"),
        indexes={"ix_audit_chain_recorded_ms": ["recorded_ms"]},
    )
    _table(
        "audit_checkpoint",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("jws", sa.Text(), nullable=False),
        sa.Column("created_ms", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        indexes={},
    )
    _table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        indexes={},
    )
    _table(
        "fhir_history",
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("rtype", "id", "version"),
        indexes={},
    )
    _table(
        "fhir_resource",
        sa.Column("pk", KEY, nullable=False),
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_ms", sa.BigInteger(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("facts", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("rtype", "id", name="uq_fhir_resource_type_id"),
        indexes={
            "ix_fhir_resource_type_pk": ["rtype", "pk"],
            "ix_fhir_resource_type_updated": ["rtype", "updated_ms"],
        },
    )
    _table(
        "mpi_review",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("first", sa.String(length=64), nullable=False),
        sa.Column("second", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("first", "second"),
        indexes={},
    )
    _table(
        "fhir_idx_date",
        sa.Column("row", KEY, nullable=False),
        sa.Column("res_pk", KEY, nullable=False),
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("start_ms", sa.BigInteger(), nullable=False),
        sa.Column("end_ms", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["res_pk"], ["fhir_resource.pk"]),
        sa.PrimaryKeyConstraint("row"),
        indexes={
            "ix_fhir_idx_date_range": ["rtype", "param", "start_ms", "end_ms", "res_pk"],
            "ix_fhir_idx_date_res_pk": ["res_pk"],
        },
    )
    _table(
        "fhir_idx_ref",
        sa.Column("row", KEY, nullable=False),
        sa.Column("res_pk", KEY, nullable=False),
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=64), nullable=False),
        sa.Column("target_id", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["res_pk"], ["fhir_resource.pk"]),
        sa.PrimaryKeyConstraint("row"),
        indexes={
            "ix_fhir_idx_ref_res_pk": ["res_pk"],
            "ix_fhir_idx_ref_target": ["rtype", "param", "target_type", "target_id", "res_pk"],
        },
    )
    _table(
        "fhir_idx_string",
        sa.Column("row", KEY, nullable=False),
        sa.Column("res_pk", KEY, nullable=False),
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("norm", NORM, nullable=False),
        sa.Column("exact", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["res_pk"], ["fhir_resource.pk"]),
        sa.PrimaryKeyConstraint("row"),
        indexes={
            "ix_fhir_idx_string_res_pk": ["res_pk"],
            "ix_fhir_idx_string_value": ["rtype", "param", "norm", "res_pk"],
        },
    )
    _table(
        "fhir_idx_token",
        sa.Column("row", KEY, nullable=False),
        sa.Column("res_pk", KEY, nullable=False),
        sa.Column("rtype", sa.String(length=64), nullable=False),
        sa.Column("param", sa.String(length=64), nullable=False),
        sa.Column("system", sa.String(), nullable=False),
        sa.Column("code", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["res_pk"], ["fhir_resource.pk"]),
        sa.PrimaryKeyConstraint("row"),
        indexes={
            "ix_fhir_idx_token_code": ["rtype", "param", "code", "res_pk"],
            "ix_fhir_idx_token_res_pk": ["res_pk"],
            "ix_fhir_idx_token_value": ["rtype", "param", "system", "code", "res_pk"],
        },
    )


def downgrade() -> None:
    for name in (
        "fhir_idx_token",
        "fhir_idx_string",
        "fhir_idx_ref",
        "fhir_idx_date",
        "mpi_review",
        "fhir_resource",
        "fhir_history",
        "audit_head",
        "audit_checkpoint",
        "audit_chain",
        "access_code_address",
        "access_code",
    ):
        op.drop_table(name)
