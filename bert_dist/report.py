"""The run report and model card: `report.html` (matplotlib charts, inline SVG) and `README.md` in a run directory.

Written at the end of every run (run.py, main process) and by `bert-dist report RUN_DIR`. Both are read back
from the run's own files, so an old or copied run directory can be reported on again:

    run_config.json   the flags              results.json     final metrics, speed, hardware
    train_log.jsonl   loss, lr, throughput, gradient norm at each log step (train.py)
    metrics.jsonl     every evaluation       config.json      the architecture and the task

The charts are matplotlib's SVG, inline in the page, so the report is one self-contained file that needs no
JavaScript and no network to open.
"""

from __future__ import annotations

import datetime
import html
import io
import json
import logging
import math
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

SKIPPED_EVAL_KEYS = ("step", "epoch")
PIPELINE_TAGS = {"classification": "text-classification", "multi_label": "text-classification",
                 "regression": "text-classification", "qa": "question-answering", "pretrain": "fill-mask"}
HF_CLASSES = {"classification": "AutoModelForSequenceClassification",
              "multi_label": "AutoModelForSequenceClassification",
              "regression": "AutoModelForSequenceClassification",
              "qa": "AutoModelForQuestionAnswering", "pretrain": "BertForPreTraining"}


def describe_hardware(accelerator: Any) -> dict[str, Any]:
    """What the run ran on, for results.json (the report is often written later, elsewhere)."""
    import torch

    dev = accelerator.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {"device": name, "device_type": dev.type, "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


# ---------------------------------------------------------------------------------------------
# Reading a run


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a kill
                continue
    return rows


def read_run(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows, from the run's files (missing files read as empty)."""
    model_cfg = _read_json(run_dir / "config.json")
    return {"dir": run_dir, "config": _read_json(run_dir / "run_config.json"),
            "results": _read_json(run_dir / "results.json"), "model": model_cfg,
            "meta": model_cfg.get("bert_dist", {}), "train_log": _read_jsonl(run_dir / "train_log.jsonl"),
            "evals": _read_jsonl(run_dir / "metrics.jsonl")}


def _series(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["step"], float(r[key])) for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]


def eval_groups(evals: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Evaluation keys by chart: losses, perplexity and scores differ in scale, so each gets its own
    chart; counts and thresholds (SQuAD v2's *_total, *_thresh) are not curves worth drawing."""
    keys: list[str] = []
    for r in evals:
        keys += [k for k, v in r.items() if k not in keys and k not in SKIPPED_EVAL_KEYS
                 and isinstance(v, (int, float)) and not k.endswith(("total", "thresh"))]
    groups: dict[str, list[str]] = {"Evaluation metrics": [], "Evaluation loss": [], "Perplexity": []}
    for k in keys:
        groups["Evaluation loss" if "loss" in k else "Perplexity" if "perplexity" in k else "Evaluation metrics"] += [k]
    return {title: ks for title, ks in groups.items() if ks}


# ---------------------------------------------------------------------------------------------
# Charts: matplotlib's SVG, inline


CHART_STYLE = {
    "svg.fonttype": "none",  # text stays text: a tenth of the size of glyph paths, selectable, searchable
    "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"], "font.size": 9,
    "axes.titlesize": 12, "axes.titleweight": "bold", "axes.titlelocation": "left",
    "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#888", "axes.labelcolor": "#444",
    "axes.grid": True, "axes.grid.axis": "y", "grid.color": "#e6e8eb", "xtick.color": "#555", "ytick.color": "#555",
    "axes.formatter.limits": (-3, 5),  # 2e-5 as 2 under the axis's 1e-5, not 0.00002
    "legend.frameon": False, "legend.fontsize": 9, "lines.linewidth": 1.8, "lines.markersize": 5,
}
"""matplotlib settings of the charts, applied in an `rc_context` (the caller's rcParams are left as they were)."""


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "optimizer step",
               markers: bool | None = None, x_max: float | None = None, y_cap: float | None = None,
               from_zero: bool = False) -> str:
    """A `<figure class="chart">` holding an inline SVG line chart of named (x, y) series, drawn by matplotlib:
    title, axis label, legend (two series or more), markers (up to 40 points a series, or `markers=True`).
    Each series is an SVG group with the id `chart_id(title, name)`. "" when every series is empty.

    `x_max`: the x axis reaches at least this far (the run's last step); `y_cap`: the axis never goes above it
    when the data stays below (1 for accuracy); `from_zero`: the axis starts at 0 (throughput).
    """
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    # matplotlib's own ids (clip paths, markers) are hashes salted with the title: the same on every write, and
    # distinct between the charts of one page.
    with matplotlib.rc_context({**CHART_STYLE, "svg.hashsalt": title}):
        fig = _figure(title, series, x_label, markers, x_max, y_cap, from_zero)
        out = io.StringIO()
        FigureCanvasSVG(fig).print_svg(out, metadata={k: None for k in ("Creator", "Date", "Format", "Type")})
    svg = out.getvalue()
    return f'<figure class="chart">{svg[svg.index("<svg"):]}</figure>'  # inline in HTML: no XML prolog, DOCTYPE


def _figure(title: str, series: dict[str, list[tuple[float, float]]], x_label: str, markers: bool | None,
            x_max: float | None, y_cap: float | None, from_zero: bool) -> Figure:
    """The matplotlib figure of `line_chart` (series not empty; drawn under `CHART_STYLE`)."""
    from matplotlib.figure import Figure  # not pyplot: no global figure list, no interactive backend

    show_markers = markers if markers is not None else max(len(p) for p in series.values()) <= 40
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    # Margins in inches rather than a layout engine (constrained layout doubles the drawing time); the legend,
    # 4 entries a row, sits between the title and the plot.
    legend_rows = -(-len(series) // 4) if len(series) > 1 else 0
    width, height = 5.6, 3.1 + 0.22 * legend_rows
    fig = Figure(figsize=(width, height))
    ax = fig.subplots(gridspec_kw=dict(left=0.7 / width, right=1 - 0.3 / width, bottom=0.5 / height,
                                       top=1 - (0.45 + 0.22 * legend_rows) / height))
    for name, pts in series.items():
        line, = ax.plot([x for x, _ in pts], [y for _, y in pts], label=name,
                        marker="o" if show_markers or len(pts) == 1 else None, clip_on=False)  # whole markers
        line.set_gid(chart_id(title, name))
    ax.set_title(title, pad=14 + 0.22 * 72 * legend_rows)  # above the axis's 1e-5
    ax.set_xlabel(x_label)
    ax.set_xlim(min(0.0, min(xs)), max(max(xs), x_max or 0.0) or 1.0)
    lo, hi = ax.get_ylim()
    if from_zero or min(ys) >= 0 > lo:  # never a negative axis for a quantity that is never negative
        lo = 0.0
    if y_cap is not None and max(ys) <= y_cap:
        hi = min(hi, y_cap)
    ax.set_ylim(lo, hi)
    if legend_rows:
        ax.legend(loc="lower left", bbox_to_anchor=(0, 1), ncols=4, borderaxespad=0.3, handlelength=1.5)
    return fig


def chart_id(title: str, name: str) -> str:
    """The SVG id of series `name` in the chart `title`: "training-loss.loss"."""
    slug = lambda text: re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return f"{slug(title)}.{slug(name)}"


# ---------------------------------------------------------------------------------------------
# The HTML report

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:28px 0 10px} .sub{color:#666;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:10px 16px;min-width:130px}
.card .v{font-size:24px;font-weight:600} .card .k{color:#666;font-size:13px}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px}
.chart{background:#fff;border:1px solid #dde1e6;border-radius:8px;margin:0;padding:4px}
.chart svg{display:block;width:100%;height:auto}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e6;font-size:14px}
td,th{padding:4px 12px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums} th{background:#f0f2f5}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:18px;align-items:start}
.config{grid-template-columns:repeat(auto-fit,minmax(420px,1fr))} .config td.n{text-align:left}
.cols table{width:100%} .cols td:first-child{white-space:nowrap;width:1%} .cols td+td{overflow-wrap:anywhere}
.note{color:#666;font-size:13px} details{margin-top:12px} summary{cursor:pointer} .wide{overflow-x:auto}
"""


def fmt_number(v: float) -> str:
    """Short, readable numbers: 3.0e-5, 0.0012, 0.873, 12.5, 1,234, 12.3k, 1.2M."""
    a = abs(v)
    if v == 0:
        return "0"
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:,.0f}"
    if a < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-")
    return f"{v:.4g}"


def _metric(v: float) -> str:
    """Scores in [-1, 1] with four decimals (0.9000, not 0.9), other floats short."""
    return f"{v:.4f}" if 1e-3 <= abs(v) <= 1 else fmt_number(v) if abs(v) >= 100 or v == 0 or abs(v) < 1e-3 \
        else f"{v:.4g}"


SPEED_KEYS = ("steps", "epochs", "train_seconds", "examples_per_second", "tokens_per_second", "num_params",
              "max_length", "skipped_steps", "nonfinite_steps")
"""results.json numbers that are not scores."""


def _result_number(key: str, v: float) -> str:
    if key in SPEED_KEYS:
        return fmt_number(v) if abs(v) >= 1e4 else f"{v:,.1f}" if abs(v) >= 100 else f"{v:.4g}"
    return _metric(v)


def _table(rows: dict[str, Any], head: tuple[str, str] | None = None,
           number: Callable[[str, float], str] = lambda k, v: str(v)) -> str:
    """A two-column table; floats through `number(key, value)` (as written, by default: flags as they were given)."""
    if not rows:
        return "<p class='note'>not recorded</p>"
    cells = []
    for k, v in rows.items():
        if isinstance(v, float):
            cell = f'<td class="n">{html.escape(number(k, v))}</td>'
        elif isinstance(v, int) and not isinstance(v, bool):
            cell = f'<td class="n">{v:,}</td>'
        else:
            cell = f"<td>{html.escape('' if v is None else str(v))}</td>"
        cells.append(f"<tr><td>{html.escape(str(k))}</td>{cell}</tr>")
    th = f"<tr><th>{head[0]}</th><th>{head[1]}</th></tr>" if head else ""
    return f"<table>{th}{''.join(cells)}</table>"


def _evaluations_table(evals: list[dict[str, Any]], keys: list[str]) -> str:
    """The numbers behind the evaluation charts: one row per evaluation, folded away under a summary line."""
    cell = lambda v: _metric(float(v)) if isinstance(v, (int, float)) else ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ("step", *keys))
    rows = "".join(f"<tr><td class='n'>{r.get('step', '')}</td>" + "".join(f"<td class='n'>{cell(r.get(k))}</td>"
                                                                        for k in keys) + "</tr>" for r in evals)
    return (f"<details><summary>Every evaluation ({len(evals)})</summary>"
            f"<div class='wide'><table><tr>{head}</tr>{rows}</table></div></details>")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else \
        f"{seconds:.1f}s"


def _main_metric(run: dict[str, Any]) -> tuple[str, float] | None:
    res = run["results"]
    name = res.get("main_metric")
    if name is None:
        return None
    key = name if name in res else next((k for k in res if k.endswith("/" + name)), None)
    return (key, res[key]) if key is not None and isinstance(res[key], (int, float)) else None


def render_html(run: dict[str, Any]) -> str:
    """The report page of one run (see the module docstring for what it reads)."""
    cfg, res, meta, logs, evals = run["config"], run["results"], run["meta"], run["train_log"], run["evals"]
    task = meta.get("task") or res.get("task") or cfg.get("task", "run")
    steps = res.get("steps") or max((r.get("step", 0) for r in logs), default=0) or None
    cards = []
    main = _main_metric(run)
    if main:
        cards.append((f"{main[0]} (final)", _metric(float(main[1]))))
    if steps:
        cards.append(("optimizer steps", f"{steps:,}"))
    if "train_seconds" in res:
        cards.append(("training time", _duration(res["train_seconds"])))
    if "examples_per_second" in res:
        cards.append(("examples / s", fmt_number(res["examples_per_second"])))
    if "tokens_per_second" in res:
        cards.append(("tokens / s", fmt_number(res["tokens_per_second"])))
    if "num_params" in res:
        cards.append(("parameters", fmt_number(res["num_params"])))

    charts = [line_chart("Training loss", {"loss": _series(logs, "loss")}, x_max=steps),
              line_chart("Learning rate", {"lr": _series(logs, "lr")}, x_max=steps)]
    charted = eval_groups(evals) if len(evals) > 1 else {}  # one evaluation: see Results
    for title, keys in charted.items():
        series = {k: _series(evals, k) for k in keys}
        ys = [y for pts in series.values() for _, y in pts]
        cap = 1.0 if ys and max(ys) <= 1 else 100.0 if ys and max(ys) <= 100 else None  # a fraction or percent
        if len(keys) == 1 and keys[0].lower() not in title.lower():  # name the metric: one line has no legend
            title = f"{title.replace('metrics', 'metric')}: {keys[0]}"
        charts.append(line_chart(title, series, x_max=steps, markers=True,
                                 y_cap=cap if title.startswith("Evaluation metric") else None))
    charts += [line_chart("Throughput (examples / s)", {"examples/s": _series(logs, "examples/s")}, x_max=steps,
                          from_zero=True),
               line_chart("Gradient norm (before clipping)", {"grad_norm": _series(logs, "grad_norm")}, x_max=steps)]
    charts = [c for c in charts if c]

    hw = res.get("hardware", {})
    hardware = {"device": hw.get("device"), "processes": hw.get("num_processes"),
                "mixed precision": hw.get("mixed_precision"), "CPU cores": hw.get("cpu_count"),
                "torch threads": hw.get("torch_threads"), "torch": hw.get("torch"), "python": hw.get("python")}
    arch = {k: run["model"].get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                "intermediate_size", "vocab_size", "max_position_embeddings")
            if k in run["model"]}
    results = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    run_flags = {k: v for k, v in cfg.items() if not isinstance(v, dict) and v is not None}
    if cfg.get("init") not in (None, "scratch") and "preset" in run_flags:  # the model came from --init
        run_flags["preset"] = f"{run_flags['preset']} (unused: the model comes from --init)"
    groups = {"run": run_flags,
              **{g: {k: v for k, v in cfg[g].items() if v is not None} for g in ("data", "optim", "train")
                 if isinstance(cfg.get(g), dict)}}
    when = datetime.datetime.fromtimestamp((run["dir"] / "results.json").stat().st_mtime) \
        if (run["dir"] / "results.json").is_file() else datetime.datetime.now()

    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(task)} run report"
             f"</title><meta name='viewport' content='width=device-width,initial-scale=1'><style>{CSS}</style>"
             "</head><body><main>",
             f"<h1>{html.escape(task)} &mdash; run report</h1>",
             f"<p class='sub'>{html.escape(str(run['dir']))} &middot; init {html.escape(str(cfg.get('init', '?')))}"
             f" &middot; finished {when:%Y-%m-%d %H:%M}</p>",
             "<div class='cards'>" + "".join(f"<div class='card'><div class='v'>{html.escape(v)}</div>"
                                             f"<div class='k'>{html.escape(k)}</div></div>" for k, v in cards)
             + "</div>"]
    notes = []
    if not logs and steps:
        notes.append("No train_log.jsonl in this run (it predates it): no loss, learning-rate or throughput curves.")
    if len(evals) == 1:
        notes.append(f"One evaluation, at step {evals[0].get('step')}: its metrics are under Results.")
    parts += ["<h2>Training</h2>", *[f"<p class='note'>{html.escape(n)}</p>" for n in notes]]
    if charts:
        parts += ["<div class='charts'>", *charts, "</div>"]
    if charted:
        parts.append(_evaluations_table(evals, [k for keys in charted.values() for k in keys]))
    parts += ["<div class='cols'>",
              f"<div><h2>Results</h2>{_table(results, ('metric', 'value'), _result_number)}</div>",
              f"<div><h2>Model</h2>{_table({'task': task, 'kind': meta.get('kind'), **arch})}</div>",
              f"<div><h2>Hardware</h2>{_table({k: v for k, v in hardware.items() if v is not None})}</div>",
              "</div><h2>Configuration <span class='note'>(run_config.json: the flags, defaults included)</span></h2>"
              "<div class='cols config'>",
              *[f"<div>{_table(rows, (group, ''))}</div>" for group, rows in groups.items()],
              "</div></main></body></html>"]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# The model card


def render_model_card(run: dict[str, Any]) -> str:  # noqa: C901 - a template: one branch per optional section
    """README.md for the run directory (and for its Hugging Face export): what it is, how well it does,
    how it was trained, on what, and how to load it."""
    cfg, res, meta = run["config"], run["results"], run["meta"]
    data, optim, train = cfg.get("data", {}), cfg.get("optim", {}), cfg.get("train", {})
    task, kind = meta.get("task") or res.get("task") or cfg.get("task", "?"), meta.get("kind", "")
    hub_path = _hub_path(task)
    named = data.get("dataset_name")
    source = (_named_source(data) if named else
              f"`--data-dir {data['data_dir']}`" if data.get("data_dir") else
              f"`--train-file {data['train_file']}`" if data.get("train_file") else
              f"the Hugging Face hub (`{hub_path}`)" if hub_path else "?")
    if cfg.get("smoke"):
        source += " (synthetic `--smoke` data)"
    run_dir = str(run["dir"])
    hw = res.get("hardware", {})
    front = ["---", "library_name: transformers", "tags: [bert, bert-dist]"]
    if kind in PIPELINE_TAGS:
        front.append(f"pipeline_tag: {PIPELINE_TAGS[kind]}")
    if hub_path and not cfg.get("smoke") and not data.get("train_file"):
        front.append(f"datasets: [{hub_path}]")
    elif named and not data.get("data_dir") and not Path(named).expanduser().is_dir():  # a hub id
        front.append(f"datasets: [{named}]")
    if res.get("main_metric"):
        front.append(f"metrics: [{res['main_metric']}]")
    front.append("---")

    init = cfg.get("init", "scratch")
    if init == "scratch":
        what = f"trained from scratch (`--init scratch`, preset `{cfg.get('preset')}`)"
    else:
        what = f"fine-tuned from `{init}`"
    lines = [*front, "", f"# {task}: BERT {what}", "",
             f"A BERT model ({kind or 'encoder'} head) trained with bert-dist on {task}, data from {source}.", ""]
    names = meta.get("label_names") or []
    if kind in ("classification", "multi_label") and names:
        shown = ", ".join(f"`{n}`" for n in names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
        lines += [f"Labels ({len(names)}, by id): {shown}.", ""]
    metrics = {k: v for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and k not in SPEED_KEYS}
    if metrics:
        lines += ["## Results", "", "Evaluation of the final weights on the validation split(s):", "",
                  "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    batch, procs, accum = data.get("batch_size"), hw.get("num_processes", 1), train.get("grad_accum", 1)
    warmup = f"warmup {optim['warmup_steps']} steps" if optim.get("warmup_steps") else \
        f"warmup {optim['warmup_ratio']:g} of the steps" if optim.get("warmup_ratio") else "no warmup"
    hyper = {"learning rate": optim.get("lr"), "schedule": f"{optim.get('scheduler')}, {warmup}",
             "batch size": f"{batch * procs * accum} ({batch} x {procs} process(es) x {accum} accumulation)"
             if batch else None,
             "optimizer steps": res.get("steps"), "epochs": res.get("epochs"),
             "weight decay": optim.get("weight_decay"), "max gradient norm": optim.get("max_grad_norm"),
             "max sequence length": res.get("max_length") or data.get("max_length"),
             "mixed precision": hw.get("mixed_precision") or cfg.get("mixed_precision"), "seed": cfg.get("seed")}
    lines += ["## Training", "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items() if v is not None]
    lines += ["", "The full configuration is in `run_config.json`; curves and tables in `report.html`.", ""]
    if hw:
        speed = (f"{res['train_seconds']:.0f} s of training, {res.get('examples_per_second', 0):,.1f} examples/s, "
                 f"{res.get('tokens_per_second', 0):,.0f} tokens/s") if "train_seconds" in res else ""
        lines += ["## Hardware", "", f"{hw.get('num_processes', 1)} process(es) on {hw.get('device')} "
                  f"({hw.get('device_type')}), torch {hw.get('torch')}" + (f"; {speed}." if speed else "."), ""]
    lines += ["## How to use", "", "With bert-dist:", "", "```bash"]
    if kind in ("classification", "multi_label", "regression"):
        lines.append(f'bert-dist predict --model {run_dir} --text "A sentence to classify."')
    elif kind == "qa":
        lines.append(f'bert-dist predict --model {run_dir} --text "Who wrote it?" --text-pair "It was written by Ada."')
    lines += [f"bert-dist train --task <task> --init {run_dir}   # fine-tune further",
              f"bert-dist export --model {run_dir} --format hf --out hf-model", "```", ""]
    cls = HF_CLASSES.get(kind)
    if cls:
        lines += ["After the export, with transformers:", "", "```python",
                  f"from transformers import AutoTokenizer, {cls}", "",
                  'tokenizer = AutoTokenizer.from_pretrained("hf-model")',
                  f'model = {cls}.from_pretrained("hf-model")']
        if kind == "classification":
            lines += ['logits = model(**tokenizer("A sentence to classify.", return_tensors="pt")).logits',
                      "print(model.config.id2label[logits.argmax(-1).item()])"]
        elif kind == "multi_label":
            lines += ['logits = model(**tokenizer("A sentence to classify.", return_tensors="pt")).logits[0]',
                      "print([model.config.id2label[i] for i, x in enumerate(logits) if x > 0])  # sigmoid > 0.5"]
        elif kind == "regression":
            lines += ['print(model(**tokenizer("A sentence.", "Another one.", return_tensors="pt")).logits.item())']
        elif kind == "qa":
            lines += ['inputs = tokenizer("Who wrote it?", "It was written by Ada.", return_tensors="pt")',
                      "out = model(**inputs)",
                      "start, end = out.start_logits.argmax(), out.end_logits.argmax()",
                      "print(tokenizer.decode(inputs.input_ids[0, start : end + 1]))"]
        lines += ["```", ""]
    return "\n".join(lines)


def _named_source(data: dict[str, Any]) -> str:
    """--dataset-name (own data) as the model card names it."""
    text = f"`--dataset-name {data['dataset_name']}`"
    if data.get("dataset_config"):
        text += f" (config `{data['dataset_config']}`)"
    return text + (f" in `--data-dir {data['data_dir']}`" if data.get("data_dir") else "")


def _hub_path(task: str) -> str | None:
    try:
        from bert_dist.data import TASKS
    except ImportError:
        return None
    return TASKS[task].hub_path if task in TASKS else None


def write_report(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.html and, when the run saved a model (a --task tokenizer run does not), README.md into
    `run_dir`; returns the paths written, by name ("report", "model_card")."""
    d = Path(run_dir)
    if not (d / "run_config.json").is_file() and not (d / "results.json").is_file():
        raise ValueError(f"{d} is not a bert-dist run directory (no run_config.json or results.json)")
    run = read_run(d)
    paths = {"report": d / "report.html"}
    paths["report"].write_text(render_html(run), encoding="utf-8")
    if (d / "model.safetensors").is_file():
        paths["model_card"] = d / "README.md"
        paths["model_card"].write_text(render_model_card(run), encoding="utf-8")
    return paths


def write_reports(run_dir: str | os.PathLike) -> list[Path]:
    """`bert-dist report RUN_DIR`: (re)write a run's report.html and README.md; a suite's (--task glue, --seeds), for
    every run in it; returns the paths written."""
    d = Path(run_dir)
    sweep = _read_json(d / "sweep_results.json")
    entries = [*_read_json(d / "glue_results.json").get("tasks", {}).values(), *([sweep] if sweep else [])]
    dirs = [Path(r["output_dir"]) for t in entries for r in t.get("runs") or [t] if "output_dir" in r] or [d]
    return [path for one in dirs for path in write_report(one).values()]
