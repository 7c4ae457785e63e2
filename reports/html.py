"""Assembling RUN/report.html: read the run directory, make the figures, fill the jinja2 template.

The page is one self-contained file: every figure is a PNG inlined as a ``data:`` URI, the CSS is
inline, there is no script and no reference to any other file or to the network. Parts the run
directory lacks are left out (and named in a note at the end), so a partial run still has a report.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from jinja2 import Environment, FileSystemLoader, select_autoescape

from vitsplit.errors import UserError
from vitsplit.fileio import atomic_write_text

from .rundir import RunData, read_run
from .sections import curve_figures, heatmap_figures, pca_figures, se_table, training_section
from .sweep import find_sweeps, sweep_section
from .text import dig, fmt_blocks, fmt_params, fmt_seconds
from .training import find_training_runs

TEMPLATE_DIR = Path(__file__).parent / "templates"


# ----------------------------------------------------------------------------------------- header
def weights_kind(data: RunData) -> tuple[str | None, str | None]:
    """("random" | "demo" | None, the weights source string)."""
    cfg = data.config or {}
    source = cfg.get("weights_source") or dig(cfg, "models", "pretrained", "weights_source")
    weights_opt = dig(cfg, "options", "weights")
    model = dig(cfg, "options", "model") or (data.recommendation or {}).get("model") or ""
    src = str(source) if source is not None else (str(weights_opt) if weights_opt is not None else None)
    if (src or "").startswith("random") or weights_opt == "random":
        return "random", src
    if model == "demo-vit" or "demo" in (src or "").lower():
        return "demo", src
    return None, src


def banners(data: RunData) -> list[dict[str, str]]:
    kind, src = weights_kind(data)
    model = dig(data.config, "options", "model") or (data.recommendation or {}).get("model") or "the backbone"
    out = []
    if kind == "random":
        out.append(
            {
                "kind": "danger",
                "title": "Random weights: this backbone was not pretrained",
                "text": f"{model} was analysed with randomly initialised weights ({src}). The CKA structure and "
                "the split below describe an untrained network, not a foundation model; use them to "
                "check the pipeline, not to choose a configuration.",
            }
        )
    elif kind == "demo":
        out.append(
            {
                "kind": "warn",
                "title": "Demo backbone: not a real foundation model",
                "text": f"{model} is the small ViT that 'cka-split demo' pretrains itself on synthetic scenes "
                f"(weights: {src or 'demo cache'}). It is not DINOv2; the findings illustrate the method "
                "on toy data.",
            }
        )
    return out


def header_rows(data: RunData) -> list[tuple[str, str]]:
    """(label, value) rows of the run's facts; rows whose value is unknown are dropped."""
    cfg = data.config or {}
    opts = cfg.get("options") or {}
    res = cfg.get("resolved") or {}
    rec = data.recommendation or {}
    cka = data.cka
    rows: list[tuple[str, Any]] = []
    pre = dig(cfg, "models", "pretrained") or {}
    layers = pre.get("num_layers") or rec.get("num_layers")
    arch = ", ".join(
        x
        for x in (
            f"{layers} blocks" if layers else "",
            f"width {pre['embed_dim']}" if pre.get("embed_dim") else "",
            f"patch {pre['patch_size']}" if pre.get("patch_size") else "",
        )
        if x
    )
    rows.append(
        ("Model", (opts.get("model") or rec.get("model") or pre.get("name") or "-") + (f" ({arch})" if arch else ""))
    )
    _, src = weights_kind(data)
    rows.append(("Weights", src))
    if pre.get("state_sha256"):
        rows.append(("Weights state sha256", pre["state_sha256"]))
    for name, m in (cfg.get("models") or {}).items():
        if name == "pretrained" or not isinstance(m, dict):
            continue
        bits = [str(m.get("origin") or "")]
        if m.get("steps"):
            bits.append(f"{m['steps']} steps")
        auto = m.get("auto") if isinstance(m.get("auto"), dict) else None
        if auto:
            accepted = auto.get("accepted_k_t") or []
            traj = ", ".join(
                f"{p[0]}: {p[1]}"
                + (
                    f" (accepted {'/'.join(map(str, accepted[i]))})"
                    if i < len(accepted) and len(accepted[i]) > 1
                    else ""
                )
                for i, p in enumerate(auto.get("k_t_trajectory") or [])
            )
            bits.append(
                f"--finetune-steps auto: {'stopped after' if auto.get('stopped_early') else 'ran all'} "
                f"{auto.get('steps_used')} of at most {auto.get('max_steps')} steps "
                f"(the accepted K_t unchanged for {auto.get('patience')} checks every {auto.get('check_every')} "
                f"steps ends it); K_t at each check (step: K_t): {traj or 'none'}"
            )
        if m.get("seconds") is not None:
            bits.append(f"fine-tuning took {fmt_seconds(m['seconds'])}")
        if m.get("data"):
            bits.append(f"on {m['data']}")
        if m.get("file"):
            bits.append(f"file {m['file']}")
        if m.get("state_sha256"):
            bits.append(f"state sha256 {str(m['state_sha256'])[:16]}...")
        rows.append((f"Task copy '{name}'", ", ".join(b for b in bits if b)))
    data_map = res.get("data") or {}
    if data_map:
        rows.append(("Data", "; ".join(f"{t}: {s}" for t, s in data_map.items())))
    if res.get("probe_spec"):
        rows.append(("Probe data", res["probe_spec"]))
    n_img = res.get("probe_images_used") or (cka.num_images if cka else None)
    if n_img:
        rows.append(("Probe images", f"{n_img}" + (f" at {opts['image_size']} px" if opts.get("image_size") else "")))
    feats = opts.get("features") or (cka.features if cka else None)
    if feats:
        rows.append(
            (
                "Feature mode",
                {
                    "tokens": "tokens (patch tokens, flattened per image)",
                    "mean": "mean of patch tokens",
                    "cls": "class token",
                }.get(feats, feats),
            )
        )
    unbiased = opts.get("unbiased", cka.unbiased if cka else None)
    if unbiased is not None:
        est = (
            "minibatch linear CKA, unbiased HSIC (Song et al. 2012; Nguyen et al. 2021)"
            if unbiased
            else "minibatch linear CKA, biased HSIC (Kornblith et al. 2019)"
        )
        if opts.get("batch_size"):
            est += f", {opts['batch_size']} images per minibatch"
        rows.append(("Estimator", est))
    if cfg.get("seed") is not None:
        rows.append(("Seed", str(cfg["seed"])))
    dev = ", ".join(str(x) for x in (res.get("device"), opts.get("precision")) if x)
    if dev:
        rows.append(("Device", dev))
    vers = cfg.get("versions") or {}
    if vers:
        rows.append(("Versions", ", ".join(f"{k} {v}" for k, v in vers.items() if k != "platform")))
        if vers.get("platform"):
            rows.append(("Platform", vers["platform"]))
    if cfg.get("started"):
        rows.append(("Started", cfg["started"]))
    if cfg.get("seconds") is not None:
        rows.append(("Time taken", fmt_seconds(cfg["seconds"])))
    rows.append(("Run directory", str(data.run_dir.resolve())))
    return [(k, str(v)) for k, v in rows if v not in (None, "", "-")]


# --------------------------------------------------------------------------------- recommendation
def recommendation_rows(data: RunData) -> list[dict[str, Any]]:
    rec = data.recommendation or {}
    L = rec.get("num_layers")
    rows = []
    for t, s in (rec.get("per_task") or {}).items():
        if not isinstance(s, dict):
            continue
        start = s.get("divergence_start")
        k_t, k_cka = s.get("k_t"), s.get("k_t_from_cka")
        rgn = s.get("rgn") if isinstance(s.get("rgn"), dict) else {}
        rows.append(
            {
                "task": t,
                "k_t": k_t,
                "task_head": fmt_blocks(s.get("task_head_layers") or []),
                "b": s.get("b", "-"),
                "k_p": s.get("k_p", "-"),
                "prior": ", ".join(map(str, s.get("prior_layers") or [])) or "-",
                "start": "flat (nothing beyond noise)"
                if start is None
                else f"{start} ({s.get('divergence_kind', 'step')})",
                "k_t_note": "; ".join(
                    x
                    for x in (
                        f"CKA alone gives {k_cka}" if k_cka is not None and k_cka != k_t else "",
                        f"RGN picks {rgn['k_t']}" if rgn.get("k_t") is not None else "",
                    )
                    if x
                ),
                "params": fmt_params(s.get("trainable_params")),
                "vs_full": (
                    "-"
                    if s.get("params_vs_full") is None
                    else f"{s['params_vs_full']:.2f}x"
                    + (" (larger than full fine-tuning)" if s.get("larger_than_full") else "")
                ),
                "avoided": "-" if s.get("backward_avoided") is None else f"{s['backward_avoided']:.0%}",
                "step": "-" if s.get("step_time_ratio_estimate") is None else f"{s['step_time_ratio_estimate']:.2f}x",
                "evidence": [str(e) for e in s.get("evidence") or []]
                + [
                    f"RGN rival ({rgn.get('batches')} minibatches, {fmt_seconds(rgn.get('seconds'))}): {e}"
                    for e in rgn.get("evidence") or []
                    if str(e) not in (s.get("evidence") or [])
                ],
                "summary": (
                    f"Copy the last {k_t} of {L} blocks ({fmt_blocks(s.get('task_head_layers') or [])}) as the {t} "
                    f"task head; "
                    f"the prior head reads blocks {', '.join(map(str, s.get('prior_layers') or []))}."
                    if k_t is not None and L
                    else ""
                ),
            }
        )
    return rows


def _budget(b: Any) -> str | None:
    """recommendation.json's max_trainable_params (a number or {task: number}) for the page."""
    if not b:
        return None
    if isinstance(b, dict):
        return ", ".join(f"{t} {fmt_params(v)}" for t, v in b.items())
    return fmt_params(b)


# ------------------------------------------------------------------------------------------ entry
def _section(name: str, make, data: RunData):
    """One part of the page; if the run directory holds something it cannot draw (an odd shape, a
    value of the wrong type), that part is left out and the note at the end says why, so that a
    report is still written at the end of a long analysis."""
    try:
        return make(data)
    except Exception as e:  # noqa: BLE001 -- reported on the page, not swallowed
        data.problems.append(f"The {name} could not be drawn ({type(e).__name__}: {e}); that part is left out.")
        return None


def report_context(data: RunData) -> dict[str, Any]:
    """Everything the template needs, figures rendered to data URIs."""
    rec = data.recommendation or {}
    model = dig(data.config, "options", "model") or rec.get("model") or "unknown model"
    ctx = {
        "model": model,
        "title": f"cka-split report: {model}",
        "banners": banners(data),
        "header": _section("run facts", header_rows, data) or [("Run directory", str(data.run_dir))],
        "heatmaps": _section("CKA heatmaps", heatmap_figures, data),
        "curves": _section("same-layer CKA curves", curve_figures, data),
        "se_table": _section("CKA +- SE table", se_table, data),
        "pca": _section("PCA maps", pca_figures, data),
        "rec_rows": _section("recommendation table", recommendation_rows, data),
        "shared_evidence": [],
        "rec_settings": ", ".join(f"{k}={v}" for k, v in (rec.get("settings") or {}).items()),
        "budget": _budget(rec.get("max_trainable_params")),
        "training": _section("training runs", lambda d: training_section(d.training), data),
        "sweeps": _section("K_t sweeps", lambda d: sweep_section(d, d.sweeps), data),
        "problems": data.problems,
        "generated": datetime.now().isoformat(timespec="seconds"),
    }
    rows = ctx["rec_rows"] or []
    if len(rows) > 1:  # sentences every task shares (the pretrained model's b, K_p, prior layers): once
        common = [e for e in rows[0]["evidence"] if all(e in r["evidence"] for r in rows[1:])]
        ctx["shared_evidence"] = common
        for r in rows:
            r["evidence"] = [e for e in r["evidence"] if e not in common]
    return ctx


def render_report(data: RunData) -> str:
    """The HTML text of the report for ``data``."""
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html").render(**report_context(data))


def resolve_run(run_dir: str | Path) -> Path:
    """A run directory, or a ``latest`` symlink / text file naming one."""
    p = Path(run_dir)
    if p.is_file():
        try:
            p = Path(p.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError):
            pass
    if not p.is_dir():
        raise UserError(f"{run_dir} is not a run directory; give one written by 'cka-split analyze'")
    if not any((p / n).exists() for n in ("config.json", "cka.npz", "recommendation.json")):
        raise UserError(
            f"{p} holds no config.json, cka.npz or recommendation.json; is it a run written by 'cka-split analyze'?"
        )
    return p


def build_report(
    run_dir: str | Path,
    *,
    training_runs: list[str | Path] | None = None,
    sweeps: list[str | Path] | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Write RUN/report.html from the run directory alone (plus any ``training_runs`` and ``sweeps``
    directories, and the training runs and sweeps linked to it, see :mod:`cka_split.reports.training`
    and :mod:`cka_split.reports.sweep`). Returns its path.

    ``warn`` is called with each part left out and why (the page lists them too)."""
    run = resolve_run(run_dir)
    data = read_run(run)
    data.training = find_training_runs(run, training_runs, data.problems)
    data.sweeps = find_sweeps(run, sweeps, data.problems)
    html = render_report(data)
    path = atomic_write_text(run / "report.html", html)
    for problem in data.problems if warn is not None else []:
        warn(problem)
    return path


__all__ = ["build_report", "render_report", "report_context"]
