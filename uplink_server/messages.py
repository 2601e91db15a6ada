"""What a refusal means and what to do next, in English and Spanish, keyed by refusal code.

The model server owns the refusal codes (:mod:`.errors`), so their translations live beside them: the web app
and the Anvil uplink both show these.
"""

from __future__ import annotations

LANGUAGES = ("en", "es")

REFUSAL_TEXT: dict[str, dict[str, str]] = {
    'empty_file': {"en": 'The file is empty.', "es": 'El archivo está vacío.'},
    'not_an_image': {"en": 'This file is not an image. Upload a JPEG, PNG or DICOM chest X-ray.', "es": 'Este archivo no es una imagen. Suba una radiografía de tórax en JPEG, PNG o DICOM.'},
    'corrupt_image': {"en": 'The image is damaged or incomplete. Export it again and retry.', "es": 'La imagen está dañada o incompleta. Expórtela de nuevo e intente otra vez.'},
    'file_too_large': {"en": 'The file is too large.', "es": 'El archivo es demasiado grande.'},
    'too_many_pixels': {"en": 'The image is too large in pixels.', "es": 'La imagen tiene demasiados píxeles.'},
    'image_too_small': {"en": 'The image is too small to analyze.', "es": 'La imagen es demasiado pequeña para analizarla.'},
    'unsupported_dicom': {"en": 'This DICOM file cannot be read (unsupported compression or no image).', "es": 'No se puede leer este archivo DICOM (compresión no soportada o sin imagen).'},
    'not_xray_modality': {"en": 'This DICOM is not a radiograph (for example CT or MR).', "es": 'Este DICOM no es una radiografía (por ejemplo TC o RM).'},
    'lateral_view': {"en": 'This is a lateral view. Upload the frontal (PA/AP) chest X-ray.', "es": 'Es una proyección lateral. Suba la radiografía de tórax frontal (PA/AP).'},
    'not_chest': {"en": 'The DICOM file is of another body part, not the chest.', "es": 'El archivo DICOM es de otra parte del cuerpo, no del tórax.'},
    'blank_image': {"en": 'The image is blank.', "es": 'La imagen está en blanco.'},
    'color_photo': {"en": 'This looks like a colour photo, not an X-ray.', "es": 'Parece una foto a color, no una radiografía.'},
    'not_chest_xray': {"en": 'This does not look like a frontal chest X-ray.', "es": 'Esto no parece una radiografía de tórax frontal.'},
    'model_unavailable': {"en": 'No model is available right now. The image is saved; analyze it again later.', "es": 'No hay ningún modelo disponible ahora. La imagen quedó guardada; analícela más tarde.'},
    'unsupported_format': {"en": 'This image type is not accepted. Upload a JPEG, PNG or DICOM chest X-ray.', "es": 'Este tipo de imagen no se acepta. Suba una radiografía de tórax en JPEG, PNG o DICOM.'},
    'invalid_dicom': {"en": 'The DICOM header is inconsistent (impossible image size, bit depth or missing colour table). Export the study again from the X-ray system.', "es": 'La cabecera DICOM es incoherente (tamaño, profundidad de bits o tabla de color imposibles). Exporte el estudio de nuevo desde el equipo de rayos X.'},
    'burned_in_annotation': {"en": 'This DICOM has patient data burned into the image, so it cannot be stored de-identified. Export it without annotations.', "es": 'Este DICOM tiene datos del paciente grabados en la imagen y no puede guardarse sin identificar. Expórtelo sin anotaciones.'},
    'deidentification_failed': {"en": 'The file could not be de-identified, so nothing of it was stored.', "es": 'No se pudo quitar la identificación del archivo; no se guardó nada de él.'},
    'queued': {"en": 'The image is queued for a model server. The result will appear on this case; reload in a moment.', "es": 'La imagen está en cola para un servidor de modelos. El resultado aparecerá en este caso; recargue en un momento.'},
    'busy': {"en": 'Every model is busy with other uploads right now. The image is saved and will be analysed automatically.', "es": 'Todos los modelos están ocupados con otras imágenes. La imagen quedó guardada y se analizará automáticamente.'},
    'interrupted': {"en": 'The analysis was interrupted by a restart. The image is saved and will be analysed again automatically.', "es": 'El análisis se interrumpió por un reinicio. La imagen quedó guardada y se analizará de nuevo automáticamente.'},
}

NEXT_STEP: dict[str, dict[str, str]] = {
    'empty_file': {"en": 'Export the image again and upload the new file.', "es": 'Exporte la imagen de nuevo y suba el archivo nuevo.'},
    'not_an_image': {"en": 'Upload the X-ray itself: a JPEG or PNG export, or the original DICOM from the X-ray system.', "es": 'Suba la radiografía misma: una exportación JPEG o PNG, o el DICOM original del equipo.'},
    'unsupported_format': {"en": 'Save it as JPEG or PNG, or upload the original DICOM.', "es": 'Guárdela como JPEG o PNG, o suba el DICOM original.'},
    'corrupt_image': {"en": 'Upload the original DICOM from the X-ray system, or export the image again.', "es": 'Suba el DICOM original del equipo de rayos X, o exporte la imagen de nuevo.'},
    'invalid_dicom': {"en": 'Export the study again from the X-ray system or PACS.', "es": 'Exporte el estudio de nuevo desde el equipo de rayos X o el PACS.'},
    'burned_in_annotation': {"en": 'Export the image without annotations (or a de-identified copy) and upload that.', "es": 'Exporte la imagen sin anotaciones (o una copia sin identificación) y súbala.'},
    'deidentification_failed': {"en": 'Export the study again from the X-ray system or PACS.', "es": 'Exporte el estudio de nuevo desde el equipo de rayos X o el PACS.'},
    'file_too_large': {"en": 'Upload a smaller export (JPEG or PNG) or a single DICOM image.', "es": 'Suba una exportación más pequeña (JPEG o PNG) o una sola imagen DICOM.'},
    'too_many_pixels': {"en": 'Upload a smaller export (JPEG or PNG) of the X-ray.', "es": 'Suba una exportación más pequeña (JPEG o PNG) de la radiografía.'},
    'image_too_small': {"en": 'Upload the full-size image or the original DICOM.', "es": 'Suba la imagen en tamaño completo o el DICOM original.'},
    'unsupported_dicom': {"en": 'Export it from the X-ray system uncompressed, or as JPEG/PNG.', "es": 'Expórtela del equipo sin compresión, o como JPEG/PNG.'},
    'not_xray_modality': {"en": 'Upload a chest radiograph (CR/DX), not a CT or MR image.', "es": 'Suba una radiografía de tórax (CR/DX), no una imagen de TC o RM.'},
    'lateral_view': {"en": 'Upload the frontal view (PA or AP) of the same study.', "es": 'Suba la proyección frontal (PA o AP) del mismo estudio.'},
    'not_chest': {"en": 'Send the frontal chest radiograph of the study.', "es": 'Envíe la radiografía frontal de tórax del estudio.'},
    'blank_image': {"en": 'Check the exposure and retake, or upload the original DICOM.', "es": 'Revise la exposición y repita la toma, o suba el DICOM original.'},
    'color_photo': {"en": 'Upload the X-ray file itself (the original DICOM is best), not a photo of a screen or film.', "es": 'Suba el archivo de la radiografía (mejor el DICOM original), no una foto de una pantalla o placa.'},
    'not_chest_xray': {"en": 'Check it is a frontal chest X-ray the right way up; rotate it or upload the original DICOM. If it is, retake the image.', "es": 'Compruebe que sea una radiografía de tórax frontal y derecha; gírela o suba el DICOM original. Si lo es, repita la toma.'},
    'model_unavailable': {"en": 'The image is kept: press Analyze again in a few minutes, or tell the administrator.', "es": 'La imagen quedó guardada: pulse Analizar de nuevo en unos minutos, o avise al administrador.'},
    'queued': {"en": 'Reload this page in a moment.', "es": 'Recargue esta página en un momento.'},
    'busy': {"en": 'Nothing to do: this page updates when the result is ready.', "es": 'No hace falta hacer nada: esta página se actualiza cuando el resultado esté listo.'},
    'interrupted': {"en": 'Nothing to do: this page updates when the result is ready.', "es": 'No hace falta hacer nada: esta página se actualiza cuando el resultado esté listo.'},
}


def refusal_text(code: str, lang: str = "en") -> str:
    entry = REFUSAL_TEXT.get(code)
    return (entry.get(lang) or entry["en"]) if entry else code


def next_step(code: str, lang: str = "en") -> str:
    entry = NEXT_STEP.get(code)
    return (entry.get(lang) or entry["en"]) if entry else ""
