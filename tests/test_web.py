"""`adrs serve` end to end: a real `adrs run` subprocess, a real server process, Debian's headless Chromium.

One run is made per module: the live test watches its tree grow while it runs, the other tests use
it once it has finished (plus a hostile candidate added through the archive API). Without a
browser (or playwright) these tests skip, unless ADRS_REQUIRE_BROWSER=1 (CI), where they fail.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT
from test_cli import write_config

RUN_KEY = "run"
ITERATIONS = 4
# Candidate-controlled text that would run if any page put it in as markup. Each path sets a global
# and opens a dialog; the test listens for both.
PAYLOAD = ('<img src=x onerror="window.__xss=1;alert(1)"> </script><script>window.__xss=2;alert(2)</script> '
           '<svg onload="window.__xss=3;alert(3)"></svg> "><iframe srcdoc="<script>parent.__xss=4</script>"></iframe>')
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _unavailable(reason: str) -> None:
    if os.environ.get("ADRS_REQUIRE_BROWSER") == "1":
        pytest.fail(f"ADRS_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, headless, driven by Playwright (which downloads no browser of its own)."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"{exc.name} is not installed (pip install -e '.[test]')")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        _unavailable("no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=path)
        yield chromium
        chromium.close()


@dataclass
class LiveRun:
    """`adrs run` into ``run_dir``, started on demand (after the page is open, so nothing is missed)."""

    run_dir: Path
    cfg: Path
    log: Path
    proc: subprocess.Popen | None = None

    def start(self) -> subprocess.Popen:
        if self.proc is None:
            with self.log.open("w") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "adrs.cli", "run", str(self.cfg), "--run-dir", str(self.run_dir)],
                    stdout=out, stderr=subprocess.STDOUT, env=ENV)
        return self.proc


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, tiny_workload):
    """An empty archive (as `adrs run` makes first) and, on start(), `adrs run` on the tiny workload
    (structural mutator) with a checkpoint every iteration.

    The held-out cascade and the numerics audit are off to keep the module quick (the pages show
    them when present; tests/test_loop.py covers them)."""
    from adrs.archive import open_run

    tmp = tmp_path_factory.mktemp("web")
    cfg = write_config(tmp / "cfg.yaml", ITERATIONS, every="1", numerics_audit="false")
    # No held-out re-scores either: each would add a sandboxed evaluation to every new best.
    cfg.write_text(cfg.read_text().replace("heldout_workload: tiny-heldout", "heldout_workload: null"))
    open_run(tmp / RUN_KEY, create=True).close()
    run = LiveRun(tmp / RUN_KEY, cfg, tmp / "run.log")
    yield run
    if run.proc is not None and run.proc.poll() is None:
        run.proc.send_signal(signal.SIGINT)
        run.proc.wait(60)


@dataclass
class Server:
    url: str  # with the token
    base: str
    token: str
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def server(live_run, browser):
    """`adrs serve RUN --port 0`, started before the run writes its first candidate."""
    log = live_run.run_dir.parent / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "adrs.cli", "serve", str(live_run.run_dir), "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.monotonic() + 120
    while "http://" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "adrs serve printed no URL in 120 s"
        time.sleep(0.1)
    url = next(w for w in log.read_text().split() if w.startswith("http://"))
    assert url.startswith("http://127.0.0.1:"), url  # loopback by default
    yield Server(url, url.split("/?")[0], url.split("token=")[1], proc)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def git(run_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(run_dir / "repo"), *args], capture_output=True, text=True, check=True).stdout


def candidate_commits(run_dir: Path) -> dict[str, str]:
    """{candidate id: commit} straight from git's refs."""
    out = git(run_dir, "for-each-ref", "--format=%(refname:lstrip=2) %(objectname)", "refs/candidates")
    return dict(line.split() for line in out.splitlines())


@pytest.fixture(scope="module")
def finished_run(live_run):
    """The run once `adrs run` has exited, plus a failed candidate and a review note full of HTML/JS.

    The failed candidate's record also holds non-finite numbers, which JSON cannot carry as such.
    """
    from adrs import review as rv
    from adrs.archive import open_run

    assert live_run.start().wait(400) == 0, live_run.log.read_text()
    seed_code = (ROOT / "seeds" / "sink_window.py").read_text()
    with open_run(live_run.run_dir) as archive:
        ref = archive.add_candidate(
            seed_code + f"\n# {PAYLOAD}\n", {"valid": False, "category": "error", "reason": PAYLOAD,
                                             "prompt": PAYLOAD, "response": PAYLOAD, "error": float("nan"),
                                             "per_layer": [{"layer": 0, "error": float("inf"), "density": 0.1}]},
            parent=0, author="human", summary=PAYLOAD)
        rv.decide(archive, rv.resolve(archive, "2"), "note", PAYLOAD)
    return live_run.run_dir, ref.id


def new_page(browser, server: Server, **context):
    """A page logged in through the printed URL; page errors are collected in ``page.errors``."""
    page = browser.new_context(**context).new_page()
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(server.url)
    assert page.url == server.base + "/"  # the token became a cookie and left the address bar
    return page


def test_live_run_adds_nodes_without_reload(browser, server, live_run):
    page = new_page(browser, server)
    page.goto(f"{server.base}/run/{RUN_KEY}/tree")
    page.wait_for_function("() => window.adrsTree !== undefined && document.getElementById('live').textContent.includes('· v')")
    page.evaluate("window.__sameDocument = true")
    assert page.evaluate("adrsTree.nodes().length") == 0  # an archive without candidates yet
    live_run.start()
    page.wait_for_function("() => adrsTree.nodes().length >= 1", timeout=300_000)
    page.wait_for_function(f"() => adrsTree.nodes().length === {1 + ITERATIONS}", timeout=300_000)
    assert page.evaluate("window.__sameDocument") is True  # every node came without a reload
    assert live_run.proc.wait(60) == 0, live_run.log.read_text()
    assert page.errors == []


def test_tree_shows_every_candidate_of_a_finished_run(browser, server, finished_run):
    run_dir, _ = finished_run
    commits = candidate_commits(run_dir)
    assert len(commits) == 1 + ITERATIONS + 1  # seed, the run's children, the hostile one
    page = new_page(browser, server)
    page.goto(f"{server.base}/run/{RUN_KEY}/tree")
    page.wait_for_function(f"() => window.adrsTree && adrsTree.nodes().length === {len(commits)}", timeout=30_000)
    assert sorted(page.evaluate("adrsTree.nodes().map(n => n.id())")) == sorted(commits)
    by_commit = {sha: cid for cid, sha in commits.items()}
    expected_edges = set()
    for cid, sha in commits.items():
        parents = git(run_dir, "rev-list", "--parents", "-n", "1", sha).split()[1:]
        expected_edges |= {(by_commit[p], cid) for p in parents}
    edges = page.evaluate("adrsTree.edges().map(e => [e.source().id(), e.target().id()])")
    assert {tuple(e) for e in edges} == expected_edges
    assert page.errors == []


def test_clicking_a_node_opens_its_page_with_the_right_diff(browser, server, finished_run):
    run_dir, _ = finished_run
    commits = candidate_commits(run_dir)
    page = new_page(browser, server)
    page.goto(f"{server.base}/run/{RUN_KEY}/tree")
    page.wait_for_function(f"() => window.adrsTree && adrsTree.nodes().length === {len(commits)}", timeout=30_000)
    x, y = page.evaluate("""() => {
        const n = adrsTree.getElementById('c000002'), p = n.renderedPosition();
        const box = adrsTree.container().getBoundingClientRect();
        return [box.left + p.x, box.top + p.y];
    }""")
    page.mouse.click(x, y)
    page.wait_for_url(f"**/run/{RUN_KEY}/c/c000002")
    parent = git(run_dir, "rev-parse", commits["c000002"] + "^").strip()
    expected = git(run_dir, "diff", parent, commits["c000002"], "--", "candidate.py").rstrip("\n")
    assert expected.startswith("diff --git")
    page.wait_for_function("() => document.getElementById('diff').textContent.startsWith('diff --git')")
    assert page.evaluate("document.getElementById('diff').textContent") == expected
    # against any other candidate, chosen on the page
    page.select_option("#diff-against", "c000001")
    other = git(run_dir, "diff", commits["c000001"], commits["c000002"], "--", "candidate.py").rstrip("\n")
    page.wait_for_function("() => document.getElementById('diff-label').textContent.includes('c000001')")
    assert page.evaluate("document.getElementById('diff').textContent") == other
    assert page.errors == []


def _post(url: str, body: dict, headers: dict) -> int:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _tags(run_dir: Path) -> dict[str, str]:
    out = git(run_dir, "for-each-ref", "--format=%(refname:lstrip=2)%00%(contents)%01", "refs/tags/review")
    return dict(chunk.strip("\n").split("\0", 1) for chunk in out.split("\x01") if chunk.strip("\n"))


def test_review_needs_the_token_and_lands_as_the_clis_git_tags(browser, server, finished_run):
    run_dir, _ = finished_run
    api = f"{server.base}/api/run/{RUN_KEY}/review"
    before = _tags(run_dir)
    assert "review/000001/decision" not in before
    # without the token, with a wrong one, or with the cookie alone (a forged cross-site form): refused
    assert _post(api, {"action": "approve", "checkpoint": "1"}, {}) == 403
    assert _post(api, {"action": "approve", "checkpoint": "1"}, {"X-ADRS-Token": "wrong"}) == 403
    page = new_page(browser, server)
    page.goto(f"{server.base}/run/{RUN_KEY}")
    status = page.evaluate("""async (api) => (await fetch(api, {method: 'POST', body: JSON.stringify(
        {action: 'approve', checkpoint: '1'}), headers: {'Content-Type': 'application/json'}})).status""", api)
    assert status == 403
    assert _tags(run_dir) == before
    # with the token: the page's Approve button
    row = page.locator('tr[data-checkpoint="checkpoint/000001"]')
    row.locator("input.review-text").fill("window only; try top-k")
    row.locator('button[data-action="approve"]').click()
    page.wait_for_function("() => document.querySelector('.review-status').textContent.includes('recorded')")
    after = _tags(run_dir)
    assert after["review/000001/decision"].strip() == "approve"
    assert after["review/000001/note-1"].strip() == "window only; try top-k"
    assert set(after) - set(before) == {"review/000001/decision", "review/000001/note-1"}
    # `adrs review` reads it back as its own
    listed = subprocess.run([sys.executable, "-m", "adrs.cli", "review", str(run_dir), "--json"], capture_output=True,
                            text=True, env=ENV, check=True).stdout
    first = next(c for c in json.loads(listed) if c["name"] == "checkpoint/000001")
    assert first["decision"] == "approve" and first["notes"] == ["window only; try top-k"]
    page.wait_for_function("""() => document.querySelector('tr[data-checkpoint="checkpoint/000001"] td.decided') !== null""")
    # a rejection needs a reason (refused with the CLI's words), then rejects the candidate as the CLI does
    row = page.locator('tr[data-checkpoint="checkpoint/000004"]')
    row.locator('button[data-action="reject"]').click()
    page.wait_for_function("() => document.querySelector('.review-status').textContent.includes('a rejection needs a reason')")
    page.locator('tr[data-checkpoint="checkpoint/000004"] input.review-text').fill("overfits the search texts")
    page.locator('tr[data-checkpoint="checkpoint/000004"] button[data-action="reject"]').click()
    page.wait_for_function("() => document.querySelector('.review-status').textContent.includes('reject recorded')")
    assert _tags(run_dir)["review/000004/decision"].strip() == "reject: overfits the search texts"
    from adrs import review as rv
    from adrs.archive import open_run_readonly

    with open_run_readonly(run_dir) as archive:
        rejected = next(c for c in rv.checkpoints(archive) if c.name == "checkpoint/000004").candidate_id
    note = git(run_dir, "notes", "--ref", "refs/notes/rejected", "show", candidate_commits(run_dir)[rejected])
    assert note.startswith("rejected: review: overfits the search texts")
    assert page.errors == []


def test_reading_needs_the_token_too(server, finished_run):
    for path in ("/", f"/run/{RUN_KEY}", f"/api/run/{RUN_KEY}/candidates"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.base + path, timeout=30)
        assert refused.value.code == 403
    request = urllib.request.Request(f"{server.base}/api/run/{RUN_KEY}/candidates", headers={"X-ADRS-Token": server.token})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        rows = json.loads(response.read())["rows"]
    assert [r["id"] for r in rows] == sorted(candidate_commits(finished_run[0]))


def test_candidate_html_and_js_is_shown_as_text_and_never_runs(browser, server, finished_run):
    _, hostile = finished_run
    # The CSP would stop inline scripts anyway; bypass it so that escaping alone is tested.
    page = new_page(browser, server, bypass_csp=True)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pages = [(f"/run/{RUN_KEY}/c/{hostile}", "#reason"), (f"/run/{RUN_KEY}/leaderboard", "#board"),
             (f"/run/{RUN_KEY}", "#review"), (f"/compare?c={RUN_KEY}:{hostile}&c={RUN_KEY}:c000000", "#compare"),
             (f"/run/{RUN_KEY}/tree", "#tree-info")]
    for path, where in pages:
        page.goto(server.base + path)
        if path.endswith("/tree"):  # the summary shows when pointing at the node
            page.wait_for_function(f"() => window.adrsTree && adrsTree.getElementById('{hostile}').nonempty()")
            x, y = page.evaluate(f"""() => {{
                const p = adrsTree.getElementById('{hostile}').renderedPosition();
                const box = adrsTree.container().getBoundingClientRect();
                return [box.left + p.x, box.top + p.y];
            }}""")
            page.mouse.move(x, y)
        # the payload is on the page, as literal text
        page.wait_for_function("([sel, text]) => document.querySelector(sel).textContent.includes(text)",
                               arg=[where, "<img src=x onerror="], timeout=30_000)
        page.wait_for_timeout(300)  # let an image error or iframe load fire, if one had been created
        assert page.evaluate("window.__xss") is None, path
        if path.startswith("/compare"):  # the two candidates side by side
            assert page.locator("#compare table thead th a").all_text_contents() == [f"{RUN_KEY}:{hostile}",
                                                                                   f"{RUN_KEY}:c000000"]
    page.goto(f"{server.base}/run/{RUN_KEY}/c/{hostile}")
    page.wait_for_function("() => document.getElementById('code').textContent.includes('</script><script>')")
    page.wait_for_function("() => document.getElementById('prompt').textContent.includes('<svg onload=')")
    assert page.evaluate("window.__xss") is None
    assert dialogs == []
    assert page.errors == []


def test_leaderboard_filters_sorts_and_searches(browser, server, finished_run):
    run_dir, hostile = finished_run
    page = new_page(browser, server)
    page.goto(f"{server.base}/run/{RUN_KEY}/leaderboard")
    total = len(candidate_commits(run_dir))
    page.wait_for_function(f"() => document.querySelectorAll('#board tbody tr').length === {total}")

    def ids(rows: str = "tr") -> list[str]:
        return page.evaluate(f"[...document.querySelectorAll('#board tbody {rows}')].map(r => r.dataset.id)")

    from adrs.archive import open_run_readonly

    with open_run_readonly(run_dir) as archive:
        board = [r.id for r in archive.leaderboard(50)]  # what `adrs leaderboard` lists, in its order
    assert ids("tr.status-valid") == board
    page.uncheck('input[name=status][value=valid]')
    page.uncheck('input[name=status][value=rejected]')
    assert ids() == [hostile]  # only the failed one
    page.check('input[name=status][value=valid]')
    page.check('input[name=status][value=rejected]')
    page.fill("input[name=q]", "onerror")
    assert ids() == [hostile]
    page.fill("input[name=q]", "")
    page.click('th[data-key=iteration]')  # numbers sort descending first
    assert ids() == sorted(candidate_commits(run_dir), reverse=True)
    assert page.errors == []


def test_serve_refuses_a_directory_without_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adrs.cli", "serve", str(tmp_path), "--port", "0"], capture_output=True,
                          text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
