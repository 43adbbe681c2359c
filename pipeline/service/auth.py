"""Accounts: users with a role (producer, admin), passwords hashed with Argon2id (argon2-cffi),
per-user API tokens and browser sessions kept only as SHA-256 digests (they are random 256-bit
secrets: a fast digest is enough, and a stolen table gives nothing to replay)."""
from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.service.db import ROLES, ApiToken, ServiceError, User, WebSession, utcnow

SESSION_DAYS = 7
_HASHER = PasswordHasher()
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def add_user(db: Session, username: str, role: str = "producer", password: str | None = None) -> User:
    """A new account; refused (one line) for a bad name, an unknown role or a name taken."""
    if not _NAME.fullmatch(username):
        raise ServiceError(f"user name {username!r}: letters, digits, '_', '.', '-', at most 64, starting with a "
                           "letter or digit")
    if role not in ROLES:
        raise ServiceError(f"role {role!r}: one of {', '.join(ROLES)}")
    if db.scalar(select(User).where(User.username == username)):
        raise ServiceError(f"user {username!r} exists already", 409)
    if password is not None and len(password) < 8:
        raise ServiceError("a password needs at least 8 characters")
    user = User(username=username, role=role, password_hash=_HASHER.hash(password) if password else None)
    db.add(user)
    db.commit()
    return user


def set_password(db: Session, user: User, password: str) -> None:
    if len(password) < 8:
        raise ServiceError("a password needs at least 8 characters")
    user.password_hash = _HASHER.hash(password)
    db.commit()


def user_named(db: Session, username: str) -> User:
    user = db.scalar(select(User).where(User.username == username))
    if user is None:
        raise ServiceError(f"no user {username!r}", 404)
    return user


def count_users(db: Session) -> int:
    return db.scalar(select(func.count()).select_from(User)) or 0


def new_token(db: Session, user: User, name: str = "") -> str:
    """A new API token for ``user``: returned once, kept as its digest."""
    token = "anim_" + secrets.token_urlsafe(32)
    db.add(ApiToken(user_id=user.id, token_hash=digest(token), name=name[:64]))
    db.commit()
    return token


def check_password(db: Session, username: str, password: str) -> User | None:
    """The user when the password is theirs, else None (the same answer for an unknown name)."""
    user = db.scalar(select(User).where(User.username == username))
    if user is None or not user.password_hash:
        _HASHER.hash(password)  # as slow as a real check: no telling which names exist
        return None
    try:
        _HASHER.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
        db.commit()
    return user


def new_session(db: Session, user: User) -> str:
    cookie = secrets.token_urlsafe(32)
    db.add(WebSession(user_id=user.id, token_hash=digest(cookie), expires_at=utcnow() + timedelta(days=SESSION_DAYS)))
    db.commit()
    return cookie


def end_session(db: Session, cookie: str) -> None:
    row = db.scalar(select(WebSession).where(WebSession.token_hash == digest(cookie)))
    if row is not None:
        db.delete(row)
        db.commit()


def user_for(db: Session, *, bearer: str | None, cookie: str | None) -> User | None:
    """Who a request is: an API token (``Authorization: Bearer``) or a live session cookie."""
    if bearer:
        row = db.scalar(select(ApiToken).where(ApiToken.token_hash == digest(bearer)))
        return row.user if row else None
    if cookie:
        row = db.scalar(select(WebSession).where(WebSession.token_hash == digest(cookie)))
        if row is not None and row.expires_at > utcnow():
            return row.user
    return None
