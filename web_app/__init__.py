"""Self-hosted web app: upload chest X-rays, read results, triage, history.

Run with ``python -m web_app serve``. Model servers connect to it as uplinks
(``python -m uplink_server connect --url ... --key ...``); the default model in
``weights/`` also runs in-process.
"""
