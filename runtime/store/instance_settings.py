"""Instance settings (job_isolation): one value per queue, read live by every worker (R-SEL-7)."""

from __future__ import annotations

from runtime.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS instance_settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
)
"""


class InstanceSettings(Store):
    def setting(self, key: str) -> str | None:
        """An instance setting as every worker on this queue sees it; None when unset."""
        rows = self.db.query("SELECT value FROM instance_settings WHERE key=?", (key,))
        return None if not rows else str(rows[0][0])

    def set_setting(self, key: str, value: str | None) -> None:
        """Set or (None) unset a setting; workers pick it up at their next job."""
        if value is None:
            self.db.execute("DELETE FROM instance_settings WHERE key=?", (key,))
        else:
            self.db.execute(
                "INSERT INTO instance_settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (key, value),
            )
