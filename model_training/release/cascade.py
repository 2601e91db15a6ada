"""Serve a shipped ensemble as a cascade (``uplink_server.cascade``), kept only if it answers as the ensemble does.

    python -m model_training release-cascade --name cxr-screen --out weights

Like ``release-int8`` for a shipped model: it writes each member as its own file (``<name>.m0.onnx``, ...; the
tensors the ensemble stored as float16 stay float16, so the cascade's "both networks" answer is the merged file's),
chooses on the validation split the first network's exit probability, fits a refusal gate on the first network's
embedding (as any model's gate is fitted), then judges the cascade against the full ensemble with the parity rule
(``ship_rule.parity``: in-source accuracy, test ECE, triage on unseen sources, framing). The card records the
outcome either way; the files stay only when it passes.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import numpy as np

from uplink_server.cascade import CascadeGate, CascadeRule, softmax
from uplink_server.model import Classifier

from ..data.datasets import DataError, load_spec
from ..data.splits import split_records
from ..evaluation.evaluate import evaluate, predict_records
from ..evaluation.external import served
from ..evaluation.framing import framing_checks
from .ensemble import FLOAT16_SUFFIX, MEMBER_PREFIX, ensemble_members, extract_member, restore_float32, store_float16
from .gate import fit_ood_gate
from .model_card import KNN_GATE_METHOD, markdown_path, replace_section
from .release import _framing_evaluations, _strip
from .ship_rule import parity

# The exit probability is the lowest of these at which the cascade, on the validation split, gives the ensemble's
# class for at least AGREEMENT of the films and raises the ensemble's NLL by at most NLL_SLACK (1.5.0's second
# network lowered its first network's validation NLL by 0.013; the cascade keeps most of that).
EXIT_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
AGREEMENT = 0.999
NLL_SLACK = 0.005
DOUBT_QUANTILE = 0.95
SECTION = "Served as a cascade"
UNSEEN_DEFAULT = "nih+tb"


def member_files(out: Path, name: str, n: int) -> list[Path]:
    return [out / f"{name}.m{i}.onnx" for i in range(n)]


def write_members(model_path: Path, out: Path, name: str) -> list[Path]:
    """Each member of the merged ensemble as its own ONNX file, stored as the ensemble stored it."""
    import onnx

    packed = onnx.load(str(model_path))
    merged = restore_float32(packed)
    halves = {i.name[: -len(FLOAT16_SUFFIX)] for i in packed.graph.initializer if i.name.endswith(FLOAT16_SUFFIX)}
    paths = member_files(out, name, ensemble_members(packed))
    for i, path in enumerate(paths):
        prefix = MEMBER_PREFIX.format(i)
        member = extract_member(merged, i)
        mine = {h[len(prefix):] for h in halves if h.startswith(prefix)}
        member = store_float16(member, names=mine) if mine else member
        onnx.checker.check_model(member)
        onnx.save(member, str(path))
    return paths


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())


def choose_exit(member_logits: list[np.ndarray], y: np.ndarray, first_temperature: float,
                ensemble_temperature: float, distance: np.ndarray | None = None, doubt: float = np.inf) -> dict:
    """The lowest exit probability of EXIT_GRID that keeps the ensemble's answers on validation (see above);
    ``exit_probability`` None when none does. ``distance``/``doubt``: films the first network's gate finds further
    than ``doubt`` from its X-rays never leave early."""
    ens = softmax(np.mean(member_logits, axis=0) / ensemble_temperature)
    first = softmax(member_logits[0] / first_temperature)
    base = nll(ens, y)
    rows = []
    for tau in EXIT_GRID:
        alone = CascadeRule(tau, first_temperature, ensemble_temperature, doubt).exits(member_logits[0], distance)
        p = np.where(alone[:, None], first, ens)
        rows.append({"exit_probability": tau, "share_alone": round(float(alone.mean()), 4),
                     "agreement_with_ensemble": round(float((p.argmax(1) == ens.argmax(1)).mean()), 4),
                     "nll_increase": round(nll(p, y) - base, 4), "accuracy": round(float((p.argmax(1) == y).mean()), 4)})
    ok = [r for r in rows if r["agreement_with_ensemble"] >= AGREEMENT and r["nll_increase"] <= NLL_SLACK]
    chosen = ok[0] if ok else None
    return {"exit_probability": chosen and chosen["exit_probability"], "validation": chosen,
            "ensemble_validation": {"n": int(len(y)), "nll": round(base, 4),
                                    "accuracy": round(float((ens.argmax(1) == y).mean()), 4)},
            "grid": rows}


def _validation_outputs(members: list[Path], card: dict, records) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Each member's logits on ``records``, the first member's embeddings, and the labels."""
    bare = {k: card[k] for k in ("classes", "preprocessing", "outputs") if k in card}
    logits, first_emb, kept = [], None, None
    for m in members:
        clf = Classifier(m, card={**bare, "calibration": {"temperature": 1.0}, "ood": {"file": None}})
        lg, emb, _, kept, unreadable = predict_records(clf, records, progress=False)
        if unreadable:
            raise DataError(f"{len(unreadable)} unreadable validation images, e.g. {unreadable[0]}")
        logits.append(lg)
        first_emb = emb if first_emb is None else first_emb
    return logits, first_emb, np.array([card["classes"].index(r.label) for r in kept])


def release_cascade(out: Path, name: str, unseen: str = UNSEEN_DEFAULT, progress: bool = True, seed: int = 0) -> dict:
    """Write, judge and keep (or remove) the cascade of the shipped ensemble ``out/name.onnx``; returns its card
    section."""
    out = Path(out)
    model, card_path, splits = out / f"{name}.onnx", out / f"{name}.card.json", out / f"{name}.splits.csv"
    missing = [f.name for f in (model, card_path, splits) if not f.is_file()]
    if missing:
        raise DataError(f"no shipped model '{name}' in {out}: missing {', '.join(missing)}")
    card = json.loads(card_path.read_text())
    card.pop("cascade", None)  # judged afresh against the ensemble itself
    n = ensemble_members(model)
    if n < 2 or len(card.get("members") or []) != n:
        raise DataError(f"{model} is not an ensemble with its members in its card: it has no cheaper path to serve")
    by_split = split_records(load_spec(str(splits)))
    if not by_split["val"] or not by_split["test"]:
        raise DataError(f"{splits} needs validation and test images to choose and judge a cascade")
    unseen_records = load_spec(unseen)

    # a run that stops half-way (an error, Ctrl-C) leaves the weights folder as it was: nothing unjudged is served
    before = card_path.read_text()
    made = [f for f in (*member_files(out, name, n), out / f"{name}.cascade.ood.npz") if not f.exists()]
    try:
        return _make_and_judge(out, name, model, card, card_path, by_split, unseen_records, progress, seed)
    except BaseException:
        for f in made:
            f.unlink(missing_ok=True)
        card_path.write_text(before)
        raise


def _make_and_judge(out: Path, name: str, model: Path, card: dict, card_path: Path, by_split: dict, unseen_records,
                    progress: bool, seed: int) -> dict:
    members = write_members(model, out, name)
    whole = Classifier(model, cascade=False)
    if whole.gate is None:
        raise DataError(f"{model} has no refusal gate: the cascade's films that reach every network need it")
    gate = fit_ood_gate(members[0], whole.spec, by_split, seed)
    gate_file = out / f"{name}.cascade.ood.npz"
    gate.save(gate_file)
    first_t = float(card["members"][0].get("temperature") or 1.0)
    logits, first_emb, y = _validation_outputs(members, card, by_split["val"])
    distance = CascadeGate(gate, whole.gate).distance(first_emb)
    doubt = float(np.quantile(distance, DOUBT_QUANTILE))
    choice = choose_exit(logits, y, first_t, whole.temperature, distance, doubt)
    section = {"members": [m.name for m in members], "first_temperature": first_t,
               "ensemble_temperature": whole.temperature,
               "exit_probability": choice["exit_probability"],
               "rule": f"the lowest exit probability at which the cascade gives the ensemble's class on >= "
                       f"{AGREEMENT:.1%} of validation films and raises its NLL by <= {NLL_SLACK}",
               "chosen_on": "validation split", "validation": choice["validation"],
               "ensemble_validation": choice["ensemble_validation"], "grid": choice["grid"],
               "doubt": {"distance": doubt, "quantile": DOUBT_QUANTILE,
                         "meaning": "films whose first-network embedding lies further from the gate's X-rays than "
                                    f"{DOUBT_QUANTILE:.0%} of validation X-rays go to every network"},
               "ood": {"file": gate_file.name, "threshold": gate.threshold,
                       "method": KNN_GATE_METHOD.replace("the model's embedding", "the first network's embedding")}}
    if choice["exit_probability"] is None:
        return _not_kept(card, card_path, section, members, [gate_file], "no exit probability keeps the ensemble's answers")
    section["shipped"] = True  # for the judging below: Classifier serves what the card ships
    card["cascade"] = section
    card_path.write_text(json.dumps(card, indent=2) + "\n")

    splits = out / f"{name}.splits.csv"
    public = evaluate(model, ["public"], "auto", progress=progress)
    run_test = evaluate(model, [str(splits)], "test", progress=progress)
    framing, _ = framing_checks(_framing_evaluations(model, splits, public, progress))
    base_card = {k: v for k, v in card.items() if k != "cascade"}
    candidate_card = copy.deepcopy(base_card)
    candidate_card["evaluation"] = {"kermany_official_test": _strip(public), "run_test_split": _strip(run_test)}
    candidate_card["calibration"] = {**card["calibration"], "ece_test_after": run_test["ece"]}
    candidate_card["framing_check"] = framing
    with tempfile.TemporaryDirectory() as tmp:
        cand = served(model, unseen_records, Path(tmp) / "cascade", progress, cascade=True)["results"]["served"]
        base = served(model, unseen_records, Path(tmp) / "ensemble", progress, cascade=False)["results"]["served"]
    verdict = parity(cand, base, candidate_card, base_card)
    section["evaluation"] = {
        "kermany_official_test": {"accuracy": public["accuracy"], "ece": public["ece"]},
        "run_test_split": {"accuracy": run_test["accuracy"], "ece": run_test["ece"]},
        "unseen_triage_roc_auc": {s: f["triage"]["roc_auc"] for s, f in cand["folds"].items()},
        "ensemble_unseen_triage_roc_auc": {s: f["triage"]["roc_auc"] for s, f in base["folds"].items()},
        "framing_validation_1.4": (framing.get("validation") or {}).get("1.4"),
    }
    section["parity"] = verdict["checks"]
    section["command"] = f"python -m model_training release-cascade --name {name} --out {out}"
    if not verdict["ships"]:
        return _not_kept(card, card_path, section, members, [gate_file], "it fails the parity rule")
    card["cascade"] = section
    _write(card, card_path)
    return section


def _not_kept(card: dict, card_path: Path, section: dict, members: list[Path], others: list[Path], why: str) -> dict:
    for f in [*members, *others]:
        f.unlink(missing_ok=True)
    section.update(shipped=False, why_not=why)
    card["cascade"] = section
    _write(card, card_path)
    return section


def _write(card: dict, card_path: Path) -> None:
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    md = markdown_path(card_path)
    if md.is_file():
        replace_section(md, SECTION, markdown(card["cascade"]))


def markdown(c: dict) -> str:
    v = c.get("validation") or {}
    lines = [f"Rule: {c['rule']} ({c['chosen_on']}). `CXR_CASCADE=0` serves the full ensemble (and makes "
             "`evaluate` reproduce the ensemble's numbers above; by default it reproduces the cascade's below)."]
    if c.get("exit_probability") is not None:
        lines.append(f"Exit probability **{c['exit_probability']}**: the first network answers alone on "
                     f"{v.get('share_alone', 0):.1%} of validation films, the ensemble's class on "
                     f"{v.get('agreement_with_ensemble', 0):.1%}, NLL {v.get('nll_increase', 0):+.4f}. Films whose "
                     f"first-network embedding lies further from its gate's X-rays than "
                     f"{(c.get('doubt') or {}).get('quantile', 0):.0%} of validation X-rays go to every network, "
                     "and are refused or not by the ensemble's gate.")
    ev = c.get("evaluation")
    if ev:
        auc = ", ".join(f"{s} {a:.3f} (ensemble {ev['ensemble_unseen_triage_roc_auc'].get(s, float('nan')):.3f})"
                        for s, a in ev["unseen_triage_roc_auc"].items())
        lines.append(f"Cascade: Kermany official test accuracy {ev['kermany_official_test']['accuracy']:.4f}, run test "
                     f"split {ev['run_test_split']['accuracy']:.4f} (ECE {ev['run_test_split']['ece']:.4f}); triage "
                     f"ROC-AUC on unseen sources {auc}.")
    lines = [line for prose in lines for line in (prose, "")]  # one paragraph each
    if c.get("parity"):
        lines += ["Parity rule against the full ensemble:", "", *[f"- {p}" for p in c["parity"]], ""]
    lines.append("**Shipped**: the default served path." if c.get("shipped") else
                 f"**Not shipped**: {c.get('why_not', '')}; the full ensemble serves.")
    return "\n".join(lines)
