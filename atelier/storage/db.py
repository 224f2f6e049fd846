"""SQLAlchemy tables: models, versions, aliases, API keys, audit entries, jobs, files, artifacts.

SQLite (WAL mode) by default; PostgreSQL (or any SQLAlchemy URL) through ATELIER_DATABASE_URL.
The schema is changed only by Alembic migrations (atelier/storage/migrations/versions/), which
`make_engine` applies at every start: a new table or column is a new revision there.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, ForeignKey, Index, Integer, String, Text, UniqueConstraint, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# The database went away (restarted, network lost, pool exhausted): what failed could succeed a moment
# later. psycopg's and SQLite's errors both arrive as these.
DATABASE_DOWN = (OperationalError, InterfaceError, PoolTimeout)


class Base(DeclarativeBase):
    pass


class Model(Base):
    __tablename__ = "models"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    family: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(64))
    owner: Mapped[str] = mapped_column(String(64), default="atelier")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    versions: Mapped[list["Version"]] = relationship(back_populates="model", order_by="Version.number",
                                                     cascade="all, delete-orphan")
    aliases: Mapped[list["Alias"]] = relationship(back_populates="model", cascade="all, delete-orphan")


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("model_id", "number"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    files: Mapped[dict] = mapped_column(JSON)  # file name -> sha256 of its blob
    config: Mapped[dict] = mapped_column(JSON)  # the family's model config
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    training: Mapped[dict] = mapped_column(JSON, default=dict)  # train config, data provenance, history
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    model: Mapped[Model] = relationship(back_populates="versions")


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    version_number: Mapped[int] = mapped_column(Integer)
    model: Mapped[Model] = relationship(back_populates="aliases")


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # public id, e.g. key_3f9a…
    name: Mapped[str] = mapped_column(String(128), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to recognise a key in lists
    hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # sha256 of the secret
    scopes: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    limits: Mapped[dict | None] = mapped_column(JSON, default=None)  # rpm, tpm, images_per_day, … (storage/usage.py)
    moderation: Mapped[str | None] = mapped_column(String(8), default=None)  # off|flag|block; None: ATELIER_MODERATION


class Usage(Base):
    """One served request of a key: what rate limits and quotas count, and GET /api/usage sums."""

    __tablename__ = "usage"
    # Rate limits sum one key's rows over a recent window: one index walks exactly those.
    __table_args__ = (Index("ix_usage_key_id_at", "key_id", "at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    route: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str] = mapped_column(String(200), default="")
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    images: Mapped[int] = mapped_column(Integer, default=0)


class AuditEntry(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    key_id: Mapped[str | None] = mapped_column(String(32), default=None)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256), default="")
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The audit chain's signed head (one row): the last entry, how many there are, and since which
    entry the chain is keyed (entries written before it keep their plain SHA-256)."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))
    entries: Mapped[int] = mapped_column(Integer)
    keyed_from: Mapped[int] = mapped_column(Integer)
    mac: Mapped[str] = mapped_column(String(64))


class File(Base):
    """An uploaded file (training data); its bytes are a blob."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # file-…
    filename: Mapped[str] = mapped_column(String(256))
    purpose: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(32))  # jsonl-text | jsonl-prompt | jsonl-chat | text | csv | npz | zip
    records: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """A fine-tuning / training job, run by the worker process."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # ftjob-…
    base_model: Mapped[str] = mapped_column(String(200))  # a model reference, or a family name
    family: Mapped[str] = mapped_column(String(32))
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), default=None)
    hyperparameters: Mapped[dict] = mapped_column(JSON, default=dict)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(32), default="queued", index=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[dict | None] = mapped_column(JSON, default=None)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(200), default=None)
    trained_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    key_id: Mapped[str | None] = mapped_column(String(32), default=None)
    # The worker running it holds a lease it renews; a lease that runs out means that worker is gone
    # (on any replica) and another may queue the job again (atelier/jobs/store.py).
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_until: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict] = mapped_column(JSON, default=dict)


class JobCheckpoint(Base):
    __tablename__ = "job_checkpoints"
    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """A generated output (image, poem, …) with its provenance; its bytes are a blob (by sha256)."""

    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # art_<hex>
    kind: Mapped[str] = mapped_column(String(32), index=True)  # "image" | "poem" | …
    model_ref: Mapped[str] = mapped_column(String(200), index=True, default="")  # name@version
    key_id: Mapped[str | None] = mapped_column(String(32), index=True, default=None)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    mime: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict] = mapped_column(JSON, default=dict)  # every request parameter, the seed included
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class DatabaseUnreachable(RuntimeError):
    """The database cannot be opened or reached at start: the server says so and exits."""


def engine_url(url: str) -> str:
    """`postgresql://` (or Heroku's `postgres://`) means psycopg 3, the driver Atelier installs;
    SQLAlchemy alone would look for psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 — a URL SQLAlchemy cannot parse is shown as its scheme only
        return url.split(":", 1)[0] + ":…"


def make_engine(url: str, *, upgrade: bool = True, pool_size: int = 20, max_overflow: int = 80) -> Engine:
    """An engine for `url`, its schema migrated to the newest revision unless `upgrade` is False; it keeps
    `pool_size` connections open and opens up to `max_overflow` more under load."""
    # Requests hold a connection only while they read or write (generation routes give theirs back
    # before streaming), but a burst of many clients still needs more than the default 5 + 10.
    in_memory = url in ("sqlite://", "sqlite:///:memory:")  # one shared connection: no pool to size
    kwargs = {} if in_memory else {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": 30}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:  # a connection the database dropped (a restart) is replaced, not used
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(engine_url(url), **kwargs)
    except (ImportError, ValueError) as e:  # an unknown driver, a malformed URL
        raise DatabaseUnreachable(f"ATELIER_DATABASE_URL={safe_url(url)}: {e}") from None
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    try:
        if upgrade:
            migrate(engine)
        else:
            engine.connect().close()  # reachable at all?
    except OperationalError as e:  # down, refused, wrong password, a folder that does not exist …
        lines = [line.strip() for line in str(e.orig if e.orig is not None else e).splitlines() if line.strip()]
        reason = " ".join(lines[:2])
        raise DatabaseUnreachable(f"cannot reach the database {safe_url(url)}: {reason}") from None
    return engine


MIGRATIONS = Path(__file__).parent / "migrations"
FIRST_REVISION = "0001"
# Any constant: the key of the PostgreSQL advisory lock that lets one replica at a time migrate or
# bootstrap a shared database.
STARTUP_LOCK = 0x61746C72


@contextmanager
def startup_lock(conn: Connection):
    """Held while a process migrates or bootstraps: on PostgreSQL an advisory lock, so replicas starting
    together take turns; SQLite serves one machine, whose writers SQLite itself serialises. The caller gets
    `conn` with no transaction open: the lock outlives transactions, and Alembic opens its own."""
    if conn.dialect.name != "postgresql":
        yield
        return
    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": STARTUP_LOCK})
    conn.commit()
    try:
        yield
    finally:
        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": STARTUP_LOCK})


def alembic_config(conn: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def revision_of(engine: Engine) -> str | None:
    """The database's schema revision (None: no Atelier schema yet, or one from before migrations)."""
    with engine.connect() as conn:
        return _current(conn)


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(None)).get_current_head()


def migrate(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; return (revision before, revision after).

    A database made before Atelier had migrations (its tables exist, no alembic_version) is first
    given the columns added since by hand, then stamped as the first revision and upgraded from there."""
    from alembic import command

    with engine.connect() as conn, startup_lock(conn):
        before = _current(conn)
        if before is None and inspect(conn).has_table("models"):
            _add_missing_columns(conn)
            command.stamp(alembic_config(conn), FIRST_REVISION)
            conn.commit()
        command.upgrade(alembic_config(conn), "head")
        conn.commit()
        return before, _current(conn)


def _current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _add_missing_columns(conn: Connection) -> None:
    """Columns added to a pre-migrations database by the stopgap that came before Alembic; each is
    nullable, so old rows stay valid. A database that has them all is left as it is."""
    added = {"api_keys": {"limits": "JSON", "moderation": "VARCHAR(8)"}}
    for table, columns in added.items():
        have = {c["name"] for c in inspect(conn).get_columns(table)}
        for name, kind in columns.items():
            if name not in have:
                conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {name} {kind}"))
    conn.commit()


def make_sessionmaker(engine: Engine, *, audit_key: bytes | None = None, remember_s: float | None = None) -> sessionmaker:
    """Sessions over `engine`; `audit_key` keys the audit chain (atelier/safety/audit.py) written through them.
    With `remember_s` (the server's), the versions model names resolve to are remembered that long
    (storage/registry.py resolve_remembered)."""
    sessions = sessionmaker(bind=engine, expire_on_commit=False, info={"audit_key": audit_key})
    if remember_s is not None:
        from atelier.storage.remembered import Remembered

        sessions.kw["info"]["versions"] = Remembered(sessions, (Model, Version, Alias), remember_s)
    return sessions
