import anvil.server
from anvil import *

from ._anvil_designer import XrayFormTemplate

NOTICE = ("Screening support only, not a diagnosis: every result must be confirmed "
          "by a qualified clinician.")
NAMES = {"normal": "Normal", "pneumonia": "Pneumonia", "covid19": "COVID-19"}


class XrayForm(XrayFormTemplate):
  def __init__(self, **properties):
    self.init_components(**properties)
    self.notice_label.text = NOTICE

  def file_loader_change(self, file, **event_args):
    """Send the upload to the model server (uplink) and show the result."""
    if file is None:
      return
    self.xray_image.source = file
    self.heatmap_check.visible = False
    self.heatmap_check.checked = False
    self.heatmap_image.visible = False
    self.xray_image.visible = True
    self.result_label.text = "Analyzing..."
    self.probabilities_label.text = ""
    try:
      res = anvil.server.call("classify_xray", file)
    except Exception as exc:
      # no uplink connected, or it dropped mid-request
      self.result_label.text = "Model unavailable"
      self.probabilities_label.text = "Start the model server (python -m uplink_server connect --anvil-key ...) and try again. " + str(exc)
      return
    if res["refused"]:
      self.result_label.text = "Not analyzed"
      self.probabilities_label.text = res["refusal"]["message"]
      return
    label = NAMES.get(res["label"], res["label"])
    if res["uncertain"]:
      label += " (uncertain: review carefully)"
    self.result_label.text = label
    self.probabilities_label.text = "   ".join(
      "%s %.1f%%" % (NAMES.get(k, k), 100 * v) for k, v in res["probabilities"].items())
    if res.get("heatmap") is not None:
      self.heatmap_image.source = res["heatmap"]
      self.heatmap_check.visible = True
    self.notice_label.text = res.get("notice") or NOTICE

  def heatmap_check_change(self, **event_args):
    self.heatmap_image.visible = self.heatmap_check.checked
    self.xray_image.visible = not self.heatmap_check.checked
