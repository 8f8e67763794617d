"""Prefect flows: each reads as a list of stage calls."""
