"""The feature pipeline: builds Feast's offline tables from the event log, applies the repo,
materializes and pushes. Listed in ``.feastignore``: Feast imports definitions, not this."""
