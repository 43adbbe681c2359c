"""The service's database: users, their API tokens and sessions, and the job table.

The job table is the truth about every render: each state change is written (and committed)
before the service acts on it, and after a crash the table is reconciled against what Ray ran
(``pipeline.service.jobs``). SQLite by default (``sqlite:///<data>/service.db``); a PostgreSQL
URL works unchanged. The schema is Alembic's (``pipeline/service/migrations``), brought up to
date at start-up by ``open_database``.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, create_engine, event)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from sqlalchemy.types import TypeDecorator

from stages.records import AnimError

MIGRATIONS = Path(__file__).with_name("migrations")

STATUSES = ("queued", "planning", "awaiting_approval", "rendering", "succeeded", "failed", "stopped", "cancelled")
ACTIVE = ("planning", "rendering")  # a Ray job of the current attempt may be running
TERMINAL = ("succeeded", "failed", "stopped", "cancelled")
ROLES = ("producer", "admin")


class ServiceError(AnimError):
    """A request the service refuses, or a service that cannot start; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        return type(self), (str(self), self.status)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UtcDateTime(TypeDecorator):
    """Timestamps stored naive in UTC (SQLite keeps no zone) and read back aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.astimezone(timezone.utc).replace(tzinfo=None) if value is not None else None

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None else None


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ApiToken(Base):
    """A per-user API token; only its SHA-256 is kept (the token itself is shown once)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    user: Mapped[User] = relationship()


class WebSession(Base):
    """A signed-in browser: the cookie's SHA-256 and when it expires."""

    __tablename__ = "web_sessions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    user: Mapped[User] = relationship()


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    producer_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    series: Mapped[str] = mapped_column(String(200), default="", index=True)
    script_name: Mapped[str] = mapped_column(String(255))  # what the client called it: display only
    title: Mapped[str] = mapped_column(String(255), default="")  # the episode's, from the script
    script_ext: Mapped[str] = mapped_column(String(16))  # the stored file is <data>/jobs/<id>/script<ext>
    profile: Mapped[str] = mapped_column(String(64))
    aspect: Mapped[str | None] = mapped_column(String(8), nullable=True)
    budget_yuan: Mapped[float | None] = mapped_column(Float, nullable=True)
    estimate_yuan: Mapped[float] = mapped_column(Float, default=0.0)
    shots_total: Mapped[int] = mapped_column(Integer, default=0)
    approval_gate: Mapped[bool] = mapped_column(Boolean, default=False)
    batch: Mapped[str | None] = mapped_column(String(32), nullable=True)
    status: Mapped[str] = mapped_column(String(24), index=True, default="queued")
    phase: Mapped[str] = mapped_column(String(16), default="render")  # what the current attempt runs: storyboard|render
    stopped_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    submission_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    submitted: Mapped[bool] = mapped_column(Boolean, default=False)  # Ray took the current submission
    runner: Mapped[str] = mapped_column(String(8), default="ray")  # the current attempt: a Ray job, or "service"
    restarts: Mapped[int] = mapped_column(Integer, default=0)  # attempts made because a driver died
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # the submission's Idempotency-Key (``<key>#<n>`` for the n-th script of a batch): a repeat returns these
    client_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)

    __table_args__ = (Index("ix_jobs_producer_client_key", "producer_id", "client_key", unique=True),)


class JobEvent(Base):
    """Every state change of a job, in order: who or what made it, and why."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    status: Mapped[str] = mapped_column(String(24))
    attempt: Mapped[int] = mapped_column(Integer)
    note: Mapped[str] = mapped_column(Text, default="")


def make_engine(url: str) -> Engine:
    """An engine for ``url``; a SQLite file gets its folder, WAL and a busy timeout (the API's
    threads and the dispatcher write concurrently)."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"connect_args": {"check_same_thread": False, "timeout": 30}} if url.startswith("sqlite") else {}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # pragma: no cover - exercised by every SQLite connection
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to Alembic's head revision (every revision under ``migrations/versions``)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_database(url: str) -> sessionmaker:
    """The service database at ``url``, migrated; a session factory for it."""
    try:
        engine = make_engine(url)
        migrate(engine)
    except Exception as exc:  # noqa: BLE001 - a bad URL, a driver missing, a locked file: one line
        raise ServiceError(f"service database {url}: {str(exc).splitlines()[0]}", 500) from None
    return sessionmaker(engine, expire_on_commit=False)
