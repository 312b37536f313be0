"""The feature pipeline: builds Feast's offline tables from the event log, applies the repo,
materializes and pushes. Listed in ``.feastignore``, so Feast does not scan it for definitions;
``features.py`` still imports ``windows.py`` from here (the request-time windows)."""
