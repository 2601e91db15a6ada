"""Several exported models as one ONNX file that the server loads like any other.

    python -m model_training ensemble --models weights/cxr-screen.onnx runs/cxr-screen-v7/model.onnx --out runs/ens

The members must share classes, preprocessing and the patient-level split (their validation data calibrates the
ensemble and their test data judges it, so a member that trained on another member's test images would make
both meaningless). Logits and heatmaps are averaged; embeddings are concatenated and the refusal gate is fitted
again on them. The result is a run folder that ``release`` ships like a trained one. ``unpack`` takes a shipped ensemble apart
again into one run folder per member, so that a member can be paired with a newly trained model.

Two EfficientNet-Lite0s weigh 26.9 MB in float32: the weights nearest the output are stored as float16 (and cast
back to float32 when ONNX Runtime loads the file, so the arithmetic stays float32) until the file is under 24 MB.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path

import numpy as np

from ..data.datasets import DataError, load_spec, splits_beside, write_manifest
from ..evaluation import plots
from ..evaluation.calibration import calibrated_probs
from ..evaluation.metrics import calibrate_and_report
from .model_card import KNN_GATE_METHOD, library_versions, write_card

MEMBER_PREFIX = "m{}/"
MEMBER_RE = re.compile(r"^(m\d+)/")
FLOAT16_SUFFIX = "__float16"
FLOAT16_MAX = 65000.0  # float16's largest finite value is 65504
WEIGHT_BUDGET_BYTES = 24_000_000  # one file stays under the 25 MB limit of a shipped model


def member_of(node_name: str) -> str:
    """'m0', 'm1', ... for a node of a merged ensemble; '' for any other node."""
    m = MEMBER_RE.match(node_name)
    return m.group(1) if m else ""


def merge(models: list):
    """One ONNX graph running every member on the same input: mean logits, mean CAM, concatenated embedding."""
    import onnx
    from onnx import compose, helper

    if len(models) < 2:
        raise ValueError("an ensemble needs at least two models")
    first = models[0]
    in0 = first.graph.input[0]
    outs0 = [o.name for o in first.graph.output]
    for i, m in enumerate(models[1:], 1):
        if [o.name for o in m.graph.output] != outs0 or m.graph.input[0].type != in0.type:
            raise ValueError(f"model {i} has other inputs or outputs than model 0: they cannot be merged")
    opsets = {o.domain: o.version for o in first.opset_import}
    nodes, inits, vinfo = [], [], []
    for i, m in enumerate(models):
        if {o.domain: o.version for o in m.opset_import} != opsets:
            m = onnx.version_converter.convert_version(m, opsets[""])
        p = compose.add_prefix(m, MEMBER_PREFIX.format(i))
        g = p.graph
        nodes.append(helper.make_node("Identity", [in0.name], [g.input[0].name], name=MEMBER_PREFIX.format(i) + "input"))
        nodes.extend(g.node)
        inits.extend(g.initializer)
        vinfo.extend(g.value_info)
    outputs = []
    for o in first.graph.output:
        members = [MEMBER_PREFIX.format(i) + o.name for i in range(len(models))]
        if o.name == "embedding":  # the gate sees every member's features
            nodes.append(helper.make_node("Concat", members, [o.name], name="ensemble/" + o.name, axis=1))
            out = copy.deepcopy(o)
            dim = out.type.tensor_type.shape.dim[1]
            if dim.HasField("dim_value"):
                dim.dim_value *= len(models)
            outputs.append(out)
        else:
            nodes.append(helper.make_node("Mean", members, [o.name], name="ensemble/" + o.name))
            outputs.append(copy.deepcopy(o))
    graph = helper.make_graph(nodes, "ensemble", [copy.deepcopy(in0)], outputs, inits, value_info=vinfo)
    model = helper.make_model(graph, opset_imports=list(first.opset_import), producer_name="cxr-screening ensemble")
    model.ir_version = first.ir_version
    helper.set_model_props(model, {"ensemble_members": str(len(models))})
    onnx.checker.check_model(model)
    return model


def store_float16(model, max_bytes: int | None = None, names: set[str] | None = None):
    """A copy with float32 weights stored as float16, each behind a Cast back to float32: all of them, or with
    ``max_bytes`` only as many as keeps the weights under it, nearest the output first, or with ``names`` exactly
    those (a member of an ensemble stored as the ensemble stored it).

    Why nearest the output: measured on two copies of model 1.4.0, float16 for every weight moved probabilities
    by up to 3.3 points (the error grows through the early high-resolution layers), float16 for the 27 tensors
    nearest the output (down to 22 MB) by 0.02 points."""
    from onnx import TensorProto, helper, numpy_helper

    model = copy.deepcopy(model)
    g = model.graph
    first_use: dict[str, int] = {}
    for i, node in enumerate(g.node):
        for name in node.input:
            first_use.setdefault(name, i)
    size = sum(numpy_helper.to_array(i).nbytes for i in g.initializer)
    chosen = set()
    for init in sorted(g.initializer, key=lambda t: -first_use.get(t.name, -1)):
        if max_bytes is not None and size <= max_bytes:
            break
        if names is not None and init.name not in names:
            continue
        if init.data_type == TensorProto.FLOAT:
            w = numpy_helper.to_array(init)
            if w.size > 1 and np.all(np.abs(w) < FLOAT16_MAX):
                chosen.add(init.name)
                size -= w.nbytes // 2
    casts, keep = [], []
    for init in g.initializer:
        if init.name in chosen:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + FLOAT16_SUFFIX)
            keep.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], name=init.name + "/to_float32",
                                          to=TensorProto.FLOAT))
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model


def restore_float32(model):
    """The inverse of store_float16 (quantization needs the weights as float32 initializers)."""
    from onnx import numpy_helper

    model = copy.deepcopy(model)
    g = model.graph
    halves = {i.name: i for i in g.initializer if i.name.endswith(FLOAT16_SUFFIX)}
    if not halves:
        return model
    casts = [n for n in g.node if n.op_type == "Cast" and len(n.input) == 1 and n.input[0] in halves]
    restored = [numpy_helper.from_array(numpy_helper.to_array(halves[n.input[0]]).astype(np.float32), n.output[0])
                for n in casts]
    others = [i for i in g.initializer if i.name not in halves]
    del g.initializer[:]
    g.initializer.extend(others + restored)
    cast_ids = {id(n) for n in casts}
    nodes = [n for n in g.node if id(n) not in cast_ids]
    del g.node[:]
    g.node.extend(nodes)
    return model


def unpack(model_path: Path, out: Path) -> list[Path]:
    """Each member of the ensemble ``model_path`` as a run folder ``out/m<i>/`` (model.onnx, model_card.json,
    splits.csv) that ``build`` accepts. Weights that the ensemble stored as float16 stay at that precision."""
    import onnx

    model_path = Path(model_path)
    if not model_path.is_file():
        raise DataError(f"{model_path} not found")
    card, splits = _member_files(model_path)
    records = load_spec(str(splits))
    ensemble = restore_float32(onnx.load(str(model_path)))
    n = ensemble_members(ensemble)
    if n < 2 or len(card.get("members") or []) != n:
        raise DataError(f"{model_path} is not an ensemble with its members listed in its card: nothing to unpack")
    out = Path(out)
    folders = []
    for i in range(n):
        folder = out / f"m{i}"
        folder.mkdir(parents=True, exist_ok=True)
        member = extract_member(ensemble, i)
        onnx.checker.check_model(member)
        onnx.save(member, str(folder / "model.onnx"))
        write_manifest(records, folder / "splits.csv")  # its paths are relative to where it lies
        # JSON only: the member has no metrics of its own for a readable page (its ensemble's card has them)
        (folder / "model_card.json").write_text(json.dumps(_unpacked_card(card, i, model_path), indent=2))
        folders.append(folder)
    return folders


def ensemble_members(model) -> int:
    """How many networks an ONNX model (a path or a loaded ModelProto) averages: 1 unless it is an ensemble."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return int({p.key: p.value for p in model.metadata_props}.get("ensemble_members", 1))


def extract_member(ensemble, i: int):
    """Member ``i`` of a merged (float32) ensemble as the stand-alone model it was before ``merge``."""
    from onnx import helper

    prefix = MEMBER_PREFIX.format(i)
    g = ensemble.graph
    entry = next(n for n in g.node if n.name == prefix + "input")
    n_members = ensemble_members(ensemble)

    def strip(name: str) -> str:
        return name[len(prefix):] if name.startswith(prefix) else name

    nodes = []
    for node in g.node:
        if member_of(node.name) != f"m{i}" or node is entry:
            continue
        node = copy.deepcopy(node)
        node.name = strip(node.name)
        node.input[:] = [strip(x) for x in node.input]
        node.output[:] = [strip(x) for x in node.output]
        nodes.append(node)

    def renamed(protos) -> list:  # the member's initializers or value infos, without the prefix
        out = []
        for p in protos:
            if p.name.startswith(prefix):
                p = copy.deepcopy(p)
                p.name = strip(p.name)
                out.append(p)
        return out

    inits, vinfo = renamed(g.initializer), renamed(g.value_info)
    graph_in = copy.deepcopy(g.input[0])
    graph_in.name = strip(entry.output[0])
    outputs = []
    for o in g.output:
        o = copy.deepcopy(o)
        dim = o.type.tensor_type.shape.dim
        if o.name == "embedding" and len(dim) > 1 and dim[1].HasField("dim_value"):
            dim[1].dim_value //= n_members  # merge concatenated the members' embeddings
        outputs.append(o)
    graph = helper.make_graph(nodes, f"member {i}", [graph_in], outputs, inits, value_info=vinfo)
    model = helper.make_model(graph, opset_imports=list(ensemble.opset_import), producer_name="cxr-screening unpack")
    model.ir_version = ensemble.ir_version
    return model


def _unpacked_card(card: dict, i: int, source: Path) -> dict:
    """A member's card rebuilt from what the ensemble's card kept of it: enough for ``build`` and for serving
    alone (without a refusal gate until ``fit-gate`` fits one), not its own per-split metrics."""
    summary = card["members"][i]
    t = card.get("training", {})
    histories = list((t.get("member_histories") or {}).values())
    member = {k: copy.deepcopy(card[k]) for k in ("classes", "preprocessing", "outputs", "uncertain_threshold",
                                                  "intended_use", "known_limits", "data") if k in card}
    member.update(
        name=summary.get("name"), version=summary.get("version"), architecture=summary["architecture"],
        format="onnx",
        calibration={"temperature": summary.get("temperature") or 1.0},
        ood={"file": None},
        training={"command": summary.get("command"),
                  "minutes": summary.get("minutes"), "best_epoch": summary.get("best_epoch"),
                  "epochs_run": len(histories[i]) if i < len(histories) else None,
                  "pretrained": t.get("pretrained"), "augmentation": t.get("augmentation"),
                  "history": histories[i] if i < len(histories) else []},
        unpacked_from={"model": str(source), "member": f"m{i}", "ensemble_version": card.get("version")},
        export={"format": "onnx", "weights": "as stored in the ensemble (some tensors nearest the output float16)"},
        date=card.get("date"),
    )
    return member


def _member_files(model_path: Path) -> tuple[dict, Path]:
    """A member's card and its splits manifest (a run folder's or a shipped model's)."""
    from uplink_server.model import find_card

    model_path = Path(model_path)
    if not model_path.is_file():
        raise DataError(f"ensemble member {model_path} not found")
    card_path = find_card(model_path)
    splits = splits_beside(model_path)
    if card_path is None or splits is None:
        stem = model_path.name.rsplit(".", 1)[0]
        raise DataError(f"ensemble member {model_path} needs its card and splits manifest beside it "
                        f"({stem}.card.json + {stem}.splits.csv, or a run folder's model_card.json + splits.csv)")
    return json.loads(card_path.read_text()), splits


def _split_key(records) -> set:
    return {(str(Path(r.path).resolve()), r.split) for r in records}


def build(members: list[Path], out: Path, command: str = "", progress: bool = True, seed: int = 0) -> Path:
    """Merge ``members`` into ``out/model.onnx`` and give it what a training run leaves: calibration on
    validation, metrics per split, plots, refusal gate, card, splits."""
    import onnx

    from uplink_server.model import Classifier

    from ..data.splits import split_records
    from ..evaluation.evaluate import predict_records
    from .gate import fit_ood_gate

    members = [Path(m) for m in members]
    if len(members) < 2:
        raise DataError("an ensemble needs at least two models")
    infos = [_member_files(m) for m in members]
    cards = [c for c, _ in infos]
    for m, c in zip(members[1:], cards[1:]):
        if c["classes"] != cards[0]["classes"] or c["preprocessing"] != cards[0]["preprocessing"]:
            raise DataError(f"{m} has other classes or preprocessing than {members[0]}: they cannot be averaged")
    models = [onnx.load(str(m)) for m in members]
    for m, model in zip(members, models):
        if ensemble_members(model) > 1:
            raise DataError(f"{m} is an ensemble already: averaging it with another model would weigh its members "
                            f"half as much; take it apart with `python -m model_training unpack --model {m} --out DIR` "
                            "and list its members instead")
    records = load_spec(str(infos[0][1]))
    for m, (_, splits) in zip(members[1:], infos[1:]):
        if _split_key(load_spec(str(splits))) != _split_key(records):
            raise DataError(f"{m} was trained on another split than {members[0]}: the ensemble's validation and test "
                            "images would include training images of a member")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged = merge(models)
    packed = store_float16(merged, WEIGHT_BUDGET_BYTES)
    onnx.save(packed, str(out / "model.onnx"))
    write_manifest(records, out / "splits.csv")

    card = copy.deepcopy(cards[0])
    card["calibration"] = {"temperature": 1.0}
    card["ood"] = {"file": None}
    by_split = split_records(records)
    clf = Classifier(out / "model.onnx", card=card)
    outputs = {}
    for s, recs in by_split.items():
        if recs and s != "train":
            logits, _, _, kept, unreadable = predict_records(clf, recs, progress=progress)
            if unreadable:
                raise DataError(f"{len(unreadable)} unreadable images in the {s} split, e.g. {unreadable[0]}")
            outputs[s] = (logits, np.array([clf.classes.index(r.label) for r in kept]))
    if "val" not in outputs:
        raise DataError("the members' split has no validation images to calibrate the ensemble on")
    calibration, metrics = calibrate_and_report(outputs, by_split, clf.classes, out)
    histories = dict(zip(_member_names(members, cards), (c["training"].get("history") or [] for c in cards)))
    plots.learning_curves(histories, out / "learning_curves.png")
    gate = fit_ood_gate(out / "model.onnx", clf.spec, by_split, seed)
    gate.save(out / "ood.npz")

    change = _float16_change(merged, out / "model.onnx", by_split["val"][:64], clf, calibration["temperature"])
    n_half = sum(1 for i in packed.graph.initializer if i.name.endswith(FLOAT16_SUFFIX))
    card.update(
        name=f"cxr-ensemble-{len(members)}",
        version=dt.date.today().isoformat(),
        architecture=" + ".join(c["architecture"] for c in cards),
        calibration=calibration,
        ood={"file": "ood.npz", "threshold": gate.threshold, "method": KNN_GATE_METHOD},
        metrics=metrics,
        export={"format": "onnx", "float16_weight_tensors": n_half,
                "weights": f"float32; the {n_half} tensors nearest the output stored as float16 (cast to float32 on "
                           f"load) to stay under {WEIGHT_BUDGET_BYTES / 1e6:g} MB",
                **change},
        library_versions=library_versions(),
        members=[_member_summary(m, c) for m, c in zip(members, cards)],
        training=_ensemble_training(members, cards, command, histories),
    )
    for key in ("release_notes", "evaluation", "shortcut_checks", "shortcut_check_counts", "framing_check", "files", "int8"):
        card.pop(key, None)
    card["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_card(card, out / "model_card.json")
    print(f"run folder: {out}")
    return out


def _member_names(members: list[Path], cards: list[dict]) -> list[str]:
    """'m0: cxr-screen 1.4.0', ... (two runs of one day can share a name and version)."""
    return [f"m{i}: {c.get('name', m.stem)} {c.get('version', '')}".strip() for i, (m, c) in enumerate(zip(members, cards))]


def _member_summary(model: Path, card: dict) -> dict:
    t = card["training"]
    hist = t.get("history") or []
    best = next((h for h in hist if h["epoch"] == t.get("best_epoch")), None)
    return {"model": str(model), "name": card.get("name"), "version": card.get("version"),
            "architecture": card["architecture"], "command": t.get("command"), "minutes": t.get("minutes"),
            "best_epoch": t.get("best_epoch"), "val_loss_at_best_epoch": best and best["val_loss"],
            "temperature": card.get("calibration", {}).get("temperature")}


def _ensemble_training(members: list[Path], cards: list[dict], command: str, histories: dict) -> dict:
    ts = [c["training"] for c in cards]
    return {
        "command": command or "python -m model_training ensemble --models " + " ".join(map(str, members)),
        "member_commands": [t.get("command") for t in ts],
        "config": {"members": [str(m) for m in members]},
        "pretrained": ts[0].get("pretrained"),
        "augmentation": ts[0].get("augmentation"),
        "epochs_run": " + ".join(str(t.get("epochs_run")) for t in ts),
        "best_epoch": ", ".join(str(t.get("best_epoch")) for t in ts),
        "minutes": round(sum(float(t.get("minutes") or 0) for t in ts), 2),
        "history": [],
        "member_histories": histories,
    }


def _float16_change(merged, packed_path: Path, records, clf, t: float) -> dict:
    """How much float16 storage moved the logits and calibrated probabilities on ``records``."""
    import onnxruntime as ort

    from uplink_server.imaging import decode

    feed = {merged.graph.input[0].name: np.stack([clf.preprocess(decode(r.path)) for r in records])}
    a = ort.InferenceSession(merged.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    b = ort.InferenceSession(str(packed_path), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    return {"checked_images": len(records), "max_abs_logit_change_vs_float32": float(np.abs(a - b).max()),
            "max_abs_probability_change_vs_float32": float(np.abs(calibrated_probs(a, t) - calibrated_probs(b, t)).max())}
