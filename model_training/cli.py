"""Command line: ``python -m model_training {train,finish,evaluate,compare,release,release-int8,release-cascade,quantize,fit-gate,triage,archs,...}``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def _add_train_args(p: argparse.ArgumentParser, compare: bool = False) -> None:
    from .training.train import TrainConfig

    d = TrainConfig()
    if not compare:
        p.add_argument("--data", action="append", help="data spec: regime (public, adult, mix, covid, radiography, nih, tb, all), CSV manifest or folder; repeat or join with '+' (default public)")
        p.add_argument("--arch", default=d.arch, help=f"architecture (default {d.arch}); see `archs`")
        p.add_argument("--epochs", type=int, default=d.epochs)
        p.add_argument("--out", default=d.out, help="run folder")
    p.add_argument("--pretrained", default=d.pretrained, help="imagenet | none | PATH to a state dict or checkpoint | an exported .onnx model "
                   "of this architecture, to train on from where it stopped (with --frozen-bn all); a model of fewer classes "
                   "(named by its card) grows a fresh row for each new class")
    p.add_argument("--img-size", type=int, default=None, help="square input size (default: the architecture's native size)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of the new head")
    p.add_argument("--backbone-lr", type=float, default=d.backbone_lr, help="learning rate of fine-tuned blocks")
    p.add_argument("--freeze-epochs", type=int, default=None, help="epochs with the backbone frozen (feature extractor); default 1 when pretrained")
    p.add_argument("--frozen-bn", default=d.frozen_bn, choices=["imagenet", "adapt", "all"],
                   help="BatchNorm statistics of frozen layers: keep ImageNet's, or adapt them to the X-rays; "
                        "all: every layer keeps its statistics (needed to continue from an .onnx model)")
    p.add_argument("--finetune-blocks", type=int, default=d.finetune_blocks, help="top backbone blocks to fine-tune after the frozen phase (-1 all, 0 none)")
    p.add_argument("--augment", default=d.augment, help="none | study | default | robust | framing | resolution | key=value,... (rotation, shift, shear, zoom, zoom_in, hflip, brightness, contrast, gamma, blur, lowres)")
    p.add_argument("--balance", choices=["weights", "sampler", "group", "source", "none"], default=d.balance,
                   help="class imbalance: loss weights, class-balanced sampling, or sampling balanced per age group "
                        "(group) or per data source (source) and class")
    p.add_argument("--intensity", default=d.intensity, choices=["none", "equalize", "clahe"],
                   help="intensity normalisation in the one preprocessing function (equalize: histogram equalisation; "
                        "clahe: contrast-limited adaptive equalisation, needs scikit-image)")
    p.add_argument("--crop", type=float, default=d.crop, help="share of each side cut before resizing (borders, text, markers)")
    p.add_argument("--roi", default=d.roi, choices=["frame", "lungs", "lungmask"],
                   help="what the model reads: the whole frame, the box around the lungs found by the lung segmenter "
                        "(weights/lung-segmenter.onnx; `segmenter` trains it), or that box with all but the lungs blacked out")
    p.add_argument("--patience", type=int, default=d.patience, help="early stopping patience (epochs) on validation loss")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--limit", type=int, default=None, help="at most this many images per split (quick runs)")
    p.add_argument("--samples-per-epoch", type=int, default=None)
    p.add_argument("--val-frac", type=float, default=d.val_frac)
    p.add_argument("--test-frac", type=float, default=d.test_frac)
    p.add_argument("--workers", type=int, default=d.workers, help="data loading processes")
    p.add_argument("--skip-unreadable", action="store_true", help="leave out images that cannot be decoded instead of stopping")
    p.add_argument("--uncertain-threshold", type=float, default=d.uncertain_threshold)
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--teacher", default=d.teacher, help="distil: an exported model (e.g. an ensemble) of the same classes "
                   "and preprocessing whose softened answers on each training batch the network also learns")
    p.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="share of the teacher's loss against the labels' cross-entropy (with --teacher)")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature,
                   help="temperature that softens both networks' answers for the teacher's loss")
    p.add_argument("--no-progress", action="store_true")


def _config(args, **over):
    from .training.train import TrainConfig

    cfg = TrainConfig(
        data=getattr(args, "data", None) or ["public"], arch=getattr(args, "arch", "efficientnet_lite0"),
        epochs=getattr(args, "epochs", 5), out=getattr(args, "out", "runs/latest"),
        pretrained=args.pretrained, img_size=args.img_size, batch_size=args.batch_size, lr=args.lr,
        backbone_lr=args.backbone_lr, freeze_epochs=args.freeze_epochs, finetune_blocks=args.finetune_blocks, frozen_bn=args.frozen_bn,
        augment=args.augment, balance=args.balance, intensity=args.intensity, crop=args.crop, roi=args.roi, patience=args.patience, seed=args.seed, limit=args.limit,
        samples_per_epoch=args.samples_per_epoch, val_frac=args.val_frac, test_frac=args.test_frac,
        workers=args.workers, skip_unreadable=args.skip_unreadable, uncertain_threshold=args.uncertain_threshold,
        progress=not args.no_progress, device=args.device, teacher=args.teacher,
        distill_weight=args.distill_weight, distill_temperature=args.distill_temperature,
        command="python -m model_training " + shlex.join(sys.argv[1:]),
    )
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def _add_float_head(p: argparse.ArgumentParser) -> None:
    from .release.quantize import FLOAT_HEAD_CONVS

    p.add_argument("--float-head-convs", type=int, default=FLOAT_HEAD_CONVS,
                   help="int8: keep this many of the first convolutions in float (chosen for EfficientNet-Lite0; "
                        "choose again on validation agreement for another architecture)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m model_training", description="Train, evaluate and compare chest X-ray classifiers.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_train_args(sub.add_parser("train", help="train one model and export it to ONNX"))
    ev = sub.add_parser("evaluate", help="metrics of an exported model on a data spec")
    ev.add_argument("--model", required=True, help="model file (.onnx; .keras/.h5 with the keras extra)")
    ev.add_argument("--data", action="append", required=True)
    ev.add_argument("--split", default="auto", help="auto (test split if the data has one, else all) | all | train | val | test")
    ev.add_argument("--zoom", type=float, default=1.0,
                    help="framing stress test: crop every image this much tighter (e.g. 1.4) before preprocessing")
    ev.add_argument("--json", action="store_true", help="print metrics as JSON")
    ev.add_argument("--out", default=None, help="folder for metrics.json and plots")
    ev.add_argument("--no-progress", action="store_true")
    cp = sub.add_parser("compare", help="train the grid of architectures x regimes and write the study's tables")
    cp.add_argument("--archs", default="vgg16,inception_v3,efficientnet_lite0")
    cp.add_argument("--regimes", default="public,adult,mix")
    cp.add_argument("--epochs", type=int, default=None, help="override the study's epochs per regime (5/10/10)")
    cp.add_argument("--out", default="runs/compare")
    _add_train_args(cp, compare=True)
    q = sub.add_parser("quantize", help="int8 (static, QDQ) copy of an exported model, calibrated on real images")
    q.add_argument("--model", required=True)
    q.add_argument("--data", action="append", required=True, help="calibration images (their train/val split is used)")
    q.add_argument("--out", required=True)
    q.add_argument("--images", type=int, default=200)
    _add_float_head(q)
    rl = sub.add_parser("release", help="ship a run's model into weights/ with evaluation, shortcut checks, int8 copy and cards")
    rl.add_argument("--run", required=True)
    rl.add_argument("--name", default="cxr-screen")
    rl.add_argument("--out", default="weights")
    rl.add_argument("--version", required=True)
    rl.add_argument("--no-int8", action="store_true")
    rl.add_argument("--note", action="append", default=[], help="why this version, shown in its card (repeatable)")
    _add_float_head(rl)
    r8 = sub.add_parser("release-int8", help="(re)make the int8 copy of a shipped model; kept only within 0.5 accuracy points of fp32")
    r8.add_argument("--name", default="cxr-screen")
    r8.add_argument("--out", default="weights")
    _add_float_head(r8)
    rc = sub.add_parser("release-cascade", help="serve a shipped ensemble as a cascade (its first network alone when "
                                                "it is sure); kept only if it passes the parity rule against the ensemble")
    rc.add_argument("--name", default="cxr-screen")
    rc.add_argument("--out", default="weights")
    rc.add_argument("--unseen", default="nih+tb", help="sources the ensemble never saw, for the parity rule's triage check")
    rc.add_argument("--no-progress", action="store_true")
    fn = sub.add_parser("finish", help="calibrate, export and write the card of a run whose training ended but whose export did not")
    fn.add_argument("--run", required=True)
    en = sub.add_parser("ensemble", help="merge models trained on the same split into one ONNX file, calibrated and "
                                         "evaluated like a run (release it like one)")
    en.add_argument("--models", nargs="+", required=True,
                    help="ONNX files with their card and splits beside them (a run folder's or a shipped model's)")
    en.add_argument("--out", required=True, help="run folder to write")
    en.add_argument("--no-progress", action="store_true")
    up = sub.add_parser("unpack", help="take an ensemble apart: one run folder per member (OUT/m0, OUT/m1, ...) "
                                       "that `ensemble` accepts, e.g. to pair a member with a new model")
    up.add_argument("--model", required=True, help="an ensemble's ONNX file with its card and splits beside it")
    up.add_argument("--out", required=True)
    fg = sub.add_parser("fit-gate", help="(re)fit a run's 'is this a chest X-ray' gate from its exported model and split")
    fg.add_argument("--run", required=True)
    un = sub.add_parser("uncertainty", help="choose on the validation split when results are flagged uncertain "
                                            "(margin between the top two classes) and write it into the model card")
    un.add_argument("--model", required=True)
    un.add_argument("--data", default=None, help="manifest with the validation split (default: the splits beside the model)")
    un.add_argument("--target-error", type=float, default=0.02, help="most errors allowed among results not flagged (default 0.02)")
    un.add_argument("--write-card", action="store_true", help="record the rule in the model's card (.json and .md)")
    un.add_argument("--no-progress", action="store_true")
    tr = sub.add_parser("triage", help="choose on the validation split the triage threshold on 1 - p(normal) for a target "
                                       "sensitivity for any abnormality, report it per source on held-out patients, "
                                       "and write it into the model card")
    tr.add_argument("--model", required=True)
    tr.add_argument("--data", default=None, help="manifest with the validation and test splits (default: the splits beside the model)")
    tr.add_argument("--target-sensitivity", type=float, default=0.95)
    tr.add_argument("--also", action="append", default=[], metavar="NAME=SPEC",
                    help="another held-out test to report, e.g. 'Kermany official test=public'")
    tr.add_argument("--write-card", action="store_true", help="record the rule in the model's card (.json and .md)")
    tr.add_argument("--no-progress", action="store_true")
    ex = sub.add_parser("external", help="leave-one-source-out validation: train without each source, test on it "
                                         "(screen: frozen features + a head per recipe; full: the real fine-tune per fold)")
    ex.add_argument("--mode", choices=["screen", "full", "served"], default="screen",
                    help="screen: frozen features; full: fine-tune per fold; served: --baseline-model on sources it never saw")
    ex.add_argument("--data", action="append", help="data spec(s) (default mix: every shared source)")
    ex.add_argument("--out", default="runs/external")
    ex.add_argument("--variants", default="plain,equalize,clahe,lungs,equalize+lungs",
                    help="screen: preprocessing variants (plain, equalize, clahe, crop, lungs, lungmask and '+' combinations "
                         "such as equalize+lungs; lungs needs the lung segmenter)")
    ex.add_argument("--recipes", default="erm,group,source,dro,adversarial",
                    help="screen: head recipes (erm, group, source, dro, adversarial)")
    ex.add_argument("--baseline-model", default=None,
                    help="screen: also probe this served model's embedding and heatmaps (e.g. weights/cxr-screen.onnx)")
    ex.add_argument("--folds", default=None, help="full: only these held-out groups (comma-separated)")
    ex.add_argument("--write-card", default=None, metavar="MODEL",
                    help="record the result of --card-recipe (the model's own recipe) in this model's card")
    ex.add_argument("--card-recipe", default="plain/group",
                    help="screen: the result that stands for the carded model's recipe (1.5.0: plain/group)")
    ex.add_argument("--limit-per-source", type=int, default=None,
                    help="at most this many images per source and class (quick runs)")
    ex.add_argument("--arch", default="efficientnet_lite0")
    ex.add_argument("--epochs", type=int, default=5, help="full: epochs per fold")
    _add_train_args(ex, compare=True)
    sc = sub.add_parser("ship-check", help="the ship rule: does a candidate's worst held-out-source triage AUC (COVID-19 AUC "
                                           "for results without triage) beat the baseline's, with in-source accuracy at "
                                           "most one point worse (and, with --candidate-model, the 2.0.0 targets met)?")
    sc.add_argument("--candidate", required=True, help="loso.json or loso.json#NAME (a result of a screen)")
    sc.add_argument("--baseline", required=True, help="loso.json or loso.json#NAME")
    sc.add_argument("--tolerance", type=float, default=0.01)
    sc.add_argument("--candidate-model", default=None,
                    help="the candidate's released model: in-source accuracies from its card, and the 2.0.0 targets checked")
    sc.add_argument("--parity", metavar="BASELINE_MODEL", default=None,
                    help="a cheaper model of the same task (distilled, int8) against this default: does it answer as well? "
                         "(in source within half a point, ECE, triage AUC on the unseen sources of both served results, "
                         "framing; needs --candidate-model)")
    rf = sub.add_parser("reference", help="histograms of the risk score and image gray levels on the validation split, "
                                          "for the web app's drift check at a site; written into the model card")
    rf.add_argument("--model", required=True)
    rf.add_argument("--data", default=None, help="manifest with the validation split (default: the splits beside the model)")
    rf.add_argument("--no-progress", action="store_true")
    sg = sub.add_parser("segmenter", help="train the lung segmenter on the public lung masks (for --roi lungs), check it "
                                          "on patients it never saw, export it to ONNX with its card")
    sg.add_argument("--out", default="weights/lung-segmenter.onnx")
    sg.add_argument("--epochs", type=int, default=40)
    sg.add_argument("--batch-size", type=int, default=16)
    sg.add_argument("--val-frac", type=float, default=0.2, help="share of patients kept out to check it")
    sg.add_argument("--limit-patients", type=int, default=None, help="train on this many patients only (quick runs)")
    sg.add_argument("--check-sources", default="public,radiography",
                    help="data specs without masks on which the found-lungs rate is reported ('' for none)")
    sg.add_argument("--seed", type=int, default=0)
    sg.add_argument("--no-progress", action="store_true")
    sub.add_parser("archs", help="list registered architectures")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data.datasets import DataError
    from .data.preflight import UnreadableImages
    from .data.splits import SplitError
    from .networks.architectures import UnknownArchitecture
    from .networks.pretrained import PretrainedError

    try:
        if getattr(args, "float_head_convs", 0) < 0:  # before minutes of loading and evaluating, not after
            from .release.quantize import check_float_head

            check_float_head(args.float_head_convs)
        if args.cmd == "archs":
            from .networks.architectures import REGISTRY

            for s in REGISTRY.values():
                print(f"{s.name:20s} {s.input_size}px  {s.description}")
            print("(and any timm model name)")
        elif args.cmd == "train":
            from .training.train import train

            train(_config(args))
        elif args.cmd == "evaluate":
            from uplink_server.model import ModelNotFound

            from .evaluation.evaluate import evaluate, format_report

            try:
                res = evaluate(args.model, args.data, args.split, args.out, progress=not args.no_progress, zoom=args.zoom)
            except ModelNotFound as exc:
                raise DataError(str(exc)) from None
            if args.json:
                res.pop("predictions")  # per image: in metrics.json with --out, too long for a terminal
            print(json.dumps(res, indent=2) if args.json else format_report(res))
        elif args.cmd == "quantize":
            import random

            from .data.datasets import load_spec
            from .release.quantize import quantize_model

            recs = [r for spec in args.data for r in load_spec(spec) if r.split in ("", "train", "val")]
            random.Random(0).shuffle(recs)
            out = quantize_model(Path(args.model), Path(args.out), [r.path for r in recs], args.images, args.float_head_convs)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        elif args.cmd == "release":
            from .release.release import release

            card = release(Path(args.run), args.name, Path(args.out), args.version, quantize=not args.no_int8, notes=args.note,
                           float_head=args.float_head_convs)
            print(json.dumps({k: card["evaluation"][k]["accuracy"] for k in ("kermany_official_test", "run_test_split")}))
        elif args.cmd == "release-int8":
            from .release.release import release_int8

            print(json.dumps(release_int8(Path(args.out), args.name, float_head=args.float_head_convs), indent=2))
        elif args.cmd == "release-cascade":
            from .release.cascade import release_cascade

            section = release_cascade(Path(args.out), args.name, args.unseen, progress=not args.no_progress)
            print(json.dumps({k: section.get(k) for k in ("shipped", "why_not", "exit_probability", "validation", "parity")},
                             indent=2))
        elif args.cmd == "finish":
            from .training.train import finish

            finish(Path(args.run))
        elif args.cmd == "ensemble":
            from .release.ensemble import build

            build([Path(m) for m in args.models], Path(args.out), command="python -m model_training " + shlex.join(sys.argv[1:] if argv is None else argv), progress=not args.no_progress)
        elif args.cmd == "unpack":
            from .release.ensemble import unpack

            for folder in unpack(Path(args.model), Path(args.out)):
                print(folder / "model.onnx")
        elif args.cmd == "fit-gate":
            from .release.gate import refit_gate

            gate = refit_gate(Path(args.run))
            print(f"gate threshold {gate.threshold:.4f} written to {Path(args.run) / 'ood.npz'}")
        elif args.cmd == "uncertainty":
            from uplink_server.model import ModelNotFound

            from .evaluation.uncertainty import choose, describe

            try:
                rule = choose(Path(args.model), args.data, args.target_error, args.write_card, progress=not args.no_progress)
            except (ModelNotFound, FileNotFoundError) as exc:
                raise DataError(str(exc)) from None
            print(describe(rule) + (" Written to the card." if args.write_card else ""))
        elif args.cmd == "triage":
            from uplink_server.model import ModelNotFound

            from .evaluation.triage import choose, describe

            extra = dict(a.split("=", 1) for a in args.also if "=" in a)
            try:
                rule = choose(Path(args.model), args.data, args.target_sensitivity, args.write_card,
                              progress=not args.no_progress, extra_tests=extra)
            except (ModelNotFound, FileNotFoundError) as exc:
                raise DataError(str(exc)) from None
            print(describe(rule) + ("\nWritten to the card." if args.write_card else ""))
        elif args.cmd == "external":
            from .data.datasets import check_files, load_spec
            from .evaluation.external import full, limit_per_source, screen

            records = [r for spec in (args.data or ["mix"]) for r in load_spec(spec)]
            check_files(records)
            if args.limit_per_source:
                records = limit_per_source(records, args.limit_per_source, args.seed)
            if args.mode == "served":
                from .evaluation.external import served

                if not args.baseline_model:
                    raise DataError("--mode served needs --baseline-model: the shipped model to test on sources it never saw")
                report = served(Path(args.baseline_model), records, Path(args.out), progress=not args.no_progress)
            elif args.mode == "screen":
                report = screen(records, Path(args.out), [v.strip() for v in args.variants.split(",")],
                                [r.strip() for r in args.recipes.split(",")], args.arch, args.pretrained,
                                Path(args.baseline_model) if args.baseline_model else None, args.seed,
                                progress=not args.no_progress)
            else:
                report = full(records, _config(args, arch=args.arch, epochs=args.epochs, out=args.out), Path(args.out),
                              args.folds.split(",") if args.folds else None, progress=not args.no_progress)
            from .evaluation.external import markdown, write_to_card

            print(markdown(report))
            if args.write_card:
                write_to_card(Path(args.write_card), report, {"screen": args.card_recipe, "full": "full", "served": "served"}[args.mode],
                              "python -m model_training " + shlex.join(sys.argv[1:] if argv is None else argv),
                              Path(args.out) / "loso.png")
                print(f"recorded in the card of {args.write_card}")
            print(f"written: {Path(args.out) / 'loso.json'}, loso.md, loso.png")
        elif args.cmd == "segmenter":
            from .data.datasets import load_spec
            from .networks.segmenter import SegmenterConfig, card_markdown, train_segmenter

            cfg = SegmenterConfig(out=args.out, epochs=args.epochs, batch_size=args.batch_size, val_frac=args.val_frac,
                                  limit_patients=args.limit_patients, seed=args.seed, progress=not args.no_progress)
            check = {spec: load_spec(spec) for spec in filter(None, (s.strip() for s in args.check_sources.split(",")))}
            card = train_segmenter(cfg, "python -m model_training " + shlex.join(sys.argv[1:] if argv is None else argv), check)
            print(card_markdown(card))
        elif args.cmd == "ship-check":
            from uplink_server.model import find_card

            from .release.ship_rule import decide, load_result, parity

            card = None
            if args.candidate_model:
                card_path = find_card(Path(args.candidate_model))
                if card_path is None:
                    raise DataError(f"no model card beside {args.candidate_model}")
                card = json.loads(card_path.read_text())
            if args.parity:
                base_card = find_card(Path(args.parity)) if card is not None else None
                if base_card is None:
                    raise DataError("--parity needs --candidate-model and a model card beside the baseline model")
                verdict = parity(load_result(args.candidate), load_result(args.baseline), card,
                                 json.loads(base_card.read_text()))
            else:
                verdict = decide(load_result(args.candidate), load_result(args.baseline), args.tolerance, card)
            print(json.dumps(verdict, indent=2))
            return 0 if verdict["ships"] else 1
        elif args.cmd == "reference":
            from uplink_server.model import ModelNotFound

            from .release.reference import build, write

            try:
                ref = build(Path(args.model), args.data, progress=not args.no_progress)
            except (ModelNotFound, FileNotFoundError) as exc:
                raise DataError(str(exc)) from None
            print(f"reference of {ref['n']} validation images written to {write(Path(args.model), ref)}")
        elif args.cmd == "compare":
            from .training.compare import compare

            compare([a.strip() for a in args.archs.split(",")], [r.strip() for r in args.regimes.split(",")],
                    Path(args.out), _config(args), args.epochs)
    except (DataError, UnreadableImages, UnknownArchitecture, PretrainedError, SplitError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
