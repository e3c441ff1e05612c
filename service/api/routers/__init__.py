"""Routers of the /v1 API."""
