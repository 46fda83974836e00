"""Where captured workloads and dequantized weights live, and how they are written safely."""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """``$ADRS_CACHE`` or ``~/.cache/adrs``, created private to the user (0700).

    It holds values and dense outputs, which no candidate (and no other user) may read.
    """
    root = Path(os.environ.get("ADRS_CACHE", "~/.cache/adrs")).expanduser()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if root.stat().st_uid == os.geteuid() and root.stat().st_mode & 0o077:
        root.chmod(0o700)
    return root


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive file lock so concurrent processes build a cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish_dir(tmp: Path, final: Path) -> None:
    """Move a fully written temporary folder into place; readers never see a partial one."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
