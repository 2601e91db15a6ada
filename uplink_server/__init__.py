"""Model server for chest X-ray screening.

The serving path needs only numpy, pillow and onnxruntime (pydicom for DICOM).
Nothing here imports torch: training code imports *this* package's
preprocessing so that both sides compute identical tensors.
"""

__version__ = "0.1.0"

NOTICE = (
    "Screening support only, not a diagnosis: every result must be confirmed "
    "by a qualified clinician."
)
NOTICE_ES = (
    "Solo apoyo al tamizaje, no es un diagnóstico: todo resultado debe ser confirmado "
    "por un profesional clínico calificado."
)
