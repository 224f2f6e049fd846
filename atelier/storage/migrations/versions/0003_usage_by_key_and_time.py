"""Usage rows indexed by (key, time): a rate-limit verdict reads one key's last minute (or day, or
month) by walking that index, instead of every row of the key. It replaces the index on the key alone.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_usage_key_id_at", "usage", ["key_id", "at"])
    op.drop_index("ix_usage_key_id", table_name="usage")


def downgrade() -> None:
    op.create_index("ix_usage_key_id", "usage", ["key_id"])
    op.drop_index("ix_usage_key_id_at", table_name="usage")
