"""The one door into the event log, for files, SQL tables and ``POST /events``: screen, gate, append."""
