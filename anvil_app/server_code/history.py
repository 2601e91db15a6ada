"""Server module of the Anvil app: a simple history of results in the Data Table ``history``.

The model server (uplink) classifies; this module only keeps what the doctor saw: the result, its
probability, the uncertainty flag, the refusal code and the model version. No image, file name or patient
data is stored (screening support, not a record system).
"""

from datetime import datetime

import anvil.server
import anvil.tables as tables
from anvil.tables import app_tables

HISTORY_LIMIT = 50


@anvil.server.callable
def save_result(result):
  """Store one result as returned by the uplink's classify_xray; returns the history row as a dict."""
  probs = result.get("probabilities") or {}
  label = result.get("label")
  row = app_tables.history.add_row(
    when=datetime.now(),
    label=label,
    probability=probs.get(label) if label else None,
    uncertain=bool(result.get("uncertain")),
    refused=bool(result.get("refused")),
    refusal_code=(result.get("refusal") or {}).get("code"),
    model_version="%s %s" % (result.get("model", ""), result.get("version", "")),
  )
  return _as_dict(row)


@anvil.server.callable
def recent_results(limit=20):
  """The newest results first, at most ``limit`` (capped at HISTORY_LIMIT)."""
  rows = app_tables.history.search(tables.order_by("when", ascending=False))
  return [_as_dict(r) for r in list(rows)[:min(int(limit), HISTORY_LIMIT)]]


def _as_dict(row):
  return {"when": row["when"], "label": row["label"], "probability": row["probability"],
          "uncertain": row["uncertain"], "refused": row["refused"], "refusal_code": row["refusal_code"],
          "model_version": row["model_version"]}
