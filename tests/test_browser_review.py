"""A doctor reviewing cases in Chromium at phone and workstation sizes: the reading saved and shown, the worklist
putting unread studies first, and the performance page changing with the readings. 360 px screenshots go to
test-artifacts/review-*.png."""

from __future__ import annotations

import pytest

from model_training.data.labels import CLASSES

from .test_browser_doctor import SIZES, _login, _upload
from .test_recalibration import underconfident  # noqa: F401  (the fixture)
from .webapp_helpers import live_app

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("lang", ["en", "es"])
@pytest.mark.parametrize("size", SIZES, ids=["phone", "desktop"])
def test_doctor_reviews_and_sees_the_site_numbers_change(browser, tmp_path, classifier, xray_paths, artifacts, size, lang):
    w, h = size
    words = {"en": ("disagrees with the AI", "Not reviewed by a doctor", "1 reviewed", "Disagreements 1"),
             "es": ("en desacuerdo con la IA", "No revisado por un médico", "1 revisados", "Desacuerdos 1")}[lang]
    with live_app(tmp_path / "d", classifier=classifier) as (app, base):
        ctx, page = _login(browser, base, w, h, lang)
        _upload(page, [xray_paths["covid"][0]], "EC-R1")
        page.wait_for_selector("[data-testid=review-form]")
        case_url = page.url
        assert words[1] in page.inner_text("[data-testid=review]")
        page.goto(base + "/performance")
        assert "0" in page.inner_text("[data-testid=performance-counts]")
        before = page.inner_text("[data-testid=performance-counts]")

        page.goto(case_url)
        ai = page.get_attribute("[data-testid=result]", "data-case-id")
        options = page.eval_on_selector_all("[data-testid=review-reading] option", "os => os.map(o => o.value).filter(Boolean)")
        assert options == [*CLASSES, "other", "not_assessable"]
        page.select_option("[data-testid=review-reading]", "other")
        page.check("[data-testid=review-disagree]")
        page.fill("[data-testid=review-note-input]", "nodule, right upper lobe")
        page.click("[data-testid=review-save]")
        page.wait_for_selector("[data-testid=review-current]")
        text = page.inner_text("[data-testid=review]")
        assert words[0] in text and "nodule, right upper lobe" in page.inner_text("[data-testid=review-note]")
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1"), "no sideways scroll"
        if w == 360:
            page.screenshot(path=str(artifacts / f"review-case-{lang}-{w}x{h}.png"), full_page=True)

        page.goto(base + "/performance")
        after = page.inner_text("[data-testid=performance-counts]")
        assert after != before and words[2] in after and words[3] in after
        if w == 360:
            page.screenshot(path=str(artifacts / f"review-performance-{lang}-{w}x{h}.png"), full_page=True)

        page.goto(base + "/worklist?filter=disagreements")
        assert page.locator(f"[data-testid=row-{ai}]").count() == 1
        page.goto(base + "/worklist?filter=unreviewed")
        assert page.locator(f"[data-testid=row-{ai}]").count() == 0
        page.goto(case_url.rstrip("/") + "/report")
        assert "nodule, right upper lobe" in page.inner_text("[data-testid=report-review]")
        ctx.close()


@pytest.mark.parametrize("size", SIZES, ids=["phone", "desktop"])
def test_admin_recalibrates_and_rolls_back_in_the_browser(browser, tmp_path, underconfident, data_root, artifacts, size):
    from .test_recalibration import _kermany_test
    from .webapp_helpers import new_token, sign_in

    w, h = size
    with live_app(tmp_path / "d", classifier=underconfident) as (app, base):
        c, csrf = sign_in(base)
        auth = {"Authorization": f"Bearer {new_token(c, csrf)}"}
        for label in ("normal", "pneumonia"):
            for p in _kermany_test(data_root, label, 20):
                case = c.post("/api/v1/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")}, headers=auth).json()
                c.post(f"/api/v1/cases/{case['case_id']}/review", json={"reading": label}, headers=auth)
        ctx, page = _login(browser, base, w, h, "en")
        page.goto(base + "/performance")
        assert page.locator("[data-testid=recal-none]").is_visible()
        page.click("[data-testid=recal-preview-btn]")
        page.wait_for_selector("[data-testid=recal-preview]")
        assert "Temperature" in page.inner_text("[data-testid=recalibration]")
        page.click("[data-testid=recal-apply]")
        page.wait_for_selector("[data-testid=recal-v1]")
        assert "in use" in page.inner_text("[data-testid=recal-v1]")
        assert page.locator("[data-testid=reliability-plot]").is_visible()
        assert page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1"), "no sideways scroll"
        if w == 360:
            page.screenshot(path=str(artifacts / f"review-recalibration-en-{w}x{h}.png"), full_page=True)
        page.click("[data-testid=recal-rollback]")
        page.wait_for_selector("[data-testid=recal-v1]")
        assert "rolled back" in page.inner_text("[data-testid=recal-v1]")
        assert page.locator("[data-testid=recal-rollback]").count() == 0
        ctx.close()
