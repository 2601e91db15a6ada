"""Rendering a page: the template with what every page needs (user, language, CSRF token, the notice)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session, object_session

from uplink_server import NOTICE

from .db import Case, User
from .deps import csrf_token, lang_of
from .i18n import next_step, pct, refusal_text, translate
from .reviews import READINGS, may_review, may_see_performance
from .security import can


def render(request: Request, name: str, user: User | None = None, status: int = 200, **ctx) -> HTMLResponse:
    lang = lang_of(request)
    templates = request.app.state.templates
    # technicians may see Performance where the site allows it: the menu must say so, not only the URL
    db = object_session(user) if user is not None else None
    show_performance = user is not None and (can(user.role, "performance") or (db is not None and may_see_performance(db, user)))
    html = templates.get_template(name).render(show_performance=show_performance,
        request=request, user=user, lang=lang, t=lambda k: translate(k, lang), csrf=csrf_token(request),
        can=lambda p: user is not None and can(user.role, p), refusal_text=lambda c, m=None: refusal_text(c, lang, m),
        next_step=lambda c: next_step(c, lang), pct=pct, notice=translate("notice", lang), notice_en=NOTICE, **ctx)
    return HTMLResponse(html, status_code=status)


def render_case(request: Request, user: User, db: Session, case: Case, status: int = 200, **ctx) -> HTMLResponse:
    return render(request, "case.html", user, status=status, case=case, may_review=may_review(db, user),
                  readings=READINGS, **ctx)
