"""Running the model server from a notebook (Colab, a rented GPU, Jupyter): the connection runs in the
background so that the notebook stays usable, and a status cell shows what it is doing.

    from uplink_server.notebook import BackgroundUplink
    server = BackgroundUplink(classifier).connect_web_app("https://clinic.example", "UPLINK_KEY")
    server.status()
"""

from __future__ import annotations

import asyncio
import threading
import time

from .model import Classifier


def accelerator(classifier: Classifier) -> str:
    """Where the model runs, in words: the ONNX Runtime provider, or TensorFlow's device for a Keras model."""
    backend = classifier.cascade.first if classifier.cascade is not None else classifier._backend  # ONNX sessions too
    sess = getattr(backend, "sess", None)
    if sess is not None:
        provider = sess.get_providers()[0]
        return {"CUDAExecutionProvider": "GPU (ONNX Runtime CUDA)", "ROCMExecutionProvider": "GPU (ONNX Runtime ROCm)",
                "CPUExecutionProvider": "CPU (ONNX Runtime)"}.get(provider, provider)
    try:
        import tensorflow as tf

        return "GPU (TensorFlow)" if tf.config.list_physical_devices("GPU") else "CPU (TensorFlow)"
    except ImportError:  # pragma: no cover - a Keras model without TensorFlow does not load at all
        return "CPU"


class BackgroundUplink:
    """One model server connection (to our web app, or to Anvil) on a thread of its own."""

    def __init__(self, classifier: Classifier, name: str | None = None):
        self.classifier = classifier
        self.name = name
        self.target = ""
        self.started = 0.0
        self.error: str | None = None
        self._client = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._anvil = False

    def connect_web_app(self, url: str, key: str, wait_s: float = 30.0, **client_kw) -> "BackgroundUplink":
        """Connect out to our web app (``--url --key``); returns once connected, or raises with the reason."""
        from .uplink import UplinkClient

        self._client = UplinkClient(url, key, self.classifier, name=self.name, **client_kw)
        self.target = url
        self._loop = asyncio.new_event_loop()

        def run():
            try:
                self._loop.run_until_complete(self._client.run_forever())
            except Exception as exc:  # a refused key ends the loop: say so in status()
                self.error = f"{type(exc).__name__}: {exc}"

        self._thread = threading.Thread(target=run, daemon=True, name="uplink")
        self.started = time.time()
        self._thread.start()
        deadline = time.time() + wait_s
        while time.time() < deadline and not self._client.connected.is_set() and self.error is None:
            time.sleep(0.05)
        if self.error:
            raise ConnectionError(f"could not connect to {url}: {self.error}")
        if not self._client.connected.is_set():
            raise ConnectionError(f"could not connect to {url} within {wait_s:.0f} s (it keeps retrying in the background)")
        return self

    def connect_anvil(self, key: str, url: str | None = None) -> "BackgroundUplink":
        """Register the uplink functions and connect to an Anvil app (anvil-uplink runs its own thread)."""
        from .anvil_uplink import connect

        connect(self.classifier, key, url)
        self._anvil = True
        self.target = url or "Anvil"
        self.started = time.time()
        return self

    @property
    def connected(self) -> bool:
        if self._anvil:
            return True
        return bool(self._client and self._client.connected.is_set())

    def status(self) -> dict:
        return {
            "target": self.target,
            "connected": self.connected,
            "model": f"{self.classifier.name} {self.classifier.version}",
            "runs_on": accelerator(self.classifier),
            "served": getattr(self._client, "served", None),
            "up_s": round(time.time() - self.started, 1) if self.started else 0.0,
            "error": self.error,
        }

    def describe(self) -> str:
        s = self.status()
        if not s["target"]:
            return f"not connected: {s['model']} on {s['runs_on']}, ready to connect"
        state = "connected" if s["connected"] else ("stopped: " + s["error"] if s["error"] else "reconnecting")
        served = "" if s["served"] is None else f", {s['served']} served"
        return f"{state} to {s['target']}: {s['model']} on {s['runs_on']}{served}, up {s['up_s']:.0f} s"

    def stop(self) -> None:
        if self._client is not None:
            self._client.stop()
            loop = self._loop
            if loop is not None and loop.is_running():
                for task in asyncio.all_tasks(loop):
                    loop.call_soon_threadsafe(task.cancel)
            if self._thread is not None:
                self._thread.join(10)
        if self._anvil:
            import anvil.server

            anvil.server.disconnect()
