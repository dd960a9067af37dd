"""The feedback app's routers: the JSON API (api.py), the server-rendered pages (pages.py), and the
annotator's-day pages beyond the task page (review.py: a labeler's history and skips, an admin's review)."""
