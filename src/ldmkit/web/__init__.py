"""`ldmkit serve`: a local web page over a folder of runs (web/app.py), its generation jobs
(web/jobs.py) and the page itself (web/static/: HTML, JS and CSS, nothing fetched from elsewhere).
Needs the `serve` extra: pip install -e '.[serve]' (Starlette and uvicorn)."""
