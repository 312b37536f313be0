"""Persona's Feast repo (definitions in features.py; the pipeline package is Feast-ignored)."""
