"""The Anvil app is in Anvil's git format and calls what the model server registers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "anvil_app"


def test_anvil_app_layout_and_calls(classifier):
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load((APP / "anvil.yaml").read_text())
    form = cfg["startup"]["module"]
    folder = APP / "client_code" / form
    template = yaml.safe_load((folder / "form_template.yaml").read_text())
    names = {c["name"] for c in template["components"]}
    assert {"file_loader", "xray_image", "heatmap_image", "result_label", "notice_label"} <= names
    code = (folder / "__init__.py").read_text()
    tree = ast.parse(code)
    handlers = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for c in template["components"]:
        for handler in c.get("event_bindings", {}).values():
            assert handler in handlers, handler
    called = set(re.findall(r'anvil\.server\.call\("([a-z_]+)"', code))
    from uplink_server.anvil_uplink import make_functions

    pytest.importorskip("anvil")
    assert called and called <= set(make_functions(classifier))
    assert "not a diagnosis" in code
