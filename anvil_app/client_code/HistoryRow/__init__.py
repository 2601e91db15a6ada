from anvil import *

from ..strings import class_name, pct, t
from ._anvil_designer import HistoryRowTemplate


class HistoryRow(HistoryRowTemplate):
  """One line of the history: when, the result (or why it was not analyzed) and the model version."""

  def __init__(self, **properties):
    self.init_components(**properties)
    item = self.item
    lang = item.get("lang", "en")
    self.when_label.text = item["when"].strftime("%Y-%m-%d %H:%M") if item.get("when") else ""
    if item.get("refused"):
      self.result_label.text = t(lang, "not_analyzed")
    else:
      text = class_name(lang, item.get("label") or "")
      if item.get("probability") is not None:
        text += " " + pct(item["probability"])
      if item.get("uncertain"):
        text += " ?"
      self.result_label.text = text
    self.model_label.text = item.get("model_version") or ""
