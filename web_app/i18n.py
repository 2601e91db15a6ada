"""English and Spanish strings; language from the session, else the browser."""

from __future__ import annotations

from uplink_server.messages import LANGUAGES, NEXT_STEP, REFUSAL_TEXT

STRINGS: dict[str, dict[str, str]] = {
    "app_title": {"en": "Chest X-ray screening", "es": "Tamizaje de radiografías de tórax"},
    "notice": {
        "en": "Screening support only, not a diagnosis. Every result must be confirmed by a qualified clinician.",
        "es": "Solo apoyo al tamizaje, no es un diagnóstico. Todo resultado debe ser confirmado por un profesional clínico calificado.",
    },
    "sign_in": {"en": "Sign in", "es": "Iniciar sesión"},
    "sign_out": {"en": "Sign out", "es": "Salir"},
    "email": {"en": "Email", "es": "Correo electrónico"},
    "password": {"en": "Password", "es": "Contraseña"},
    "bad_login": {"en": "Wrong email or password.", "es": "Correo o contraseña incorrectos."},
    "upload": {"en": "New X-ray", "es": "Nueva radiografía"},
    "upload_help": {
        "en": "Chest X-ray as JPEG, PNG or DICOM; several files or a ZIP are fine.",
        "es": "Radiografía de tórax en JPEG, PNG o DICOM; se admiten varios archivos o un ZIP.",
    },
    "choose_files": {"en": "Choose files", "es": "Elegir archivos"},
    "take_photo": {"en": "Use camera", "es": "Usar la cámara"},
    "patient_code": {"en": "Patient code", "es": "Código del paciente"},
    "patient_code_help": {"en": "No names: a code your clinic can trace.", "es": "Sin nombres: un código que su centro pueda rastrear."},
    "analyze": {"en": "Analyze", "es": "Analizar"},
    "result": {"en": "Result", "es": "Resultado"},
    "results": {"en": "Results", "es": "Resultados"},
    "probability": {"en": "Probability", "es": "Probabilidad"},
    "heatmap": {"en": "Heatmap", "es": "Mapa de calor"},
    "show_heatmap": {"en": "Show heatmap", "es": "Mostrar mapa de calor"},
    "uncertain": {"en": "Uncertain: the model is not confident. Review carefully.", "es": "Incierto: el modelo no tiene suficiente confianza. Revise con cuidado."},
    "refused": {"en": "Not analyzed", "es": "No analizada"},
    "pending": {"en": "Waiting for a model", "es": "Esperando un modelo"},
    "retry": {"en": "Analyze again", "es": "Analizar de nuevo"},
    "history": {"en": "History", "es": "Historial"},
    "worklist": {"en": "Worklist", "es": "Lista de trabajo"},
    "worklist_help": {"en": "Highest risk first: read these studies first.", "es": "Mayor riesgo primero: lea estos estudios primero."},
    "search": {"en": "Search", "es": "Buscar"},
    "date_from": {"en": "From", "es": "Desde"},
    "date_to": {"en": "To", "es": "Hasta"},
    "date": {"en": "Date", "es": "Fecha"},
    "risk": {"en": "Risk", "es": "Riesgo"},
    "status": {"en": "Status", "es": "Estado"},
    "export_csv": {"en": "Export CSV", "es": "Exportar CSV"},
    "report": {"en": "Printable report", "es": "Informe imprimible"},
    "print": {"en": "Print", "es": "Imprimir"},
    "model": {"en": "Model", "es": "Modelo"},
    "by": {"en": "By", "es": "Por"},
    "no_cases": {"en": "No cases yet.", "es": "Aún no hay casos."},
    "admin": {"en": "Admin", "es": "Administración"},
    "users": {"en": "Users", "es": "Usuarios"},
    "role": {"en": "Role", "es": "Rol"},
    "name": {"en": "Name", "es": "Nombre"},
    "add_user": {"en": "Add user", "es": "Agregar usuario"},
    "api_tokens": {"en": "API tokens", "es": "Tokens de API"},
    "new_token": {"en": "New token", "es": "Nuevo token"},
    "token_once": {"en": "Copy this token now; it will not be shown again:", "es": "Copie este token ahora; no se volverá a mostrar:"},
    "model_servers": {"en": "Model servers", "es": "Servidores de modelos"},
    "uplink_key": {"en": "Uplink key", "es": "Clave de enlace"},
    "connect_help": {"en": "Connect a model server from another machine with:", "es": "Conecte un servidor de modelos desde otra máquina con:"},
    "local_model": {"en": "In-process model", "es": "Modelo local"},
    "none_connected": {"en": "No model server connected.", "es": "Ningún servidor de modelos conectado."},
    "language": {"en": "Español", "es": "English"},
    "normal": {"en": "Normal", "es": "Normal"},
    "pneumonia": {"en": "Pneumonia", "es": "Neumonía"},
    "covid19": {"en": "COVID-19", "es": "COVID-19"},
    "tuberculosis": {"en": "Tuberculosis", "es": "Tuberculosis"},
    "needs_read": {"en": "Needs a doctor's read", "es": "Necesita la lectura de un médico"},
    "no_abnormality": {"en": "No abnormality found by the model", "es": "El modelo no encontró anomalías"},
    "needs_read_short": {"en": "Needs read", "es": "Leer"},
    "no_abnormality_short": {"en": "No finding", "es": "Sin hallazgo"},
    "finding": {"en": "Finding", "es": "Hallazgo"},
    "triage_from_card": {"en": "Probability of any abnormality {score}; films at or above {threshold} need a read (the model card's threshold, chosen on validation films for at least 95 % sensitivity).",
                         "es": "Probabilidad de cualquier anomalía {score}; las placas desde {threshold} necesitan lectura (umbral de la ficha del modelo, elegido en placas de validación para una sensibilidad de al menos 95 %)."},
    "triage_from_class": {"en": "From the most probable class: this model has no triage threshold.",
                          "es": "Según la clase más probable: este modelo no tiene umbral de triaje."},
    "no_file": {"en": "Choose at least one file.", "es": "Elija al menos un archivo."},
    "forbidden": {"en": "You do not have access to this page.", "es": "No tiene acceso a esta página."},
    "not_found": {"en": "Not found.", "es": "No encontrado."},
    "csrf": {"en": "Your session expired; please try again.", "es": "Su sesión expiró; intente de nuevo."},
    "image": {"en": "Image", "es": "Imagen"},
    "case": {"en": "Case", "es": "Caso"},
    "too_many_logins": {"en": "Too many failed sign-ins. Wait {seconds} s and try again.",
                        "es": "Demasiados intentos fallidos. Espere {seconds} s e intente de nuevo."},
    "login_wait": {"en": "Wait {seconds} s before the next try.", "es": "Espere {seconds} s antes del próximo intento."},
    "created": {"en": "Created", "es": "Creado"},
    "expires": {"en": "Expires", "es": "Vence"},
    "never": {"en": "never", "es": "nunca"},
    "last_used": {"en": "Last used", "es": "Último uso"},
    "valid_for": {"en": "Valid for", "es": "Válido por"},
    "days": {"en": "days", "es": "días"},
    "revoke": {"en": "Revoke", "es": "Revocar"},
    "token_active": {"en": "active", "es": "activo"},
    "token_expired": {"en": "expired", "es": "vencido"},
    "token_revoked": {"en": "revoked", "es": "revocado"},
    "broker": {"en": "Broker", "es": "Intermediario de mensajes"},
    "node": {"en": "node", "es": "nodo"},
    "queue_depth": {"en": "jobs waiting", "es": "trabajos en espera"},
    "consumers": {"en": "model servers consuming", "es": "servidores de modelos consumiendo"},
    "health": {"en": "Health", "es": "Estado"},
    "health_ok": {"en": "ok", "es": "bien"},
    "health_slow": {"en": "slow (paused)", "es": "lento (en pausa)"},
    "health_gone": {"en": "gone", "es": "desconectado"},
    "last_seen": {"en": "Last seen", "es": "Visto hace"},
    "served": {"en": "served", "es": "atendidas"},
    "in_flight": {"en": "In progress", "es": "En curso"},
    "batches": {"en": "batches", "es": "lotes"},
    "mean_batch": {"en": "mean batch", "es": "lote medio"},
    "audit_log": {"en": "Audit log", "es": "Registro de auditoría"},
    "action": {"en": "Action", "es": "Acción"},
    "all": {"en": "All", "es": "Todas"},
    "user": {"en": "User", "es": "Usuario"},
    "address": {"en": "Address", "es": "Dirección"},
    "detail": {"en": "Detail", "es": "Detalle"},
    "audit_login": {"en": "sign-in", "es": "inicio de sesión"},
    "audit_login_failed": {"en": "failed sign-in", "es": "inicio de sesión fallido"},
    "audit_login_throttled": {"en": "sign-in refused (too many failures)", "es": "inicio de sesión bloqueado (demasiados fallos)"},
    "audit_logout": {"en": "sign-out", "es": "cierre de sesión"},
    "audit_token_created": {"en": "API token created", "es": "token de API creado"},
    "audit_token_revoked": {"en": "API token revoked", "es": "token de API revocado"},
    "audit_token_rejected": {"en": "API token refused", "es": "token de API rechazado"},
    "audit_upload": {"en": "upload", "es": "carga"},
    "audit_classify": {"en": "analysis", "es": "análisis"},
    "audit_case_view": {"en": "case viewed", "es": "caso consultado"},
    "audit_export": {"en": "export", "es": "exportación"},
    "audit_audit_export": {"en": "audit log exported", "es": "registro de auditoría exportado"},
    "audit_user_added": {"en": "user added", "es": "usuario agregado"},
    "audit_user_updated": {"en": "user changed", "es": "usuario modificado"},
    "nav_upload": {"en": "New X-ray", "es": "Nueva"},
    "nav_worklist": {"en": "Worklist", "es": "Lista"},
    "nav_admin": {"en": "Admin", "es": "Admin."},
    "uncertain_between": {"en": "Uncertain: {a} or {b}", "es": "Incierto: {a} o {b}"},
    "uncertain_help": {"en": "The model cannot tell these apart on this image (the top two are {gap} points apart). A clinician must read it.",
                       "es": "El modelo no logra distinguirlos en esta imagen (los dos primeros difieren en {gap} puntos). Debe leerla un profesional."},
    "most_likely": {"en": "Most likely", "es": "Lo más probable"},
    "uncertain_short": {"en": "uncertain", "es": "incierto"},
    "next_step": {"en": "What to do", "es": "Qué hacer"},
    "next_xray": {"en": "Next X-ray", "es": "Siguiente radiografía"},
    "analyzing": {"en": "Analyzing…", "es": "Analizando…"},
    "no_code_warning": {"en": "No patient code: without it this study cannot be traced to the patient. Type a code, or press Analyze again to continue without one.",
                        "es": "Sin código de paciente: sin él no se puede relacionar este estudio con el paciente. Escriba un código, o pulse Analizar otra vez para seguir sin él."},
    "code_per_file": {"en": "Patient code of each file (the file names are not stored):", "es": "Código del paciente de cada archivo (los nombres de archivo no se guardan):"},
    "no_code_given": {"en": "No patient code was given for this study.", "es": "No se indicó código de paciente para este estudio."},
    "batch_summary": {"en": "{done} analysed, {refused} refused, {pending} waiting", "es": "{done} analizadas, {refused} rechazadas, {pending} en espera"},
    "heatmap_caption": {"en": "Heatmap: the regions that most drove the result (Grad-CAM). It shows where the model looked, not where disease is.",
                        "es": "Mapa de calor: las regiones que más influyeron en el resultado (Grad-CAM). Muestra dónde miró el modelo, no dónde está la enfermedad."},
    "legend_low": {"en": "less influence", "es": "menos influencia"},
    "legend_high": {"en": "more influence", "es": "más influencia"},
    "clinic": {"en": "Clinic", "es": "Centro de salud"},
    "reviewed_by": {"en": "Reviewed by (name, signature, date)", "es": "Revisado por (nombre, firma, fecha)"},
    "not_reviewed": {"en": "Not yet reviewed by a clinician.", "es": "Aún no revisado por un profesional."},
    "uncertainty": {"en": "Uncertainty", "es": "Incertidumbre"},
    "confident": {"en": "The model's two most likely classes are {gap} points apart.", "es": "Las dos clases más probables del modelo difieren en {gap} puntos."},
    "role_admin": {"en": "Administrator", "es": "Administrador"},
    "role_doctor": {"en": "Doctor", "es": "Médico"},
    "role_technician": {"en": "Technician", "es": "Tecnólogo"},
    "user_added": {"en": "User {email} added as {role}.", "es": "Usuario {email} agregado como {role}."},
    "user_updated": {"en": "User {email} updated.", "es": "Usuario {email} actualizado."},
    "sessions_ended": {"en": "The new password ends their sign-ins elsewhere ({sessions}) and their API tokens ({tokens}).",
                       "es": "La nueva contraseña cierra sus sesiones en otros lugares ({sessions}) y sus tokens de API ({tokens})."},
    "active": {"en": "Active", "es": "Activo"},
    "deactivate": {"en": "Deactivate", "es": "Desactivar"},
    "reactivate": {"en": "Reactivate", "es": "Reactivar"},
    "new_password": {"en": "New password", "es": "Nueva contraseña"},
    "reset_password": {"en": "Set password", "es": "Cambiar contraseña"},
    "inactive": {"en": "inactive", "es": "inactivo"},
    "n_unsupported_type": {"en": "Upload JPEG, PNG or DICOM files, or a ZIP of them.", "es": "Suba archivos JPEG, PNG o DICOM, o un ZIP con ellos."},
    "n_patient_code_too_long": {"en": "Use the clinic's short patient code (64 characters at most), never a name.",
                                "es": "Use el código corto de paciente de la clínica (64 caracteres como máximo), nunca un nombre."},
    "n_zip_error": {"en": "Make the ZIP again, or upload the files one by one.", "es": "Haga el ZIP de nuevo, o suba los archivos uno por uno."},
    "n_zip_bomb": {"en": "Upload the X-ray files themselves, or a ZIP of them.", "es": "Suba las radiografías mismas, o un ZIP con ellas."},
    "rotate": {"en": "Rotate 90° and analyze again", "es": "Girar 90° y analizar de nuevo"},
    # doctor review and site performance
    "doctor_review": {"en": "Doctor's reading", "es": "Lectura del médico"},
    "not_reviewed": {"en": "Not reviewed by a doctor", "es": "No revisado por un médico"},
    "ai_only": {"en": "AI result only", "es": "solo el resultado de la IA"},
    "unreviewed": {"en": "Unreviewed", "es": "Sin revisar"},
    "other": {"en": "Other finding", "es": "Otro hallazgo"},
    "not_assessable": {"en": "Not assessable", "es": "No evaluable"},
    "your_reading": {"en": "Your reading", "es": "Su lectura"},
    "ai_result": {"en": "AI result", "es": "Resultado de la IA"},
    "agree": {"en": "I agree with the AI", "es": "Estoy de acuerdo con la IA"},
    "disagree": {"en": "I disagree with the AI", "es": "No estoy de acuerdo con la IA"},
    "agrees_ai": {"en": "agrees with the AI", "es": "de acuerdo con la IA"},
    "disagrees_ai": {"en": "disagrees with the AI", "es": "en desacuerdo con la IA"},
    "disagrees_short": {"en": "disagrees", "es": "desacuerdo"},
    "note": {"en": "Note", "es": "Nota"},
    "save_review": {"en": "Save reading", "es": "Guardar lectura"},
    "earlier_readings": {"en": "Earlier readings", "es": "Lecturas anteriores"},
    "filter_all": {"en": "All", "es": "Todos"},
    "filter_unreviewed": {"en": "Unreviewed", "es": "Sin revisar"},
    "filter_disagreements": {"en": "Disagreements", "es": "Desacuerdos"},
    "filter_refused": {"en": "Refused", "es": "Rechazados"},
    "nav_performance": {"en": "Performance", "es": "Desempeño"},
    "performance": {"en": "Performance at this site", "es": "Desempeño en este centro"},
    "performance_help": {"en": "The AI's results against the doctors' readings (the newest reading of each case), per model version.",
                         "es": "Los resultados de la IA frente a las lecturas de los médicos (la más reciente de cada caso), por versión del modelo."},
    "performance_warning": {"en": "Warning: {measure} for {cls} here is {site} (95% CI {lo}-{hi}), below the model card's {card}. Do not rely on this result without a doctor's reading.",
                            "es": "Atención: la {measure} para {cls} aquí es {site} (IC 95% {lo}-{hi}), por debajo de la ficha del modelo ({card}). No confíe en este resultado sin la lectura de un médico."},
    "perf_counts": {"en": "{cases} studies, {analysed} analysed, {reviewed} reviewed, {compared} compared",
                    "es": "{cases} estudios, {analysed} analizados, {reviewed} revisados, {compared} comparados"},
    "perf_none_reviewed": {"en": "No reviewed studies yet: review cases to see how the model does here.",
                           "es": "Aún no hay estudios revisados: revise casos para ver cómo funciona el modelo aquí."},
    "agreement": {"en": "Agreement", "es": "Concordancia"},
    "confusion_caption": {"en": "Rows: the doctor's reading; columns: the AI's result", "es": "Filas: lectura del médico; columnas: resultado de la IA"},
    "sensitivity": {"en": "Sensitivity", "es": "Sensibilidad"},
    "specificity": {"en": "Specificity", "es": "Especificidad"},
    "card_values": {"en": "Model card (sens. / spec.)", "es": "Ficha del modelo (sens. / espec.)"},
    "site_export": {"en": "Reviewed cases for training (ZIP)", "es": "Casos revisados para entrenamiento (ZIP)"},
    "site_export_help": {"en": "De-identified images and a manifest labelled with the doctors' readings, for model_training.",
                         "es": "Imágenes sin identificación y un manifiesto con las lecturas de los médicos, para model_training."},
    "audit_recalibrate": {"en": "site calibration changed", "es": "calibración del centro cambiada"},
    "reliability": {"en": "Reliability: how often the AI's class was the doctor's, by the probability shown", "es": "Fiabilidad: con qué frecuencia la clase de la IA fue la del médico, según la probabilidad mostrada"},
    "perfect_calibration": {"en": "perfectly calibrated", "es": "calibración perfecta"},
    "agreement_by_confidence": {"en": "agreement with the doctor", "es": "concordancia con el médico"},
    "confidence_shown": {"en": "probability shown", "es": "probabilidad mostrada"},
    "agreement_with_doctor": {"en": "share the doctor agreed", "es": "proporción de acuerdo del médico"},
    "drift": {"en": "Drift against the model card's validation data", "es": "Deriva frente a los datos de validación de la ficha del modelo"},
    "drift_risk": {"en": "risk score", "es": "puntaje de riesgo"},
    "drift_image_mean": {"en": "image brightness", "es": "brillo de la imagen"},
    "drift_image_std": {"en": "image contrast", "es": "contraste de la imagen"},
    "drift_warning": {"en": "Large drift in the {stat}: this site's images or patients differ from the model's validation data; check its numbers here before relying on it.",
                      "es": "Deriva grande en el {stat}: las imágenes o pacientes de este centro difieren de los datos de validación del modelo; revise sus números aquí antes de confiar en él."},
    "drift_unavailable": {"en": "No drift check: the model card has no reference data (python -m model_training reference).", "es": "Sin control de deriva: la ficha del modelo no tiene datos de referencia (python -m model_training reference)."},
    "model_card": {"en": "model card", "es": "ficha del modelo"},
    "this_site": {"en": "this site", "es": "este centro"},
    "performance_warning_short": {"en": "Warning: {measure} for {cls} is below the model card's.", "es": "Atención: la {measure} para {cls} está por debajo de la ficha del modelo."},
    "recalibration": {"en": "Local recalibration", "es": "Recalibración local"},
    "recal_help": {"en": "Fits the temperature and the uncertainty margin on half of the reviewed cases and checks them on the other half. Needs {n} reviewed cases of each class the doctors read (at least two classes). The ranking of classes never changes.",
                   "es": "Ajusta la temperatura y el margen de incertidumbre con la mitad de los casos revisados y los comprueba con la otra mitad. Necesita {n} casos revisados de cada clase leída por los médicos (al menos dos clases). El orden de las clases nunca cambia."},
    "recal_before": {"en": "Now", "es": "Ahora"},
    "recal_after": {"en": "Recalibrated", "es": "Recalibrado"},
    "recal_log_loss": {"en": "Log loss (held-out half)", "es": "Pérdida logarítmica (mitad de control)"},
    "recal_ece": {"en": "Calibration error (ECE)", "es": "Error de calibración (ECE)"},
    "recal_share_uncertain": {"en": "Share flagged uncertain", "es": "Proporción marcada incierta"},
    "recal_error_not_flagged": {"en": "Errors among results not flagged", "es": "Errores entre resultados no marcados"},
    "recal_fitted": {"en": "Temperature {t}, margin {m}; fitted on {fit} cases, checked on {check}.", "es": "Temperatura {t}, margen {m}; ajustado con {fit} casos, comprobado con {check}."},
    "recal_preview": {"en": "Preview", "es": "Vista previa"},
    "recal_apply": {"en": "Apply as a new version", "es": "Aplicar como nueva versión"},
    "recal_rollback": {"en": "Roll back", "es": "Revertir"},
    "recal_none": {"en": "No site calibration yet: the model card's is used.", "es": "Aún no hay calibración del centro: se usa la de la ficha del modelo."},
    "rolled_back": {"en": "rolled back", "es": "revertida"},
    "in_use": {"en": "in use", "es": "en uso"},
    "version": {"en": "Version", "es": "Versión"},
    "margin": {"en": "Margin", "es": "Margen"},
    "cal_too_few": {"en": "Too few reviewed cases for a recalibration: review more (see the counts above).", "es": "Muy pocos casos revisados para recalibrar: revise más (vea los conteos arriba)."},
    "cal_no_gain": {"en": "The check on the held-out half gets worse: the current calibration stays.", "es": "La comprobación con la mitad de control empeora: se mantiene la calibración actual."},
    "cal_nothing_to_undo": {"en": "No site calibration is in use for this model.", "es": "No hay calibración del centro en uso para este modelo."},
    "site_settings": {"en": "Site settings", "es": "Ajustes del centro"},
    "technicians_review": {"en": "Technicians may review cases and see the site's performance", "es": "Los técnicos pueden revisar casos y ver el desempeño del centro"},
    "save": {"en": "Save", "es": "Guardar"},
    "audit_review": {"en": "case reviewed", "es": "caso revisado"},
    "audit_performance_view": {"en": "performance viewed", "es": "desempeño consultado"},
    "audit_site_setting": {"en": "site setting changed", "es": "ajuste del centro cambiado"},
    "rv_forbidden": {"en": "Your role may not review cases (an admin can allow technicians).", "es": "Su rol no puede revisar casos (un administrador puede permitirlo a los técnicos)."},
    "rv_unknown_reading": {"en": "Choose a reading from the list.", "es": "Elija una lectura de la lista."},
    "rv_no_result": {"en": "This study has no AI result to review (refused or pending): arrange a retake or analyze it again first.",
                     "es": "Este estudio no tiene resultado de IA que revisar (rechazado o pendiente): repita la toma o analícelo de nuevo primero."},
    "rv_note_too_long": {"en": "The note is too long (1000 characters at most).", "es": "La nota es demasiado larga (1000 caracteres como máximo)."},
    # refusals of the web app itself (the model server's are in uplink_server.messages)
    "r_unsupported_type": {"en": "Unsupported file type.", "es": "Tipo de archivo no soportado."},
    "r_patient_code_too_long": {"en": "The patient code is longer than 64 characters.",
                                "es": "El código de paciente tiene más de 64 caracteres."},
    "r_zip_error": {"en": "The ZIP file could not be read.", "es": "No se pudo leer el archivo ZIP."},
    "r_zip_bomb": {"en": "The ZIP unpacks to far more than X-ray images would: refused before unpacking.",
                   "es": "El ZIP se descomprime en mucho más de lo que ocuparían radiografías: rechazado antes de descomprimirlo."},
}


# The model server's refusals, what each means and what to do next: r_<code> and n_<code>
STRINGS.update({f"r_{code}": text for code, text in REFUSAL_TEXT.items()})
STRINGS.update({f"n_{code}": text for code, text in NEXT_STEP.items()})


def negotiate(accept_language: str | None) -> str:
    """Pick en/es from an Accept-Language header (q-values honoured)."""
    best, best_q = "en", -1.0
    for part in (accept_language or "").split(","):
        bits = part.strip().split(";")
        tag = bits[0].strip().lower()[:2]
        q = 1.0
        for b in bits[1:]:
            if b.strip().startswith("q="):
                try:
                    q = float(b.strip()[2:])
                except ValueError:
                    q = 0.0
        if tag in LANGUAGES and q > best_q:
            best, best_q = tag, q
    return best


def translate(key: str, lang: str) -> str:
    entry = STRINGS.get(key)
    if entry is None:
        return key
    return entry.get(lang) or entry["en"]


def refusal_text(code: str | None, lang: str, fallback: str | None = None) -> str:
    if code and f"r_{code}" in STRINGS:
        return translate(f"r_{code}", lang)
    return fallback or code or ""


def next_step(code: str | None, lang: str) -> str:
    """What the user should do about a refusal (empty when there is nothing to add)."""
    return translate(f"n_{code}", lang) if code and f"n_{code}" in STRINGS else ""


def pct(p: float | None) -> str:
    """A probability for people: never 100 % or 0 %, which a model cannot know."""
    if p is None:
        return "—"
    if p > 0.99:
        return "> 99%"
    if p < 0.01:
        return "< 1%"
    return f"{p * 100:.0f}%"
