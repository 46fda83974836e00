"""`adrs serve`: a local web view of one or more runs, read from the archive without its write lock.

- :mod:`adrs.web.runview`: one run, read-only and kept up to date with git (safe while a run writes)
- :mod:`adrs.web.views`: the JSON the pages show (rows, overview, candidate, diff, checkpoints)
- :mod:`adrs.web.auth`: the per-launch token (every page and API call; reviews need it as a header)
- :mod:`adrs.web.app`: the Starlette application (pages, JSON API, review)
- :mod:`adrs.web.server`: binding the socket, printing the URL, running uvicorn

The pages render everything candidate-controlled through ``textContent`` (or a canvas), never
as markup; the JS and CSS libraries are pinned copies shipped in ``static/vendor`` (see its README).
"""
