"""The promotion ledger: an append-only JSON-lines record of every rollout decision.

One line per entry, appended under an exclusive lock and fsync'd before
:meth:`Ledger.append` returns, so a recorded decision survives a crash. A line
torn by a crash mid-write is terminated by the next append and skipped (with a
warning) by every read. Nothing is ever rewritten.

Default location: ``<state_dir>/ledger/promotions.jsonl`` (one file for all models;
entries carry ``model_name``).
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from driftloop.errors import RolloutError

if TYPE_CHECKING:
    from driftloop.rollout import RolloutState, Transition
    from driftloop.settings import Settings

log = logging.getLogger(__name__)

#: actions that certify the champion they leave in place as known good
CERTIFYING_ACTIONS: frozenset[str] = frozenset({"baseline", "completed"})


class LedgerEntry(BaseModel):
    """One decision. ``action`` is the event suffix (started, stepped, promoted,
    rolled_back, aborted, completed) or ``baseline`` for a first champion."""

    model_config = ConfigDict(extra="forbid")

    timestamp: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    model_name: str
    incident_id: str | None = None
    action: str = Field(min_length=1)
    phase: str | None = None
    champion_arm: str | None = None
    champion_tag: str | None = None
    arms: dict[str, str] = Field(default_factory=dict, description="arm name -> bento tag")
    weights: dict[str, int] = Field(default_factory=dict)
    reason: str = ""
    actor: str = "system"
    analysis: dict[str, Any] | None = None

    @classmethod
    def from_transition(cls, state: RolloutState, transition: Transition) -> LedgerEntry:
        """The entry for one transition of ``state`` (usually ``state.history[-1]``)."""
        return cls(
            timestamp=transition.at,
            model_name=state.model_name,
            incident_id=state.incident_id,
            action=transition.event.rsplit(".", 1)[-1],
            phase=transition.to_phase.value,
            champion_arm=state.champion.name,
            champion_tag=state.champion.bento_tag,
            arms=state.arms(),
            weights=dict(transition.weights),
            reason=transition.reason,
            actor=transition.actor,
            analysis=transition.analysis,
        )


class Ledger:
    """Append-only promotion ledger in one JSON-lines file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.skipped = 0  # unreadable lines met by the last read

    @classmethod
    def for_settings(cls, settings: Settings) -> Ledger:
        return cls(settings.state_dir.resolve() / "ledger" / "promotions.jsonl")

    # -- writing ---------------------------------------------------------------------
    def append(self, entry: LedgerEntry) -> None:
        """Append ``entry`` durably (flushed and fsync'd before returning)."""
        line = entry.model_dump_json() + "\n"
        if "\n" in line[:-1]:  # model_dump_json never emits raw newlines; keep it that way
            raise RolloutError("a ledger line must not contain a newline")
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            data = line.encode()
            if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # terminate a line torn by an earlier crash
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)  # also releases the lock
        if created:
            _fsync_dir(self.path.parent)

    def append_transition(self, state: RolloutState, transition: Transition | None = None) -> None:
        """Append the entry for ``transition`` (default: the last one of ``state``)."""
        if transition is None:
            if not state.history:
                raise RolloutError("the rollout has no transition to record")
            transition = state.history[-1]
        self.append(LedgerEntry.from_transition(state, transition))

    # -- reading ---------------------------------------------------------------------
    def _read(self) -> Iterator[LedgerEntry]:
        self.skipped = 0
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                yield LedgerEntry.model_validate_json(line)
            except ValidationError:
                self.skipped += 1
                log.warning("ledger %s: skipping unreadable line %d", self.path, number)

    def entries(
        self, model_name: str | None = None, incident_id: str | None = None
    ) -> list[LedgerEntry]:
        """All readable entries in append order, optionally filtered."""
        return [
            e
            for e in self._read()
            if (model_name is None or e.model_name == model_name)
            and (incident_id is None or e.incident_id == incident_id)
        ]

    def last_known_good(
        self, model_name: str, exclude_tag: str | None = None
    ) -> LedgerEntry | None:
        """The latest entry certifying a champion of ``model_name`` (a ``baseline``, or a
        promotion whose guard window ``completed``), skipping champions tagged
        ``exclude_tag`` (pass the current champion to find what to roll back to)."""
        for entry in reversed(self.entries(model_name=model_name)):
            if (
                entry.action in CERTIFYING_ACTIONS
                and entry.champion_tag is not None
                and entry.champion_tag != exclude_tag
            ):
                return entry
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
