"""Run a callback after the caller's transaction commits, and never after a rollback.

- ``Session``: SQLAlchemy's ``after_commit`` / ``after_soft_rollback`` session events; a
  callback registered inside a savepoint that is rolled back is dropped.
- ``Connection``: Core has no after-commit event (``ConnectionEvents.commit`` fires *before*
  the DBAPI commit), so the engine's dialect gets a thin wrapper around ``do_commit`` and
  ``do_rollback`` that runs what is pending for that DBAPI connection once the database
  has answered.

Pending callbacks are kept per session / per DBAPI connection, so concurrent threads (each
with its own session or connection, as SQLAlchemy requires) never see each other's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

log = logging.getLogger("tomqueue.enqueue")

Callback = Callable[[], None]
_SESSION_KEY = "tomqueue_after_commit"
_LISTENING_KEY = "tomqueue_after_commit_listening"
_pending_by_dbapi: dict[int, list[Callback]] = {}
_pending_lock = threading.Lock()


def after_commit(target: Session | Connection, callback: Callback) -> None:
    if isinstance(target, Session):
        _session_after_commit(target, callback)
    else:
        _connection_after_commit(target, callback)


def _run_all(callbacks: list[Callback]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # a failed publish must not break the caller's commit
            log.exception("after-commit callback failed", extra={"action": "after_commit"})


# --- Session ---------------------------------------------------------------------------


def _session_after_commit(session: Session, callback: Callback) -> None:
    if not session.info.get(_LISTENING_KEY):
        # registered once per session and never removed: removing a listener from inside
        # the event it listens to breaks SQLAlchemy's dispatch
        event.listen(session, "after_commit", _on_session_commit)
        event.listen(session, "after_soft_rollback", _on_session_soft_rollback)
        session.info[_LISTENING_KEY] = True
    transaction = session.get_nested_transaction() or session.get_transaction()
    session.info.setdefault(_SESSION_KEY, []).append((transaction, callback))


def _on_session_commit(session: Session) -> None:
    if session.in_nested_transaction():  # a savepoint was released: not committed yet
        return
    pending = session.info.pop(_SESSION_KEY, [])
    _run_all([callback for _transaction, callback in pending])


def _on_session_soft_rollback(session: Session, previous_transaction: Any) -> None:
    """Drop what was registered inside the transaction (or savepoint) rolled back."""
    pending = session.info.get(_SESSION_KEY)
    if pending:
        session.info[_SESSION_KEY] = [
            (t, cb) for t, cb in pending if not _inside(t, previous_transaction)
        ]


def _inside(transaction: Any, ancestor: Any) -> bool:
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


# --- Connection ------------------------------------------------------------------------


def _connection_after_commit(conn: Connection, callback: Callback) -> None:
    if not conn.in_transaction():
        raise RuntimeError("enqueue(connection=...) needs a connection inside a transaction")
    _install(conn.dialect)
    with _pending_lock:
        _pending_by_dbapi.setdefault(_key(conn.connection), []).append(callback)


def _install(dialect: Dialect) -> None:
    if getattr(dialect, "_tomqueue_after_commit", False):
        return
    original_commit = dialect.do_commit
    original_rollback = dialect.do_rollback

    def do_commit(dbapi_connection: Any) -> None:
        try:
            original_commit(dbapi_connection)
        except BaseException:
            _take_dbapi(dbapi_connection)
            raise
        _run_all(_take_dbapi(dbapi_connection))

    def do_rollback(dbapi_connection: Any) -> None:
        _take_dbapi(dbapi_connection)
        original_rollback(dbapi_connection)

    dialect.do_commit = do_commit  # type: ignore[method-assign]
    dialect.do_rollback = do_rollback  # type: ignore[method-assign]
    dialect._tomqueue_after_commit = True  # type: ignore[attr-defined]


def _key(connection: Any) -> int:
    """The raw DBAPI connection's id, whether given the raw connection or the pool's
    wrapper around it (``do_commit`` receives the wrapper)."""
    return id(getattr(connection, "dbapi_connection", connection))


def _take_dbapi(dbapi_connection: Any) -> list[Callback]:
    with _pending_lock:
        return _pending_by_dbapi.pop(_key(dbapi_connection), [])
