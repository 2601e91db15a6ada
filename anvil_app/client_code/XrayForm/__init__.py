import anvil.server
from anvil import *

from ..strings import LANGUAGES, class_name, pct, t
from ._anvil_designer import XrayFormTemplate


class XrayForm(XrayFormTemplate):
  """Upload one or several X-rays; each is sent to the model server (uplink) in turn, its result shown
  and kept in the history. English or Spanish from the switch at the top."""

  def __init__(self, **properties):
    self.lang = "en"
    self.results = []  # (file, result) of the last upload, in order
    self.index = 0
    self.init_components(**properties)
    self.language_dropdown.items = LANGUAGES
    self.language_dropdown.selected_value = self.lang
    self.apply_language()
    self.show_current()
    self.refresh_history()

  # ---- language -------------------------------------------------------------------------------------
  def language_dropdown_change(self, **event_args):
    self.lang = self.language_dropdown.selected_value or "en"
    self.apply_language()
    self.show_current()
    self.refresh_history()

  def apply_language(self):
    lang = self.lang
    self.title_label.text = t(lang, "title")
    self.language_label.text = t(lang, "language")
    self.notice_label.text = t(lang, "notice")
    self.file_loader.text = t(lang, "upload")
    self.heatmap_check.text = t(lang, "show_heatmap")
    self.heatmap_caption.text = t(lang, "heatmap_caption")
    self.prev_button.text = t(lang, "previous")
    self.next_button.text = t(lang, "next")
    self.history_title.text = t(lang, "history")

  # ---- uploads --------------------------------------------------------------------------------------
  def file_loader_change(self, file, **event_args):
    files = list(self.file_loader.files or ([file] if file is not None else []))
    if not files:
      return
    self.results = []
    for i, f in enumerate(files):
      self.status_label.text = t(self.lang, "analyzing", i=i + 1, n=len(files))
      try:
        res = anvil.server.call("classify_xray", f, lang=self.lang)
      except Exception as exc:  # no uplink connected, or it dropped mid-request
        res = {"error": str(exc)}
      else:
        try:
          anvil.server.call("save_result", {k: v for k, v in res.items() if k != "heatmap"})
        except Exception:
          pass  # the history is a convenience: the result is still shown
      self.results.append((f, res))
      self.index = len(self.results) - 1
      self.show_current()
    self.status_label.text = t(self.lang, "done", n=len(files))
    self.file_loader.clear()
    self.refresh_history()

  def prev_button_click(self, **event_args):
    self.index = max(0, self.index - 1)
    self.show_current()

  def next_button_click(self, **event_args):
    self.index = min(len(self.results) - 1, self.index + 1)
    self.show_current()

  # ---- one result -----------------------------------------------------------------------------------
  def show_current(self):
    lang = self.lang
    has = bool(self.results)
    for c in (self.result_label, self.file_label, self.model_label, self.xray_image):
      c.visible = has
    self.prev_button.visible = self.next_button.visible = len(self.results) > 1
    for c in (self.uncertain_label, self.probabilities_label, self.refusal_label, self.next_step_label,
              self.heatmap_check, self.heatmap_image, self.heatmap_caption):
      c.visible = False
    if not has:
      return
    f, res = self.results[self.index]
    self.file_label.text = t(lang, "file", i=self.index + 1, n=len(self.results))
    self.prev_button.enabled = self.index > 0
    self.next_button.enabled = self.index < len(self.results) - 1
    self.xray_image.source = f
    if "error" in res:
      self.result_label.text = t(lang, "unavailable")
      self.refusal_label.text = t(lang, "unavailable_help") + " " + res["error"]
      self.refusal_label.visible = True
      self.model_label.visible = False
      return
    self.model_label.text = t(lang, "model", version=(res.get("model", "") + " " + res.get("version", "")).strip())
    if res["refused"]:
      refusal = res["refusal"]
      text = (refusal.get("translations") or {}).get(lang) or refusal
      self.result_label.text = t(lang, "not_analyzed")
      self.refusal_label.text = text["message"]
      self.refusal_label.visible = True
      if text.get("next_step"):
        self.next_step_label.text = t(lang, "what_to_do", step=text["next_step"])
        self.next_step_label.visible = True
      return
    probs = sorted(res["probabilities"].items(), key=lambda kv: -kv[1])
    finding = "%s %s" % (class_name(lang, res["label"]), pct(probs[0][1]))
    triage = res.get("triage")
    if triage:  # triage first: does this film need a doctor's read? then the finding
      lead = t(lang, "needs_read" if triage["needs_read"] else "no_abnormality")
      self.result_label.text = t(lang, "triage_line", lead=lead, finding=finding)
    else:  # a model without a normal class
      self.result_label.text = finding
    if res["uncertain"] and len(probs) > 1:
      self.uncertain_label.text = t(lang, "uncertain", a=class_name(lang, probs[0][0]), b=class_name(lang, probs[1][0]))
      self.uncertain_label.visible = True
    self.probabilities_label.text = "   ".join("%s %s" % (class_name(lang, k), pct(v)) for k, v in probs)
    self.probabilities_label.visible = True
    if res.get("heatmap") is not None:
      self.heatmap_image.source = res["heatmap"]
      self.heatmap_check.visible = True
      self.heatmap_check_change()

  def heatmap_check_change(self, **event_args):
    on = bool(self.heatmap_check.checked)
    self.heatmap_image.visible = self.heatmap_caption.visible = on
    self.xray_image.visible = not on

  # ---- history --------------------------------------------------------------------------------------
  def refresh_history(self):
    try:
      rows = anvil.server.call("recent_results")
    except Exception as exc:
      self.history_panel.items = []
      self.history_empty.text = t(self.lang, "history_unavailable", error=str(exc))
      self.history_empty.visible = True
      return
    self.history_panel.items = [dict(r, lang=self.lang) for r in rows]
    self.history_empty.text = t(self.lang, "history_empty")
    self.history_empty.visible = not rows
