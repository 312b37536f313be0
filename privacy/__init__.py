"""Forget, export and scrub: orchestration over each store's own erase and rows."""
