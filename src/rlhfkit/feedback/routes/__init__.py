"""The feedback app's routers: the JSON API (api.py) and the server-rendered pages (pages.py)."""
