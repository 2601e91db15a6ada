"""The performance page's plots (reliability, drift) as PNG, and its PDF and CSV exports (matplotlib)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display on a server
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def reliability_figure(rel: dict, t):
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label=t("perfect_calibration"))
    bins = rel["bins"]
    if bins:
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=0.09, alpha=0.7,
               label=t("agreement_by_confidence"))
        for b in bins:
            ax.annotate(str(b["n"]), ((b["lo"] + b["hi"]) / 2, b["accuracy"]), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(t("confidence_shown"))
    ax.set_ylabel(t("agreement_with_doctor"))
    ax.legend(fontsize=7, loc="upper left")
    return fig


def drift_figure(d: dict, t):
    stats = d.get("stats", {})
    fig, axes = plt.subplots(1, max(1, len(stats)), figsize=(3.0 * max(1, len(stats)), 2.6))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, (k, s) in zip(axes, stats.items()):
        x = range(len(s["site"]))
        ax.bar([i - 0.2 for i in x], s["reference"], width=0.4, label=t("model_card"))
        ax.bar([i + 0.2 for i in x], s["site"], width=0.4, label=t("this_site"))
        ax.set_title(f"{t('drift_' + k)} (PSI {s['psi']:.2f})", fontsize=9)
        ax.set_xticks([])
    axes[0].legend(fontsize=7)
    return fig


def page_images(m: dict, t) -> dict:
    out = {}
    if m["reliability"]["bins"]:
        out["reliability"] = _png(reliability_figure(m["reliability"], t))
    if m["drift"].get("stats"):
        out["drift"] = _png(drift_figure(m["drift"], t))
    return out


def performance_csv(perf: dict) -> str:
    from .spreadsheet import to_csv

    header = ["model", "class", "n", "sensitivity", "sensitivity_ci_low", "sensitivity_ci_high", "specificity",
              "specificity_ci_low", "specificity_ci_high", "cases", "reviewed", "agreement", "share_uncertain",
              "share_refused", "ece", "drift_large"]
    rows = []
    for version, m in perf["by_model"].items():
        # the site's triage (any abnormality, an other finding included) first, then each class
        for cls, pc in [("any_abnormality", {**m["triage"], "n": m["triage"]["abnormal"]}), *m["per_class"].items()]:
            sc, pcs = pc["sensitivity_ci95"] or (None, None), pc["specificity_ci95"] or (None, None)
            rows.append([version, cls, pc["n"], pc["sensitivity"], *sc, pc["specificity"], *pcs, m["cases"], m["reviewed"],
                         m["agreement"], m["share_uncertain"], m["share_refused"], m["reliability"]["ece"],
                         " ".join(m["drift"].get("large", []))])
    return to_csv(header, rows)


def performance_pdf(perf: dict, checks: dict, t, clinic: str = "") -> bytes:
    """One page per model version: the numbers as text, the reliability plot and the drift plot."""
    buf = io.BytesIO()
    with PdfPages(buf) as pdf:
        for version, m in perf["by_model"].items():
            fig = plt.figure(figsize=(8.27, 11.69))  # A4
            lines = [f"{t('performance')}{' - ' + clinic if clinic else ''}", f"{t('model')} {version}", "",
                     t("perf_counts").format(cases=m["cases"], analysed=m["analysed"], reviewed=m["reviewed"],
                                             compared=m["compared"])]
            for cls, pc in m["per_class"].items():
                sens = "-" if pc["sensitivity"] is None else f"{pc['sensitivity_k']}/{pc['sensitivity_n']} ({pc['sensitivity_ci95'][0]:.2f}-{pc['sensitivity_ci95'][1]:.2f})"
                spec = "-" if pc["specificity"] is None else f"{pc['specificity_k']}/{pc['specificity_n']} ({pc['specificity_ci95'][0]:.2f}-{pc['specificity_ci95'][1]:.2f})"
                lines.append(f"{t(cls)}: n={pc['n']}  {t('sensitivity')} {sens}  {t('specificity')} {spec}")
            if version == checks.get("version"):
                lines += [t("performance_warning_short").format(measure=t(w["measure"]), cls=t(w["class"])) for w in checks["warnings"]]
            d = m["drift"]
            lines += [t("drift_warning").format(stat=t("drift_" + k), psi=f"{d['stats'][k]['psi']:.2f}", threshold=d["threshold"],
                                                n=d["stats"][k]["n"]) for k in d.get("large", [])]
            tr = m["triage"]
            if tr["n"]:
                lines.append(f"{t('needs_read')}: {t('sensitivity')} {tr['sensitivity_k']}/{tr['sensitivity_n']}, "
                             f"{t('specificity')} {tr['specificity_k']}/{tr['specificity_n']}, {t('missed')} {tr['missed']}")
            lines += ["", t("notice")]
            fig.text(0.07, 0.95, "\n".join(lines), va="top", fontsize=9, wrap=True)
            if m["reliability"]["bins"]:
                ax = fig.add_axes([0.1, 0.35, 0.38, 0.25])
                _draw_into(ax, reliability_figure(m["reliability"], t))
            pdf.savefig(fig)
            plt.close(fig)
            if m["drift"].get("stats"):
                dfig = drift_figure(m["drift"], t)
                pdf.savefig(dfig)
                plt.close(dfig)
    return buf.getvalue()


def _draw_into(ax, fig) -> None:
    """Place a finished figure as an image in another figure's axes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    ax.imshow(plt.imread(buf))
    ax.axis("off")
