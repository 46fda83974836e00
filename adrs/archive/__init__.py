"""The run archive: every candidate is a git commit; a SQLite index serves the leaderboard.

    from adrs.archive import open_run
    with open_run("runs/demo", create=True) as archive:
        ref = archive.add_candidate(code, record, parent="best", island=0, summary="top-k by norm")
        archive.leaderboard(5)

See :mod:`adrs.archive.store` for the layout and the crash-safety argument.
"""
from adrs.archive.model import (
    ARCHIVE_IDENTITY, MODEL_IDENTITY, SEED_IDENTITY, CandidateRef, Identity, human_identity,
)
from adrs.archive.store import (
    Archive, ArchiveError, Checkpoint, RecoverReport, open_run, open_run_readonly, reindex, run_lock,
    sync_readonly,
)

__all__ = [
    "ARCHIVE_IDENTITY", "MODEL_IDENTITY", "SEED_IDENTITY", "Archive", "ArchiveError", "CandidateRef",
    "Checkpoint", "Identity", "RecoverReport", "human_identity", "open_run", "open_run_readonly", "reindex", "run_lock",
    "sync_readonly",
]
