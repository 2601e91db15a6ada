"""Every string the Anvil app shows, in English and Spanish (the language switch picks one)."""

LANGUAGES = [("English", "en"), ("Español", "es")]

STRINGS = {
  "title": {"en": "Chest X-ray screening", "es": "Tamizaje de radiografías de tórax"},
  "notice": {
    "en": "Screening support only, not a diagnosis: every result must be confirmed by a qualified clinician.",
    "es": "Solo apoyo al tamizaje, no es un diagnóstico: todo resultado debe ser confirmado por un profesional clínico calificado.",
  },
  "upload": {"en": "Upload chest X-rays (JPEG, PNG or DICOM)", "es": "Subir radiografías de tórax (JPEG, PNG o DICOM)"},
  "analyzing": {"en": "Analyzing {i} of {n}...", "es": "Analizando {i} de {n}..."},
  "done": {"en": "{n} analyzed", "es": "{n} analizadas"},
  "file": {"en": "File {i} of {n}", "es": "Archivo {i} de {n}"},
  "previous": {"en": "Previous", "es": "Anterior"},
  "next": {"en": "Next", "es": "Siguiente"},
  "not_analyzed": {"en": "Not analyzed", "es": "No analizada"},
  "uncertain": {"en": "Uncertain: {a} or {b}. Review carefully.", "es": "Incierto: {a} o {b}. Revise con cuidado."},
  "what_to_do": {"en": "What to do: {step}", "es": "Qué hacer: {step}"},
  "show_heatmap": {"en": "Show heatmap", "es": "Mostrar mapa de calor"},
  "heatmap_caption": {
    "en": "Red: regions that drove the result most. A heatmap is not a finding.",
    "es": "Rojo: regiones que más influyeron en el resultado. El mapa de calor no es un hallazgo.",
  },
  "model": {"en": "Model {version}", "es": "Modelo {version}"},
  "unavailable": {"en": "Model unavailable", "es": "Modelo no disponible"},
  "unavailable_help": {
    "en": "Start the model server (python -m uplink_server connect --anvil-key ...) and try again.",
    "es": "Inicie el servidor del modelo (python -m uplink_server connect --anvil-key ...) e intente de nuevo.",
  },
  "history": {"en": "History", "es": "Historial"},
  "history_empty": {"en": "No results yet.", "es": "Aún no hay resultados."},
  "history_unavailable": {"en": "History unavailable: {error}", "es": "Historial no disponible: {error}"},
  "language": {"en": "Language", "es": "Idioma"},
  "normal": {"en": "Normal", "es": "Normal"},
  "pneumonia": {"en": "Pneumonia", "es": "Neumonía"},
  "covid19": {"en": "COVID-19", "es": "COVID-19"},
  "tuberculosis": {"en": "Tuberculosis", "es": "Tuberculosis"},
  "needs_read": {"en": "Needs a doctor's read", "es": "Necesita la lectura de un médico"},
  "no_abnormality": {"en": "No abnormality found by the model", "es": "El modelo no encontró anomalías"},
  "triage_line": {"en": "{lead}. Finding: {finding}", "es": "{lead}. Hallazgo: {finding}"},
}


def t(lang, key, **kw):
  """The string ``key`` in ``lang`` (English when missing), with ``{fields}`` filled in."""
  entry = STRINGS[key]
  return (entry.get(lang) or entry["en"]).format(**kw)


def class_name(lang, label):
  """A class for people; an unknown class (a newer model's) is shown as it comes."""
  return t(lang, label) if label in STRINGS else label


def pct(p):
  """Never 100 % or 0 %: a model cannot know that."""
  if p > 0.99:
    return "> 99%"
  if p < 0.01:
    return "< 1%"
  return "%.0f%%" % (100 * p)
