"""``python -m uplink_server {predict,connect,info}``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import NOTICE

BATCH = 16  # files per model run in `predict`


def _heatmap_path(base: str, file: str, many: bool) -> Path:
    p = Path(base)
    return p.with_name(f"{p.stem}-{Path(file).stem}{p.suffix or '.png'}") if many else p


def cmd_predict(args) -> int:
    from .model import Classifier

    clf = Classifier(args.model, threads=args.threads)
    refused = 0
    results = []
    missing = [f for f in args.files if not Path(f).is_file()]
    for f in missing:
        print(f"error: {f}: no such file", file=sys.stderr)
    present = [f for f in args.files if f not in missing]
    preds = {}
    for i in range(0, len(present), BATCH):  # a batch runs faster per image than one file at a time
        chunk = present[i:i + BATCH]
        preds.update(zip(chunk, clf.predict_batch(chunk, heatmap=bool(args.heatmap), names=chunk,
                                                  check_ood=not args.no_ood, heatmap_class=args.heatmap_class)))
    for f in args.files:
        if f not in preds:
            refused += 1
            results.append({"file": f, "refused": True, "refusal": {"code": "not_found", "message": "no such file"}})
            continue
        pred = preds[f]
        d = pred.to_dict()
        if args.heatmap and pred.heatmap_png:
            hp = _heatmap_path(args.heatmap, f, len(args.files) > 1)
            hp.write_bytes(pred.heatmap_png)
            d["heatmap"] = str(hp)
        results.append(d)
        refused += pred.refused
        if not args.json:
            if pred.refused:
                print(f"{f}: REFUSED ({pred.refusal['code']}): {pred.refusal['message']}  [{pred.elapsed_ms:.0f} ms]")
            else:
                probs = "  ".join(f"{c}={p:.3f}" for c, p in pred.probabilities.items())
                flag = " (uncertain)" if pred.uncertain else ""
                tri = pred.triage
                verdict = "" if tri is None else ("NEEDS A DOCTOR'S READ" if tri["needs_read"]
                                                  else "no abnormality found by the model")
                lead = "" if tri is None else f"{verdict} (score {tri['score']:.3f}); finding: "
                print(f"{f}: {lead}{pred.label}{flag}  {probs}  [{clf.name} {clf.version}, {pred.elapsed_ms:.0f} ms]"
                      + (f"  heatmap: {d['heatmap']}" if "heatmap" in d else ""))
    if args.json:
        print(json.dumps({"results": results, "notice": NOTICE}, indent=2))
    else:
        print(NOTICE)
    return 1 if refused else 0


def cmd_connect(args) -> int:
    from .model import Classifier

    clf = Classifier(args.model, threads=args.threads)
    if args.anvil_key:
        from .anvil_uplink import serve

        serve(clf, args.anvil_key, args.anvil_url)
        return 0
    import asyncio

    from .batching import DynamicBatcher

    try:
        # one batch at a time: fed by a broker or a websocket, two runs made smaller batches and fewer answers/s
        batcher = DynamicBatcher(clf, args.max_batch, args.batch_delay_ms, runs=1)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.broker:
        from .broker import BrokerWorker, redact

        worker = BrokerWorker(args.broker, batcher, name=args.name, prefetch=args.prefetch, prefix=args.broker_prefix,
                              stall_s=args.stall_s)
        try:
            asyncio.run(worker.run())
        except KeyboardInterrupt:
            pass
        except (OSError, ConnectionError) as exc:
            print(f"error: broker {redact(args.broker)} unreachable: {exc}", file=sys.stderr)
            return 2
        return 0
    if not (args.url and args.key):
        print("error: connect needs --url and --key (our web app), --broker URL (RabbitMQ), or --anvil-key (an Anvil app)",
              file=sys.stderr)
        return 2
    from .uplink import AuthenticationFailed, UplinkClient

    client = UplinkClient(args.url, args.key, batcher, max_concurrency=args.max_concurrency, name=args.name)
    try:
        asyncio.run(client.run_forever())
    except AuthenticationFailed as exc:
        print(f"error: {exc}; copy the key from the web app's Admin page", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def cmd_info(args) -> int:
    from .model import Classifier

    clf = Classifier(args.model)
    print(json.dumps({"name": clf.name, "version": clf.version, "classes": clf.classes, "path": str(clf.path),
                      "preprocessing": clf.spec.to_dict(), "temperature": clf.temperature,
                      "uncertainty": {"rule": clf.uncertainty.rule, "threshold": clf.uncertainty.threshold},
                      "triage": {"threshold": clf.triage.threshold, "rule": clf.triage.source},
                      "ood_gate": clf.gate is not None,
                      # an ensemble served first-network-first (uplink_server.cascade); None: every network, every film
                      "cascade": None if clf.cascade is None else {
                          "members": [str(p) for p in (clf.cascade.first.path, *(o.path for o in clf.cascade.others))],
                          "exit_probability": clf.cascade.rule.exit_probability}}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m uplink_server", description="Chest X-ray screening model server. " + NOTICE)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict", help="classify image files (JPEG, PNG, BMP, TIFF, WebP, DICOM)")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default=None, help="model file (default: the one in weights/, or $CXR_MODEL)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--heatmap", metavar="OUT.png", help="write the heatmap overlay (several files: OUT-<name>.png)")
    p.add_argument("--heatmap-class", metavar="CLASS", help="the heatmap of this class (default: the most probable one)")
    p.add_argument("--no-ood", action="store_true", help="skip the 'is this a chest X-ray' check")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(fn=cmd_predict)
    c = sub.add_parser("connect", help="connect out to a web app (ours or Anvil) and serve predictions")
    c.add_argument("--url", help="our web app, e.g. http://clinic.example:8000")
    c.add_argument("--key", help="uplink key from the web app's admin page")
    c.add_argument("--anvil-key", help="an Anvil app's uplink key")
    c.add_argument("--anvil-url", default=None, help="Anvil server websocket URL (self-hosted Anvil)")
    c.add_argument("--model", default=None)
    c.add_argument("--broker", default=None, help="take jobs from RabbitMQ instead, e.g. amqp://guest:guest@broker:5672/")
    c.add_argument("--broker-prefix", default="cxr", help="queue names, as the web app's CXR_BROKER_PREFIX")
    c.add_argument("--prefetch", type=int, default=None, help="jobs held at once from the broker (default 2 x --max-batch)")
    c.add_argument("--stall-s", type=float, default=60.0, help="hand back a broker job running longer than this, and pause")
    c.add_argument("--name", default=None, help="how the web app's Admin page names this server (default: host name)")
    c.add_argument("--max-concurrency", type=int, default=16, help="requests accepted at once over the websocket")
    c.add_argument("--max-batch", type=int, default=16, help="largest batch one model run takes")
    c.add_argument("--batch-delay-ms", type=float, default=5.0,
                   help="how long a batch waits for requests still being prepared (0: never)")
    c.add_argument("--threads", type=int, default=None)
    c.set_defaults(fn=cmd_connect)
    i = sub.add_parser("info", help="describe the model")
    i.add_argument("--model", default=None)
    i.set_defaults(fn=cmd_info)
    k = sub.add_parser("keras-card", help="write the card a Keras (.keras/.h5) model needs to be served")
    k.add_argument("model")
    k.add_argument("--classes", required=True, help="comma-separated, in the model's output order")
    k.add_argument("--size", type=int, required=True)
    k.add_argument("--mean", type=float, default=0.5, help="in [0,1] units; Xception/Inception: 0.5")
    k.add_argument("--std", type=float, default=0.5)
    k.add_argument("--activation", choices=["logits", "softmax"], default="logits")
    k.set_defaults(fn=cmd_keras_card)
    return ap


def cmd_keras_card(args) -> int:
    from .keras_backend import write_card

    print(write_card(Path(args.model), [c.strip() for c in args.classes.split(",")], args.size, args.mean, args.std, args.activation))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .model import ModelNotFound

    try:
        return args.fn(args)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
