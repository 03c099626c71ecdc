"""The control API's routers, one per area (FastAPI's "bigger applications" layout)."""
