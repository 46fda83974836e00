"""The hostile suites again, as an ordinary user that this test creates (CI runs as root).

The sandbox must hold without root: the launcher then gets its namespaces through an
unprivileged user namespace. This test (as root only) creates the user ``adrs-sbx``, gives it
a copy of the workload cache, and runs ``tests/test_sandbox.py`` and
``tests/test_sandbox_attacks.py`` under it with pytest. Where the Python installation sits
under a directory that user cannot enter (pyenv under ``/root`` here), the run gets its own
mount namespace in which that directory is replaced by one exposing only the installation:
nothing on the host changes.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from evaluator.workload.cache import cache_root

REPO = Path(__file__).resolve().parents[1]
USER = "adrs-sbx"
# The hostile cases of test_sandbox.py (not its encoding and seed-equality tests) and every attack.
SUITES = ("tests/test_sandbox.py", "tests/test_sandbox_attacks.py")
SELECT = "hostile or listener or written or fork_bomb or monkeypatch or traceback or attack or secret or outlive " \
         "or nothing or setsid or connection or isolation or opt_out"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("useradd", "setpriv", "unshare")),
    reason="creates an ordinary user: needs root, useradd, setpriv and unshare")


def _blocked_ancestor(path: Path) -> tuple[Path, Path] | None:
    """(first ancestor others cannot enter, its child on the way to ``path``), or None."""
    parts = path.resolve().parts
    for i in range(1, len(parts)):
        folder = Path(*parts[:i])
        if not os.stat(folder).st_mode & 0o001:
            return folder, Path(*parts[:i + 1])
    return None


def _exposure_script(stage: Path) -> str:
    """Shell lines (run as root in a private mount namespace) that let the user reach Python and the repo."""
    children: dict[Path, set[Path]] = {}
    for path in (Path(sys.base_prefix), Path(sys.prefix), REPO):
        blocked = _blocked_ancestor(path)
        if blocked is not None:
            children.setdefault(blocked[0], set()).add(blocked[1])
    lines = []
    for n, (folder, kids) in enumerate(sorted(children.items())):
        kept = {kid: stage / f"keep{n}-{i}" for i, kid in enumerate(sorted(kids))}
        for kid, keep in kept.items():
            keep.mkdir()
            lines.append(f"mount --bind '{kid}' '{keep}'")
        lines.append(f"mount -t tmpfs -o mode=0711,size=1m tmpfs '{folder}'")
        for kid, keep in kept.items():
            lines += [f"mkdir -p '{kid}'", f"mount --bind '{keep}' '{kid}'"]
    return "\n".join(lines)


def _user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        return pwd.getpwnam(USER)


def test_hostile_suites_hold_as_an_ordinary_user():
    user = _user()
    home = Path(user.pw_dir)
    cache = home / "adrs-cache"
    workloads = cache_root() / "workloads"
    if workloads.is_dir() and not (cache / "workloads").exists():
        shutil.copytree(workloads, cache / "workloads", ignore=shutil.ignore_patterns("*.lock"))
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(home)], check=True)
    os.chmod(home, 0o700)
    stage = Path(tempfile.mkdtemp(prefix="adrs-unpriv-"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "ADRS_CACHE": str(cache),
           "PYTHONPATH": str(REPO), "LANG": "C.UTF-8", "OPENAI_API_KEY": "sk-hostile-unprivileged"}
    script = "\n".join([
        "set -e", _exposure_script(stage),
        f"exec setpriv --reuid={user.pw_uid} --regid={user.pw_gid} --clear-groups "
        f"'{sys.executable}' -m pytest -q -p no:cacheprovider -x {' '.join(SUITES)} -k '{SELECT}'",
    ])
    try:
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=1200)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout, tail
