"""The web app's routers: the HTML pages, by what they are for, and the JSON API (``api``, under /api/v1)."""

from . import account, admin, cases, review

PAGE_ROUTERS = (account.router, cases.router, review.router, admin.router)
