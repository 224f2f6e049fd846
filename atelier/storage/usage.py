"""Per-key rate limits and quotas, counted in the database (so they hold across the server's threads
and, with PostgreSQL, across replicas), and the usage they are counted from.

A key's `limits` (any of them; absent means unlimited):
  rpm               requests per minute            over it: 429 rate_limit_exceeded
  tpm               tokens per minute               over it: 429 rate_limit_exceeded
  images_per_day    images per UTC day              over it: 429 insufficient_quota
  tokens_per_month  tokens per UTC calendar month   over it: 429 insufficient_quota
  max_parallel      requests at once                over it: 429 rate_limit_exceeded (this process's)
Windows for rpm/tpm slide over the last 60 seconds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from atelier.storage.db import ApiKey, Usage, utcnow

LIMITS = ("rpm", "tpm", "images_per_day", "tokens_per_month", "max_parallel")


def check_limits(limits: dict) -> dict:
    """The limits a key may be given: positive integers under known names (ValueError naming the bad one)."""
    unknown = sorted(set(limits) - set(LIMITS))
    if unknown:
        raise ValueError(f"unknown limits {', '.join(unknown)}; limits: {', '.join(LIMITS)}")
    for name, value in limits.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"limits.{name}={value!r} must be a positive integer (or null for no limit)")
    return {k: v for k, v in limits.items() if v is not None}


@dataclass
class Verdict:
    """Whether a key may start one more request, and what OpenAI's x-ratelimit headers say."""

    allowed: bool
    code: str = ""  # rate_limit_exceeded | insufficient_quota
    message: str = ""
    retry_after: int = 0
    headers: dict | None = None


# The statements every metered request runs, built once (building one costs more than SQLite running it).
_SINCE = (select(func.count(Usage.id), func.coalesce(func.sum(Usage.tokens), 0), func.coalesce(func.sum(Usage.images), 0),
                 func.min(Usage.at))
          .where(Usage.key_id == bindparam("key_id"), Usage.at >= bindparam("start")))
_LOCK_KEY = select(ApiKey.id).where(ApiKey.id == bindparam("key_id")).with_for_update()
_NEW_USAGE = Usage.__table__.insert().returning(Usage.__table__.c.id)  # a plain insert, without the ORM's unit of work


def _since(db: Session, key_id: str, start: datetime):
    row = db.execute(_SINCE, {"key_id": key_id, "start": start}).one()
    return int(row[0]), int(row[1]), int(row[2]), row[3]


def verdict(db: Session, key_id: str, limits: dict | None, *, images: int = 0, parallel: int = 0,
            unwritten: tuple[int, int] = (0, 0), now: datetime | None = None) -> Verdict:
    """`unwritten`: (tokens, images) of the key's finished requests not yet in the database
    (atelier/storage/usage_writer.py), counted as if they were."""
    limits = limits or {}
    if not limits:  # nothing to count against: no need to sum the key's recent usage (a hot key has a lot)
        return Verdict(True, headers={})
    now = now or utcnow()
    minute = now - timedelta(seconds=60)
    requests, tokens, _, oldest = _since(db, key_id, minute)
    tokens += unwritten[0]
    reset = max(1, int(60 - (now - oldest).total_seconds()) + 1) if oldest else 1
    headers = {}
    if "rpm" in limits:
        headers |= {"x-ratelimit-limit-requests": str(limits["rpm"]),
                    "x-ratelimit-remaining-requests": str(max(0, limits["rpm"] - requests - 1)),
                    "x-ratelimit-reset-requests": f"{reset}s"}
    if "tpm" in limits:
        headers |= {"x-ratelimit-limit-tokens": str(limits["tpm"]),
                    "x-ratelimit-remaining-tokens": str(max(0, limits["tpm"] - tokens)),
                    "x-ratelimit-reset-tokens": f"{reset}s"}
    if "max_parallel" in limits and parallel >= limits["max_parallel"]:
        return Verdict(False, "rate_limit_exceeded", f"this key already has {parallel} requests running; its "
                       f"limit is {limits['max_parallel']} at once", 1, headers)
    if "rpm" in limits and requests >= limits["rpm"]:
        return Verdict(False, "rate_limit_exceeded", f"this key made {requests} requests in the last minute; its "
                       f"limit is {limits['rpm']} per minute", reset, headers)
    if "tpm" in limits and tokens >= limits["tpm"]:
        return Verdict(False, "rate_limit_exceeded", f"this key used {tokens} tokens in the last minute; its "
                       f"limit is {limits['tpm']} per minute", reset, headers)
    if "images_per_day" in limits and images:
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        used = _since(db, key_id, day)[2] + unwritten[1]
        if used + images > limits["images_per_day"]:
            tomorrow = int((day + timedelta(days=1) - now).total_seconds()) + 1
            return Verdict(False, "insufficient_quota", f"this key made {used} images today; its quota is "
                           f"{limits['images_per_day']} a day", tomorrow, headers)
    if "tokens_per_month" in limits:
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        used = _since(db, key_id, month)[1] + unwritten[0]
        if used >= limits["tokens_per_month"]:
            return Verdict(False, "insufficient_quota", f"this key used {used} tokens this month; its quota is "
                           f"{limits['tokens_per_month']} a month", 3600, headers)
    return Verdict(True, headers=headers)


def admit(db: Session, key_id: str, limits: dict | None, route: str, *, images: int = 0, parallel: int = 0,
          unwritten: tuple[int, int] = (0, 0)) -> tuple[Verdict, int | None]:
    """The start of a metered request: its key's verdict and, when allowed, its usage row, committed at
    once so that requests after it count it. Returns (verdict, the usage row's id or None).

    A key without limits has nothing to check and nobody counts its requests as they start: no statement
    runs, and its row is inserted when the request ends, by the usage writer (a write less on every request's
    way to the model). With PostgreSQL the key's row is locked from the check to the commit, so replicas take
    turns (SQLite has no row locks: its writers take turns on the whole database)."""
    if not limits:
        return Verdict(True, headers={}), None
    if db.get_bind().dialect.name != "sqlite":
        db.execute(_LOCK_KEY, {"key_id": key_id})
    v = verdict(db, key_id, limits, images=images, parallel=parallel, unwritten=unwritten)
    if not v.allowed:
        db.rollback()
        return v, None
    usage_id = db.execute(_NEW_USAGE, {"key_id": key_id, "route": route}).scalar_one()
    db.commit()
    return v, usage_id


def summary(db: Session, key_id: str | None, since: datetime) -> list[dict]:
    """Usage per key, model and UTC day since `since` (every key when key_id is None)."""
    day = func.date(Usage.at)
    q = (select(Usage.key_id, Usage.model, day, func.count(Usage.id), func.sum(Usage.tokens), func.sum(Usage.images))
         .where(Usage.at >= since).group_by(Usage.key_id, Usage.model, day).order_by(day, Usage.key_id, Usage.model))
    if key_id is not None:
        q = q.where(Usage.key_id == key_id)
    return [{"key_id": k, "model": m, "day": str(d), "requests": int(n), "tokens": int(t or 0), "images": int(i or 0)}
            for k, m, d, n, t, i in db.execute(q)]


class InFlight:
    """Requests running now, per key (max_parallel). Per process: replicas each keep their own count."""

    def __init__(self):
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def count(self, key_id: str) -> int:
        return self._counts.get(key_id, 0)

    def enter(self, key_id: str) -> None:
        with self._lock:
            self._counts[key_id] = self._counts.get(key_id, 0) + 1

    def leave(self, key_id: str) -> None:
        with self._lock:
            self._counts[key_id] = max(0, self._counts.get(key_id, 0) - 1)
