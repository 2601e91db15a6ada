"""The uplink functions for an Anvil app, through the real ``anvil-uplink`` library.

The Anvil app (``anvil_app/``) calls ``anvil.server.call('classify_xray', media, lang=...)`` and
``model_info``; its own server module keeps the history in Data Tables.
"""

from __future__ import annotations

import base64

from .messages import LANGUAGES, next_step, refusal_text
from .model import Classifier


def make_functions(classifier: Classifier):
    """The callables, separate from registration so they can be tested locally."""
    import anvil

    def classify_xray(media, heatmap: bool = True, lang: str = "en") -> dict:
        """Classify an Anvil Media object; returns label, probabilities, the uncertainty flag, the refusal
        (reason and next step in ``lang``), the model version and the heatmap as media."""
        lang = lang if lang in LANGUAGES else "en"
        data = media.get_bytes()
        pred = classifier.predict(data, heatmap=heatmap, name=getattr(media, "name", "") or "upload")
        out = pred.to_dict()
        if out["refusal"]:
            code = out["refusal"]["code"]
            # every language, so that the app can switch language without asking again
            texts = {lg: {"message": refusal_text(code, lg), "next_step": next_step(code, lg)} for lg in LANGUAGES}
            out["refusal"] = {"code": code, **texts[lang], "translations": texts}
        out["notice"] = classifier_notice(lang)
        out["heatmap"] = anvil.BlobMedia("image/png", pred.heatmap_png, name="heatmap.png") if pred.heatmap_png else None
        return out

    def model_info() -> dict:
        return {"name": classifier.name, "version": classifier.version, "classes": classifier.classes,
                "notice": classifier_notice()}

    return {"classify_xray": classify_xray, "model_info": model_info}


def classifier_notice(lang: str = "en") -> str:
    from . import NOTICE, NOTICE_ES

    return NOTICE_ES if lang == "es" else NOTICE


def register(classifier: Classifier) -> dict:
    import anvil.server

    fns = make_functions(classifier)
    for name, fn in fns.items():
        anvil.server.callable(name)(fn)
    return fns


def connect(classifier: Classifier, key: str, url: str | None = None) -> None:  # pragma: no cover - needs Anvil's servers
    """Register the functions and connect; returns at once (anvil-uplink keeps the link on its own thread)."""
    import anvil.server

    register(classifier)
    kwargs = {"url": url} if url else {}
    anvil.server.connect(key, **kwargs)
    print(f"connected to Anvil as an uplink; serving classify_xray with {classifier.name} {classifier.version}")


def serve(classifier: Classifier, key: str, url: str | None = None) -> None:  # pragma: no cover - needs Anvil's servers
    import anvil.server

    connect(classifier, key, url)
    anvil.server.wait_forever()


def media_from_png_b64(b64: str):
    import anvil

    return anvil.BlobMedia("image/png", base64.b64decode(b64), name="heatmap.png")
