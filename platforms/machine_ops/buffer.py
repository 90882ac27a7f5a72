"""The agent's on-disk outbox: sequenced messages kept until the platform acks them.

SQLite in the agent's state directory, so results survive the platform being
away and the agent restarting. Bounded: when full, the oldest message is
dropped and counted (the count is reported in the next hello), never
silently. Sequence numbers are unique within an epoch, which is created
with the buffer; the platform applies each (epoch, sequence) at most once.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path


class Outbox:
    """A bounded, durable FIFO of (sequence, payload)."""

    def __init__(self, path: Path, capacity: int = 10_000) -> None:
        self.capacity = capacity
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)"
            )
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', ?)", (uuid.uuid4().hex,))
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', '1')")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('dropped', '0')")

    def _meta(self, key: str) -> str:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return str(row[0])

    @property
    def epoch(self) -> str:
        """The buffer's epoch (sequence numbers are unique within it)."""
        with self._lock:
            return self._meta("epoch")

    @property
    def dropped(self) -> int:
        """Messages dropped because the buffer was full, ever."""
        with self._lock:
            return int(self._meta("dropped"))

    def append(self, payload: bytes) -> int:
        """Store a message and return its sequence; drop the oldest when full."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = int(self._meta("next_seq"))
                self._db.execute("UPDATE meta SET v = ? WHERE k = 'next_seq'", (str(seq + 1),))
                self._db.execute("INSERT INTO outbox VALUES (?, ?)", (seq, payload))
                (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
                over = count - self.capacity
                if over > 0:
                    self._db.execute(
                        "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                        (over,),
                    )
                    self._db.execute(
                        "UPDATE meta SET v = CAST(v AS INTEGER) + ? WHERE k = 'dropped'", (over,)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return seq

    def pending(self, after: int = 0, limit: int = 1000) -> list[tuple[int, bytes]]:
        """Unacknowledged messages with a sequence above ``after``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [(int(s), bytes(p)) for s, p in rows]

    def ack(self, seq: int) -> None:
        """The platform applied ``seq``: forget it."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))

    def ack_through(self, seq: int) -> None:
        """The platform applied everything up to ``seq``."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
