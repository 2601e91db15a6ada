"""The Anvil app: Anvil's git format, its forms and event bindings, the server calls it makes against what the
uplink and its server module register, every string in English and Spanish, and the form code run for real.

There is no Anvil server offline, so the forms run against a small stand-in for Anvil's designer (components as
plain objects built from form_template.yaml) and for Data Tables (a list); the model, the uplink functions and
the app's own server module are the real ones.
"""

from __future__ import annotations

import ast
import importlib
import re
import string
import sys
import types
from datetime import datetime
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("anvil")

APP = Path(__file__).resolve().parents[1] / "anvil_app"
CLIENT = APP / "client_code"
FORMS = sorted(p.parent.name for p in CLIENT.glob("*/form_template.yaml"))


def _template(form: str) -> dict:
    return yaml.safe_load((CLIENT / form / "form_template.yaml").read_text())


def _strings():
    spec = importlib.util.spec_from_file_location("anvil_strings", CLIENT / "strings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _server_callables() -> dict[str, ast.FunctionDef]:
    out = {}
    for f in (APP / "server_code").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and any("callable" in ast.unparse(d) for d in node.decorator_list):
                out[node.name] = node
    return out


def test_app_is_in_anvils_git_format_with_a_history_table():
    cfg = yaml.safe_load((APP / "anvil.yaml").read_text())
    assert cfg["startup"] == {"type": "form", "module": "XrayForm"}
    assert (CLIENT / "XrayForm" / "__init__.py").is_file()
    assert any(s["source"] == "/runtime/services/tables.yml" for s in cfg["services"])
    table = cfg["db_schema"]["history"]
    assert table["client"] == "none" and table["server"] == "full"  # the browser cannot read or edit it
    columns = {c["name"]: c["type"] for c in table["columns"]}
    # what the server module writes is exactly what the table declares
    code = (APP / "server_code" / "history.py").read_text()
    add_row = next(n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("add_row"))
    assert {k.arg for k in add_row.keywords} == set(columns)
    assert columns["when"] == "datetime" and columns["model_version"] == "string"
    assert not {"file", "file_name", "patient", "image"} & set(columns)  # no patient data kept


@pytest.mark.parametrize("form", FORMS)
def test_every_event_binding_has_its_handler_and_every_component_used_exists(form):
    template = _template(form)
    names = {c["name"] for c in template["components"]}
    tree = ast.parse((CLIENT / form / "__init__.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    for c in template["components"]:
        for event, handler in c.get("event_bindings", {}).items():
            assert handler in methods, f"{form}.{c['name']} {event} -> {handler} is not defined"
        if c["type"] == "RepeatingPanel":
            assert c["properties"]["item_template"] in FORMS
    assigned = {t.attr for n in ast.walk(cls) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Attribute)}
    used = {n.attr for n in ast.walk(cls) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"}
    unknown = used - names - methods - assigned - {"init_components", "item"}
    assert not unknown, f"{form} uses components its template lacks: {unknown}"


def test_server_calls_are_what_the_uplink_and_the_server_module_register(classifier):
    from uplink_server.anvil_uplink import make_functions

    registered = set(make_functions(classifier)) | set(_server_callables())
    called = set()
    for f in CLIENT.rglob("*.py"):
        called |= set(re.findall(r'anvil\.server\.call\(\s*"([a-z_]+)"', f.read_text()))
    assert {"classify_xray", "save_result", "recent_results"} <= called <= registered


def test_every_string_in_both_languages():
    s = _strings()
    from model_training.data.labels import CLASSES, DISPLAY_NAMES

    fields = string.Formatter()
    for key, entry in s.STRINGS.items():
        assert set(entry) == {"en", "es"} and all(v.strip() for v in entry.values()), key
        placeholders = {lang: {f for _, f, _, _ in fields.parse(v) if f} for lang, v in entry.items()}
        assert placeholders["en"] == placeholders["es"], key
    for c in CLASSES:  # the app names the classes as the web app does
        assert s.STRINGS[c] == DISPLAY_NAMES[c]
    used = set()
    for f in CLIENT.rglob("*.py"):
        used |= set(re.findall(r'\bt\(\s*[\w.]+,\s*"([a-z_0-9]+)"', f.read_text()))
    assert used and used <= set(s.STRINGS), used - set(s.STRINGS)
    assert "not a diagnosis" in s.t("en", "notice") and "no es un diagnóstico" in s.t("es", "notice")
    # refusals come from the model server in the chosen language: every code has both
    from uplink_server.errors import REFUSAL_CODES
    from uplink_server.messages import NEXT_STEP, REFUSAL_TEXT

    for code in REFUSAL_CODES:
        assert set(REFUSAL_TEXT[code]) == {"en", "es"} and set(NEXT_STEP[code]) == {"en", "es"}, code


# ---- the forms, run ----------------------------------------------------------------------------------

class _Component:
    def __init__(self, kind: str, props: dict, forms: dict):
        defaults = {"text": "", "visible": True, "enabled": True, "items": [], "selected_value": None,
                    "files": [], "source": None, "checked": False}
        self.__dict__.update(kind=kind, forms=forms, rows=[], **{**defaults, **props})

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "items" and self.kind == "RepeatingPanel":  # as Anvil does: one template form per item
            super().__setattr__("rows", [self.forms[self.item_template](item=item) for item in value])

    def clear(self):
        self.files = []


class _Table:
    """Data Tables' add_row/search, in memory."""

    def __init__(self):
        self.rows = []

    def add_row(self, **cols):
        self.rows.append(cols)
        return cols

    def search(self, order):
        return sorted(self.rows, key=lambda r: r[order.column_name], reverse=not order.ascending)


@pytest.fixture
def app(classifier, monkeypatch):
    import anvil
    import anvil.server
    import anvil.tables

    from uplink_server.anvil_uplink import make_functions

    table = _Table()
    monkeypatch.setattr(anvil.tables, "app_tables", types.SimpleNamespace(history=table), raising=False)
    spec = importlib.util.spec_from_file_location("anvil_server_history", APP / "server_code" / "history.py")
    server = importlib.util.module_from_spec(spec)
    registered = {}
    monkeypatch.setattr(anvil.server, "callable", lambda fn: registered.setdefault(fn.__name__, fn))
    spec.loader.exec_module(server)
    registered.update(make_functions(classifier))
    calls = []

    def call(name, *args, **kwargs):
        calls.append(name)
        return registered[name](*args, **kwargs)

    monkeypatch.setattr(anvil.server, "call", call)

    forms: dict = {}
    pkg = types.ModuleType("anvil_client")
    pkg.__path__ = [str(CLIENT)]
    monkeypatch.setitem(sys.modules, "anvil_client", pkg)
    for form in FORMS:
        comps = _template(form)["components"]

        class Template:
            _components = comps

            def __init__(self, **properties):
                pass

            def init_components(self, **properties):
                for c in self._components:
                    setattr(self, c["name"], _Component(c["type"], c.get("properties", {}), forms))
                for k, v in properties.items():
                    setattr(self, k, v)

        designer = types.ModuleType(f"anvil_client.{form}._anvil_designer")
        setattr(designer, f"{form}Template", Template)
        monkeypatch.setitem(sys.modules, designer.__name__, designer)
    for form in FORMS:
        monkeypatch.delitem(sys.modules, f"anvil_client.{form}", raising=False)
        forms[form] = getattr(importlib.import_module(f"anvil_client.{form}"), form)
    return types.SimpleNamespace(forms=forms, table=table, calls=calls)


def _media(path: Path | None = None, data: bytes | None = None, name: str = "x.jpg"):
    import anvil

    return anvil.BlobMedia("image/jpeg", data if data is not None else path.read_bytes(), name=name)


def test_several_files_one_after_another_in_english_then_spanish(app, classifier, xray_paths):
    form = app.forms["XrayForm"]()
    assert "not a diagnosis" in form.notice_label.text and form.history_empty.text == "No results yet."
    files = [_media(xray_paths["covid"][0]), _media(data=b"%PDF-1.4 not an x-ray", name="report.pdf"),
             _media(xray_paths["kermany_pneumonia"][0])]
    form.file_loader.files = files
    form.file_loader_change(file=files[0])
    assert app.calls.count("classify_xray") == 3 and app.calls.count("save_result") == 3
    assert form.status_label.text == "3 analyzed" and form.file_loader.files == []
    assert form.file_label.text == "File 3 of 3" and not form.next_button.enabled and form.prev_button.enabled

    # the X-ray: class with a probability that is never 100 %, model version, heatmap shown with its caption
    form.prev_button_click()
    form.prev_button_click()
    assert form.file_label.text == "File 1 of 3"
    # triage first (the model's own threshold, or its most probable class), then the finding
    assert re.fullmatch(r"(Needs a doctor's read|No abnormality found by the model)\. Finding: "
                        r"(Normal|Pneumonia|COVID-19|Tuberculosis) (> 99%|< 1%|\d+%)", form.result_label.text)
    assert form.model_label.text == f"Model {classifier.name} {classifier.version}"
    assert form.heatmap_check.visible and form.heatmap_image.visible and form.heatmap_image.source is not None
    assert form.heatmap_caption.visible and not form.xray_image.visible
    form.heatmap_check.checked = False
    form.heatmap_check_change()
    assert form.xray_image.visible and not form.heatmap_image.visible

    # the PDF: refused, with the reason and what to do next
    form.next_button_click()
    assert form.result_label.text == "Not analyzed"
    assert "not an image" in form.refusal_label.text and form.next_step_label.text.startswith("What to do:")
    assert not form.probabilities_label.visible and not form.heatmap_check.visible

    # Spanish: every text on the page switches, the refusal too, without asking the model again
    n_calls = len(app.calls)
    form.language_dropdown.selected_value = "es"
    form.language_dropdown_change()
    assert form.result_label.text == "No analizada" and "no es una imagen" in form.refusal_label.text
    assert form.next_step_label.text.startswith("Qué hacer:") and form.file_label.text == "Archivo 2 de 3"
    assert "no es un diagnóstico" in form.notice_label.text and form.history_title.text == "Historial"
    assert app.calls[n_calls:] == ["recent_results"]

    # the history: newest first, in the chosen language, with the model version
    rows = form.history_panel.rows
    assert len(rows) == 3 and len(app.table.rows) == 3
    assert rows[1].result_label.text == "No analizada"
    assert all(r.model_label.text for r in rows) and not form.history_empty.visible
    assert isinstance(app.table.rows[0]["when"], datetime)


def test_uncertain_results_name_both_classes(app, classifier, xray_paths, monkeypatch):
    from uplink_server.uncertainty import UncertaintyRule

    monkeypatch.setattr(classifier, "uncertainty", UncertaintyRule("margin", 1.01))  # every result uncertain
    form = app.forms["XrayForm"]()
    f = _media(xray_paths["adult_normal"][0])
    form.file_loader_change(file=f)
    names = "(Normal|Pneumonia|COVID-19)"
    assert re.fullmatch(f"Uncertain: {names} or {names}. Review carefully.", form.uncertain_label.text)
    assert form.uncertain_label.visible
    assert form.history_panel.rows[0].result_label.text.endswith("?")


def test_no_model_server_is_a_clear_message_and_the_page_keeps_working(app, xray_paths, monkeypatch):
    import anvil.server

    def gone(name, *a, **k):
        raise RuntimeError("no uplink connected")

    monkeypatch.setattr(anvil.server, "call", gone)
    form = app.forms["XrayForm"]()
    assert form.history_empty.text.startswith("History unavailable:")
    form.file_loader_change(file=_media(xray_paths["covid"][0]))
    assert form.result_label.text == "Model unavailable" and "uplink_server connect" in form.refusal_label.text
