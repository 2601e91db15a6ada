"""The busy morning: a burst of concurrent uploads against a started server gets answers or a clear 503 with
Retry-After, never a 500; every accepted upload ends as a case; pending cases resume by themselves when a model
can take them (a burst that passed, a model server that connects), and each records why it waits."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from .webapp_helpers import _run_client_in_thread, add_user, live_app, new_token, sign_in, wait_until


def _burst(base: str, token: str, image: bytes, n: int) -> list[httpx.Response]:
    def one(i):
        return httpx.post(f"{base}/api/v1/predict", files={"file": (f"f{i}.jpeg", image, "image/jpeg")},
                          data={"patient_code": f"B-{i}"}, headers={"Authorization": f"Bearer {token}"}, timeout=120)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _cases(base, token):
    return httpx.get(f"{base}/api/v1/cases", params={"limit": 1000}, headers={"Authorization": f"Bearer {token}"}).json()


def test_sixty_concurrent_uploads_get_answers_or_503_never_500(tmp_path, classifier, one_xray):
    with live_app(tmp_path / "data", classifier=classifier) as (app, base):
        c, csrf = sign_in(base)
        tok = new_token(c, csrf)
        responses = _burst(base, tok, one_xray.read_bytes(), 60)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503}, codes
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["retry-after"]) > 0 and r.json()["status"] == "pending"
        cases = _cases(base, tok)
        assert len(cases) == 60  # every upload is a case: none lost, none twice
        assert {x["patient_code"] for x in cases} == {f"B-{i}" for i in range(60)}
        assert all(x["status"] in ("done", "pending") for x in cases)
        assert httpx.get(f"{base}/healthz").json()["ok"]


def test_saturated_uploads_wait_as_pending_and_resume_by_themselves(tmp_path, classifier, one_xray):
    with live_app(tmp_path / "data", classifier=classifier, max_queue=1, resume_interval_s=0.3) as (app, base):
        c, csrf = sign_in(base)
        tok = new_token(c, csrf)
        responses = _burst(base, tok, one_xray.read_bytes(), 12)
        busy = [r for r in responses if r.status_code == 503]
        assert busy, [r.status_code for r in responses]  # one may wait at a time: the rest are turned away
        for r in busy:
            body = r.json()
            assert body["refusal"]["code"] == "busy" and "automatically" in body["detail"]
            assert r.headers["retry-after"] == "10"
        assert app.state.router.load()["refused_busy"] >= len(busy)
        # the resumer analyses them as the model frees up
        assert wait_until(lambda: all(x["status"] == "done" for x in _cases(base, tok)), 120)
        page = c.get(f"/cases/{busy[0].json()['case_id']}")
        assert 'data-testid="triage"' in page.text or 'data-testid="outcome"' in page.text


def test_pending_cases_resume_when_a_model_server_connects(tmp_path, tiny_model, one_xray):
    from uplink_server.model import Classifier
    from uplink_server.uplink import UplinkClient

    with live_app(tmp_path / "data", classifier=None, resume_interval_s=0.3) as (app, base):
        c, csrf = sign_in(base)
        tok = new_token(c, csrf)
        r = _burst(base, tok, one_xray.read_bytes(), 3)
        assert {x.status_code for x in r} == {503}
        waiting = _cases(base, tok)
        assert all(x["status"] == "pending" and x["refusal"]["code"] == "model_unavailable" for x in waiting)
        page = c.get(f"/cases/{waiting[0]['id']}").text
        assert "No model is available" in page
        client = UplinkClient(base, app.state.settings.uplink_key, Classifier(tiny_model), name="late-gpu")
        _run_client_in_thread(client)
        try:
            assert wait_until(lambda: all(x["status"] == "done" for x in _cases(base, tok)), 60)
            assert {x["served_by"] for x in _cases(base, tok)} == {"uplink:late-gpu"}
        finally:
            client.stop()


def test_a_case_left_pending_by_a_crash_says_why_and_resumes(tmp_path, classifier, one_xray):
    """A case the app was analysing when it was killed stays pending with no reason; the next start marks it
    interrupted and analyses it."""
    data = tmp_path / "data"
    with live_app(data, classifier=None, resume_interval_s=3600) as (app, base):
        c, csrf = sign_in(base)
        tok = new_token(c, csrf)
        case_id = _burst(base, tok, one_xray.read_bytes(), 1)[0].json()["case_id"]
        from web_app.db import Case

        with app.state.SessionLocal() as db:  # as a kill -9 mid-analysis leaves it
            case = db.get(Case, case_id)
            case.refusal_code, case.refusal_message = None, None
            db.commit()
    with live_app(data, classifier=classifier, resume_interval_s=0.3) as (app, base):
        c, _ = sign_in(base)
        assert wait_until(lambda: c.get(f"/api/v1/cases/{case_id}", headers={"X-CSRF-Token": ""}).json()["status"] == "done", 60)


def test_the_resumer_leaves_a_case_being_analysed_alone(tmp_path, one_xray):
    """A case this process is analysing is pending with no reason, as one a crash left: the resumer must not take
    it (it sent it again under the same job id, and the first request's wait for the answer ran out)."""
    from web_app import cases
    from web_app.db import Case

    with live_app(tmp_path / "data", classifier=None, resume_interval_s=3600) as (app, base):
        c, csrf = sign_in(base)
        case_id = _burst(base, new_token(c, csrf), one_xray.read_bytes(), 1)[0].json()["case_id"]
        with app.state.SessionLocal() as db:
            case = db.get(Case, case_id)
            case.refusal_code, case.refusal_message = None, None  # as while its model runs
            db.commit()
            cases._in_flight.add(case_id)
            try:
                assert case_id not in [x.id for x in cases.resumable(db, 10)]
                assert db.get(Case, case_id).refusal_code is None  # not called interrupted either
            finally:
                cases._in_flight.discard(case_id)
            assert case_id in [x.id for x in cases.resumable(db, 10)]
            assert db.get(Case, case_id).refusal_code == "interrupted"


def test_a_resumer_leaves_another_nodes_case_alone_until_its_claim_lapses(tmp_path, one_xray):
    """Two web nodes on one database: a case node B is analysing is pending with no reason, and it is not in node A's
    own in-flight set. A's resumer must leave it to B (else the model works twice and B's wait is replaced) until
    B's claim is older than the lease (B died); two resumers racing for a free case get it once."""
    import datetime as dt

    from web_app import cases
    from web_app.db import Case

    with live_app(tmp_path / "data", classifier=None, resume_interval_s=3600) as (app, base):
        c, csrf = sign_in(base)
        case_id = _burst(base, new_token(c, csrf), one_xray.read_bytes(), 1)[0].json()["case_id"]
        with app.state.SessionLocal() as db:
            case = db.get(Case, case_id)
            assert case.claimed_at is None  # its analysis ended (no model): free for any resumer
            case.refusal_code, case.refusal_message = None, None  # node B started analysing it just now
            case.claimed_at = dt.datetime.utcnow()
            db.commit()
            assert case_id not in [x.id for x in cases.resumable(db, 10)]
            assert db.get(Case, case_id).refusal_code is None  # not called interrupted either
            case.claimed_at = dt.datetime.utcnow() - dt.timedelta(seconds=cases.CLAIM_LEASE_S + 1)  # B died
            db.commit()
            with app.state.SessionLocal() as other:  # node A and node C, the same moment
                first, second = cases.resumable(db, 10), cases.resumable(other, 10)
            assert [x.id for x in first] == [case_id] and second == []
            assert db.get(Case, case_id).refusal_code == "interrupted"
            cases.release_claims(db, first)  # the model filled up before A got to it: free again at once
            with app.state.SessionLocal() as other:
                assert [x.id for x in cases.resumable(other, 10)] == [case_id]


def test_the_serving_breakdown_counts_every_stage_of_an_upload(tmp_path, classifier, one_xray):
    """GET /api/v1/stages: what bench_load turns into milliseconds per answer. Ten uploads through the API pass
    each stage of the path ten times (decode once: the model takes the pixels decoded at upload; no PNG: the
    heatmap is drawn when first viewed)."""
    from uplink_server.stages import CLOCK, per_answer

    with live_app(tmp_path / "data", classifier=classifier) as (app, base):
        c, csrf = sign_in(base)
        auth = {"Authorization": f"Bearer {new_token(c, csrf)}"}
        before = c.get("/api/v1/stages", headers=auth).json()
        for i in range(10):
            r = c.post("/api/v1/predict", files={"file": ("x.jpeg", one_xray.read_bytes(), "image/jpeg")}, headers=auth)
            assert r.status_code == 200
        after = c.get("/api/v1/stages", headers=auth).json()
        grew = {k: after[k]["count"] - before.get(k, {}).get("count", 0) for k in after}
        for name in ("request", "decode", "deidentify", "store", "checks", "preprocess", "heatmap"):
            assert grew.get(name) == 10, (name, grew)
        assert grew.get("png", 0) == 0  # the heatmap picture waits for its first view
        assert grew["model"] >= 1 and grew["database"] >= 20  # batches; the case stored, then its result written
        ms = per_answer(before, after, 10)
        assert ms["request"] > ms["model"] / 10 > 0 and ms["request"] > ms["decode"]
        assert list(after) == list(CLOCK.snapshot())  # one process-wide clock, in the path's order
        add_user(c, csrf, "tech@x.org", "technician")
        t, tcsrf = sign_in(base, "tech@x.org", "user-pass-123")
        assert t.get("/api/v1/stages", headers={"Authorization": f"Bearer {new_token(t, tcsrf)}"}).status_code == 403


def test_an_upload_makes_no_database_query_on_the_event_loop(tmp_path, classifier, one_xray):
    """A query on the event loop stops every other request while it runs (and waits for SQLite's write lock);
    an upload's reply (accepted or refused) must read what the worker threads loaded."""
    import asyncio

    from sqlalchemy import event

    with live_app(tmp_path / "data", classifier=classifier) as (app, base):
        c, csrf = sign_in(base)
        tok = new_token(c, csrf)
        engine = app.state.SessionLocal.kw["bind"]
        on_loop = []

        def record(_conn, _cursor, statement, *_):
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # a worker thread
            on_loop.append(statement.split("\n")[0][:80])

        event.listen(engine, "before_cursor_execute", record)
        h = {"Authorization": f"Bearer {tok}"}
        ok = httpx.post(f"{base}/api/v1/predict", files={"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")},
                        headers=h, timeout=120)
        refused = httpx.post(f"{base}/api/v1/predict", files={"file": ("b.png", b"\x89PNG\r\n\x1a\n broken", "image/png")},
                             headers=h, timeout=120)
        event.remove(engine, "before_cursor_execute", record)
        assert ok.status_code == 200 and ok.json()["created_by"] and ok.json()["review"] is None
        assert refused.status_code >= 400 and refused.json()["refused"] and refused.json()["created_by"]
        assert on_loop == []


def test_an_upload_reads_nothing_back_after_writing_its_result(tmp_path, classifier, one_xray):
    """The answer's UPDATE is the upload's last statement but the audit row: the reply is built from the values
    written (no refresh of the case, no heatmap lookup for a case inserted moments ago), and says what the
    database says."""
    from sqlalchemy import event

    with live_app(tmp_path / "data", classifier=classifier) as (app, base):
        c, csrf = sign_in(base)
        h = {"Authorization": f"Bearer {new_token(c, csrf)}"}
        engine = app.state.SessionLocal.kw["bind"]
        statements = []

        def record(_conn, _cursor, statement, *_):
            statements.append(" ".join(statement.split())[:200])

        event.listen(engine, "before_cursor_execute", record)
        ok = httpx.post(f"{base}/api/v1/predict", files={"file": ("a.jpeg", one_xray.read_bytes(), "image/jpeg")},
                        headers=h, timeout=120)
        event.remove(engine, "before_cursor_execute", record)
        assert ok.status_code == 200, ok.text
        update = [i for i, s in enumerate(statements) if s.startswith("UPDATE cases SET") and " label=" in s]
        assert len(update) == 1, "\n".join(statements)
        after = statements[update[0] + 1:]
        assert [s for s in after if s.startswith("SELECT")] == [], after
        before = statements[:update[0]]
        assert not [s for s in before if s.startswith("SELECT cases.heatmap_path")], before
        triage = ok.json()["triage"]  # a card without a threshold (the tiny model's, 1.5.0's): its top class decides
        assert triage["rule"] == ("most probable class" if triage["threshold"] is None else "model card threshold on 1 - p(normal)")
        stored = httpx.get(f"{base}/api/v1/cases/{ok.json()['case_id']}", headers=h, timeout=30).json()
        for key in ("status", "label", "probabilities", "uncertain", "risk", "triage", "model", "model_version",
                    "served_by", "created_by", "refusal", "review"):
            assert ok.json()[key] == stored[key], key
