"""Settings from the environment, with secrets generated once into the data folder."""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Settings:
    data_dir: Path
    database_url: str
    secret_key: str
    uplink_key: str
    deid_key: str = ""  # keys the UID replacement of de-identification (consistent per site)
    admin_email: str = "admin@localhost"
    admin_password: str | None = None
    local_model: bool = True
    model_path: str | None = None
    max_upload_mb: int = 64
    max_zip_files: int = 200
    max_zip_total_mb: int = 1024  # everything one ZIP may unpack to
    uplink_timeout_s: float = 60.0
    secure_cookies: bool = False
    max_batch: int = 16  # dynamic batching of the in-process model
    broker_url: str | None = None  # amqp://... : model servers behind RabbitMQ
    broker_prefix: str = "cxr"  # queue and exchange names, so several installs can share a broker
    node_name: str = ""
    clinic_name: str = ""  # printed on reports  # this web node's name: its result queue; stable across restarts
    batch_delay_ms: float = 5.0
    model_threads: int = 0  # the in-process model's ONNX Runtime threads; 0: one per physical core
    model_runs: int = 0  # batches in the in-process model at once; 0: two, one when model_threads is 1
    max_queue: int = 48  # uploads waiting for a model at once; beyond: pending case + 503 Retry-After
    queue_wait_s: float = 20.0  # longest wait for the in-process model before the same
    resume_interval_s: float = 5.0  # how often pending cases are tried again when a model is free
    # the DICOM node (web_app.dicom_node): off unless a port is set
    dicom_port: int = 0
    dicom_ae_title: str = "CXRSCREEN"
    dicom_allowed: str = ""  # calling AE titles allowed to send, "AET" or "AET@host", comma-separated
    dicom_destination: str = ""  # where results go: "AET@host:port" (the PACS)
    dicom_send_attempts: int = 5
    dicom_retry_s: float = 2.0  # first wait between sends; doubles each try
    trusted_proxies: str = ""  # comma-separated addresses whose X-Forwarded-For is believed (none by default)

    @property
    def upload_dir(self) -> Path:
        return self.data_dir / "uploads"

    @classmethod
    def from_env(cls, data_dir: str | Path | None = None, **over) -> "Settings":
        data = Path(data_dir or os.environ.get("CXR_DATA_DIR", "web_app_data")).resolve()
        data.mkdir(parents=True, exist_ok=True)
        (data / "uploads").mkdir(exist_ok=True)
        secrets_file = data / "secrets.json"
        stored = json.loads(secrets_file.read_text()) if secrets_file.exists() else {}
        changed = False
        for key in ("secret_key", "uplink_key", "deid_key"):
            if key not in stored:
                stored[key] = secrets.token_urlsafe(32)
                changed = True
        if changed:
            secrets_file.write_text(json.dumps(stored))
            secrets_file.chmod(0o600)
        s = cls(
            data_dir=data,
            database_url=os.environ.get("CXR_DATABASE_URL") or f"sqlite:///{data / 'app.db'}",
            secret_key=os.environ.get("CXR_SECRET_KEY") or stored["secret_key"],
            uplink_key=os.environ.get("CXR_UPLINK_KEY") or stored["uplink_key"],
            deid_key=stored["deid_key"],
            admin_email=os.environ.get("CXR_ADMIN_EMAIL", "admin@localhost"),
            admin_password=os.environ.get("CXR_ADMIN_PASSWORD") or None,
            local_model=os.environ.get("CXR_LOCAL_MODEL", "1") not in ("0", "false", "no"),
            model_path=os.environ.get("CXR_MODEL") or None,
            secure_cookies=os.environ.get("CXR_SECURE_COOKIES", "0") in ("1", "true", "yes"),
            max_batch=int(os.environ.get("CXR_MAX_BATCH", "16")),
            max_zip_total_mb=int(os.environ.get("CXR_MAX_ZIP_TOTAL_MB", "1024")),
            broker_url=os.environ.get("CXR_BROKER_URL") or None,
            broker_prefix=os.environ.get("CXR_BROKER_PREFIX", "cxr"),
            node_name=os.environ.get("CXR_NODE") or socket.gethostname(),
            clinic_name=os.environ.get("CXR_CLINIC_NAME", ""),
            batch_delay_ms=float(os.environ.get("CXR_BATCH_DELAY_MS", "5")),
            model_threads=int(os.environ.get("CXR_MODEL_THREADS", "0")),
            model_runs=int(os.environ.get("CXR_MODEL_RUNS", "0")),
            trusted_proxies=os.environ.get("CXR_TRUSTED_PROXIES", ""),
            dicom_port=int(os.environ.get("CXR_DICOM_PORT", "0")),
            dicom_ae_title=os.environ.get("CXR_DICOM_AE_TITLE", "CXRSCREEN"),
            dicom_allowed=os.environ.get("CXR_DICOM_ALLOWED", ""),
            dicom_destination=os.environ.get("CXR_DICOM_DESTINATION", ""),
            dicom_send_attempts=int(os.environ.get("CXR_DICOM_SEND_ATTEMPTS", "5")),
            dicom_retry_s=float(os.environ.get("CXR_DICOM_RETRY_S", "2")),
            max_queue=int(os.environ.get("CXR_MAX_QUEUE", "48")),
            queue_wait_s=float(os.environ.get("CXR_QUEUE_WAIT_S", "20")),
            resume_interval_s=float(os.environ.get("CXR_RESUME_INTERVAL_S", "5")),
        )
        for k, v in over.items():
            setattr(s, k, v)
        return s
