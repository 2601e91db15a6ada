"""What the doctor sees, in Chromium at phone and workstation sizes, in English and
Spanish: uncertain results, refusals with a next step, batch summaries, error pages
that keep the navigation, the report and the admin page. Screenshots at 360 px go to
test-artifacts/ (result, report, worklist, admin)."""

from __future__ import annotations

import copy
import io
import json
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from .webapp_helpers import ADMIN, add_user, live_app, sign_in, wait_js

pytestmark = pytest.mark.browser
SIZES = [(360, 740), (1280, 800)]
WORDS = {
    "en": {"uncertain": "Uncertain:", "refused": "Not analyzed", "next": "What to do", "summary": "2 analysed, 1 refused, 0 waiting",
           "technician": "Technician", "added": "added as Technician"},
    "es": {"uncertain": "Incierto:", "refused": "No analizada", "next": "Qué hacer", "summary": "2 analizadas, 1 rechazadas, 0 en espera",
           "technician": "Tecnólogo", "added": "agregado como Tecnólogo"},
}


@pytest.fixture(scope="module")
def near_tie(tiny_model, xray_paths):
    """The tiny real model with a margin rule set just above this image's margin:
    what a near tie looks like, by the rule as the card records it."""
    from uplink_server.model import Classifier, find_card
    from uplink_server.uncertainty import margin

    img = xray_paths["kermany_pneumonia"][0]
    clf = Classifier(tiny_model)
    m = margin(np.array(list(clf.predict(img).probabilities.values())))
    card = copy.deepcopy(json.loads(find_card(tiny_model).read_text()))
    card["uncertainty"] = {"rule": "margin", "threshold": m + 0.05}
    return Classifier(tiny_model, card=card), img


def _login(browser, base, w, h, lang, email=ADMIN[0], password=ADMIN[1]):
    ctx = browser.new_context(viewport={"width": w, "height": h}, locale="es-EC" if lang == "es" else "en-US")
    page = ctx.new_page()
    page.goto(base + "/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_selector("[data-testid=file-input]")
    return ctx, page


def _no_certainties(text: str) -> None:
    assert not re.search(r"(?<![\d.])(100|0)(\.0)?\s?%", text), "a probability shown as 100 % or 0 %"


def _upload(page, paths, code: str) -> None:
    page.fill("[data-testid=patient-code]", code)
    page.set_input_files("[data-testid=file-input]", [str(p) for p in paths])
    page.click("[data-testid=analyze]")


@pytest.mark.parametrize("lang", ["en", "es"])
@pytest.mark.parametrize("size", SIZES, ids=["phone", "desktop"])
def test_near_tie_is_shown_as_uncertain_everywhere(browser, tmp_path, near_tie, artifacts, size, lang):
    clf, img = near_tie
    w, h = size
    with live_app(tmp_path / "d", classifier=clf, clinic_name="Centro de Salud Riobamba") as (app, base):
        ctx, page = _login(browser, base, w, h, lang)
        _upload(page, [img], "EC-TIE")
        page.wait_for_selector("[data-testid=outcome]")
        assert page.inner_text("[data-testid=outcome]").startswith(WORDS[lang]["uncertain"])
        assert page.locator("[data-testid=uncertain]").is_visible()
        # the line names both classes with their probabilities, and does not claim the two cannot be told apart
        probs = page.locator("[data-testid=probabilities] .pct").all_inner_texts()
        help_text = page.inner_text("[data-testid=uncertain]")
        assert probs[0] in help_text and probs[1] in help_text and "cannot tell" not in help_text and "no logra" not in help_text
        _no_certainties(page.inner_text("[data-testid=probabilities]"))
        assert page.locator("[data-testid=next-xray]").is_visible()
        wait_js(page, "document.querySelector('[data-testid=xray]').naturalWidth > 0")
        page.check("[data-testid=heatmap-toggle]")
        assert page.locator("[data-testid=heatmap-legend]").is_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= w
        tag = f"{lang}-{w}x{h}"
        if w == 360:
            page.screenshot(path=str(artifacts / f"doctor-result-{tag}.png"), full_page=True)
        case_id = int(page.url.rsplit("/", 1)[1])
        page.click("[data-testid=report-link]")
        page.wait_for_selector("[data-testid=report]")
        assert page.inner_text("[data-testid=report-result]").startswith(WORDS[lang]["uncertain"])
        assert page.inner_text("[data-testid=report-uncertainty]")
        assert page.inner_text("[data-testid=clinic]") == "Centro de Salud Riobamba"
        assert page.locator("[data-testid=reviewer]").is_visible() and page.locator("[data-testid=heatmap-legend]").is_visible()
        assert "Status" not in page.inner_text("[data-testid=report]") and "Estado" not in page.inner_text("[data-testid=report]")
        _no_certainties(page.inner_text("[data-testid=report]"))
        if w == 360:
            page.screenshot(path=str(artifacts / f"doctor-report-{tag}.png"), full_page=True)
        page.goto(base + "/worklist")
        assert page.locator(f"[data-testid=row-{case_id}] [data-testid=uncertain-badge]").is_visible()
        page.click(f"[data-testid=row-{case_id}] td.nowrap")  # the whole row is the link, not only the number
        page.wait_for_url(f"**/cases/{case_id}")
        c, _ = sign_in(base)
        body = c.get(f"/api/v1/cases/{case_id}").json()
        assert body["uncertain"] is True and 0 <= body["margin"] < clf.uncertainty.threshold
        ctx.close()


@pytest.mark.parametrize("lang", ["en", "es"])
@pytest.mark.parametrize("size", SIZES, ids=["phone", "desktop"])
def test_refusals_batches_and_the_empty_code_warning(browser, tmp_path, classifier, xray_paths, artifacts, size, lang):
    w, h = size
    gray = np.asarray(Image.open(xray_paths["adult_normal"][0]).convert("L"))
    photo = tmp_path / "photo.png"  # a colour photograph, as a phone would take of a screen
    Image.fromarray(np.stack([gray, np.roll(gray, 40, 1) // 2, 255 - gray], -1).astype(np.uint8)).save(photo)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(xray_paths["covid"][0].read_bytes()[:900])
    with live_app(tmp_path / "d", classifier=classifier) as (app, base):
        ctx, page = _login(browser, base, w, h, lang)
        # an empty patient code is not taken silently
        page.set_input_files("[data-testid=file-input]", [str(xray_paths["kermany_normal"][0])])
        page.click("[data-testid=analyze]")
        assert page.locator("[data-testid=no-code-warning]").is_visible() and page.url.endswith("/")
        page.click("[data-testid=analyze]")  # a second press goes ahead, and the case says so
        page.wait_for_selector("[data-testid=no-code]")
        # three files: two X-rays and a damaged one; the summary comes first
        page.goto(base + "/")
        page.fill("[data-testid=patient-code]", "EC-B")
        page.set_input_files("[data-testid=file-input]", [str(p) for p in (xray_paths["kermany_normal"][1], xray_paths["covid"][1], broken)])
        assert page.locator("[data-testid=per-file-codes]").is_visible()  # each file gets its own code
        assert page.input_value("[data-testid=code-1]") == "EC-B"
        page.fill("[data-testid=code-0]", "EC-B1")
        page.fill("[data-testid=code-1]", "EC-B2")
        page.click("[data-testid=analyze]")
        page.wait_for_selector("[data-testid=batch-summary]")
        codes = page.locator("[data-testid=result] h2").all_inner_texts()
        assert any("EC-B1" in c for c in codes) and any("EC-B2" in c for c in codes) and any(c.endswith("EC-B") for c in codes)
        assert page.inner_text("[data-testid=batch-summary]") == WORDS[lang]["summary"]
        refused = page.locator("[data-testid=result].status-refused")
        assert refused.count() == 1 and refused.locator("[data-testid=xray]").count() == 0  # no broken image icon
        assert WORDS[lang]["next"] in refused.inner_text()
        # a colour photo: refused with what to do, and shown as it came, in colour
        page.goto(base + "/")
        _upload(page, [photo], "EC-P")
        page.wait_for_selector("[data-testid=next-step]")
        assert page.inner_text("[data-testid=outcome]") == WORDS[lang]["refused"]
        wait_js(page, "document.querySelector('[data-testid=xray]').naturalWidth > 0")
        png = page.request.get(page.url + "/image.png").body()
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float32)
        assert (rgb.max(2) - rgb.min(2)).mean() > 20  # not turned grey
        if w == 360:
            page.screenshot(path=str(artifacts / f"doctor-refused-{lang}-{w}x{h}.png"), full_page=True)
        # refused studies are on the worklist with their reason
        page.goto(base + "/worklist")
        assert page.locator("[data-testid=refused-reason]").count() == 2
        if w == 360:
            page.screenshot(path=str(artifacts / f"doctor-worklist-{lang}-{w}x{h}.png"), full_page=True)
        ctx.close()


@pytest.mark.parametrize("lang", ["en", "es"])
@pytest.mark.parametrize("size", SIZES, ids=["phone", "desktop"])
def test_admin_defaults_403_keeps_navigation_and_analyze_shows_progress(browser, tmp_path, classifier, xray_paths,
                                                                        artifacts, size, lang):
    w, h = size
    with live_app(tmp_path / "d", classifier=classifier) as (app, base):
        ctx, page = _login(browser, base, w, h, lang)
        # the navigation fits two lines even in Spanish on a phone
        nav_h = page.evaluate("document.querySelector('nav').getBoundingClientRect().height")
        link_h = page.evaluate("document.querySelector('[data-testid=nav-history]').getBoundingClientRect().height")
        assert nav_h <= 2.6 * link_h
        page.goto(base + "/admin")
        assert page.eval_on_selector("[data-testid=role-select]", "s => s.value") == "technician"  # least privilege
        assert WORDS[lang]["technician"] in page.inner_text("[data-testid=role-select]")
        page.fill("input[name=email]", "tech@clinic.ec")
        page.fill("form[action='/admin/users'] input[name=password]", "tech-pass-123")
        page.click("form[action='/admin/users'] button.primary")
        page.wait_for_selector("[data-testid=admin-message]")
        assert WORDS[lang]["added"] in page.inner_text("[data-testid=admin-message]")
        assert WORDS[lang]["technician"] in page.inner_text("[data-testid='user-tech@clinic.ec']")
        if w == 360:
            page.screenshot(path=str(artifacts / f"doctor-admin-{lang}-{w}x{h}.png"), full_page=True)
        # a technician sent to an admin page keeps the navigation and stays signed in
        tctx, tpage = _login(browser, base, w, h, lang, "tech@clinic.ec", "tech-pass-123")
        r = tpage.goto(base + "/admin")
        assert r.status == 403
        assert tpage.locator("[data-testid=nav-history]").is_visible() and tpage.locator("[data-testid=sign-out]").is_visible()
        # on a slow network the button shows progress and a second press sends nothing
        tpage.goto(base + "/")
        # count what would leave the page, and keep it here, as a slow network would
        tpage.evaluate("""document.getElementById('upload-form').addEventListener('submit', e => {
            if (!e.defaultPrevented) window.sent = (window.sent || 0) + 1; e.preventDefault(); })""")
        tpage.fill("[data-testid=patient-code]", "EC-S")
        tpage.set_input_files("[data-testid=file-input]", [str(xray_paths["kermany_normal"][0])])
        tpage.click("[data-testid=analyze]")
        assert tpage.locator("[data-testid=analyze]").is_disabled()
        assert tpage.get_attribute("[data-testid=analyze]", "aria-busy") == "true"
        assert tpage.inner_text("[data-testid=analyze]") == ("Analizando…" if lang == "es" else "Analyzing…")
        tpage.eval_on_selector("#upload-form", "f => f.requestSubmit()")  # a second press
        assert tpage.evaluate("window.sent") == 1
        tctx.close()
        # the admin deactivates the technician: sign-in then fails
        page.goto(base + "/admin")
        page.click("[data-testid='toggle-tech@clinic.ec']")
        page.wait_for_selector("[data-testid=admin-message]")
        c = httpx.Client(base_url=base, follow_redirects=True)
        from .webapp_helpers import csrf_of

        r = c.post("/login", data={"email": "tech@clinic.ec", "password": "tech-pass-123", "csrf_token": csrf_of(c.get("/login").text)})
        assert r.status_code == 401
        ctx.close()


def test_admin_resets_a_password(tmp_path, classifier):
    with live_app(tmp_path / "d", classifier=classifier) as (app, base):
        c, csrf = sign_in(base)
        add_user(c, csrf, "doc@clinic.ec", "doctor")
        from web_app.db import User

        with app.state.SessionLocal() as db:
            uid = db.query(User).filter(User.email == "doc@clinic.ec").one().id
        assert c.post(f"/admin/users/{uid}/password", data={"csrf_token": csrf, "password": "short"}).status_code == 400
        r = c.post(f"/admin/users/{uid}/password", data={"csrf_token": csrf, "password": "brand-new-pass"})
        assert r.status_code == 200 and "doc@clinic.ec" in r.text
        sign_in(base, "doc@clinic.ec", "brand-new-pass")
        doc, dcsrf = sign_in(base, "doc@clinic.ec", "brand-new-pass")
        assert doc.post(f"/admin/users/{uid}/password", data={"csrf_token": dcsrf, "password": "x" * 10}).status_code == 403
