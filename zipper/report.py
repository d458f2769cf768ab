"""Per-depth results as a markdown table (like the paper's Table 1) and plots (like its Figures 3-4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .io import atomic_path, write_json, write_text

FIGSIZE, DPI = (9, 4.5), 150  # inches, dots per inch: 1350 px wide before the legend beside it


def flat_rows(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """One flat record per depth (what `dvc plots` and the table read)."""
    out = []
    for r in rows:
        flat = {
            "depth": r["depth"],
            "comp_conv": r["comp_conv"],
            "comp_params": r["comp_params"],
            "macs_ratio": r["macs_ratio"],
            "speedup": r["speedup"],
            "memory_comp": r["memory_comp"],
            "max_drop_pp": r["max_drop_pp"],
            "steps": r.get("steps"),
            "steps_to_recover": r.get("steps_to_recover"),
        }
        for t in tasks:
            flat[f"acc_{t}"] = 100 * r["acc"][t]
            flat[f"drop_{t}"] = r["drop_pp"][t]
            flat[f"teacher_{t}"] = 100 * r["teacher_acc"][t]  # a flat reference line in `dvc plots`
        out.append(flat)
    return out


def summary(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """The few numbers people compare between runs (`dvc metrics diff`, `dvc exp show`): the teachers'
    accuracy, then per depth the worst drop, each task's accuracy, speedup and MACs ratio."""
    out: dict[str, Any] = {"teacher_acc": {t: round(100 * rows[0]["teacher_acc"][t], 2) for t in tasks}}
    for r in flat_rows(rows[1:], tasks):
        out[f"depth_{r['depth']}"] = {
            "worst_drop": round(r["max_drop_pp"], 2),
            **{f"acc_{t}": round(r[f"acc_{t}"], 2) for t in tasks},
            "speedup": round(r["speedup"], 2),
            "macs_ratio": round(r["macs_ratio"], 2),
        }
    return out


def markdown_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    head = (
        ["depth", "comp (conv)", "comp (params)", "MACs ratio", "speedup", "memory"]
        + [f"acc {t} (%)" for t in tasks]
        + ["worst drop (pp)", "steps", "within 1 pt at step"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in flat_rows(rows, tasks):
        cells = [
            str(r["depth"]),
            fmt(r["comp_conv"], ".3f"),
            fmt(r["comp_params"], ".3f"),
            fmt(r["macs_ratio"], ".2f"),
            fmt(r["speedup"], ".2f"),
            fmt(r["memory_comp"], ".2f"),
        ]
        cells += [f"{r[f'acc_{t}']:.2f} ({-r[f'drop_{t}']:+.2f})" for t in tasks]
        cells += [f"{r['max_drop_pp']:.2f}", fmt(r["steps"], "d"), fmt(r["steps_to_recover"], "d")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], tasks: Sequence[str], out_dir: Path) -> list[Path]:
    """accuracy.png: accuracy per task against depth, speedup on the right axis (the paper's Fig. 3-4);
    ratios.png: speedup, compression and memory against depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = flat_rows(rows, tasks)
    depths = [r["depth"] for r in flat]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for t in tasks:
        (line,) = ax.plot(depths, [r[f"acc_{t}"] for r in flat], marker="o", label=f"{t} (zipper)")
        ax.axhline(100 * rows[0]["teacher_acc"][t], ls=":", color=line.get_color(), label=f"{t} (teacher)")
    ax.set(xlabel="shared blocks (depth)", ylabel="top-1 accuracy (%)", title="Accuracy and speedup over zipper depth")
    right = ax.twinx()
    right.plot(depths, [r["speedup"] for r in flat], color="black", ls="--", marker="s", label="speedup")
    right.set_ylabel("speedup (x)")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    # below: never on a point
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8)
    paths = [_save(fig, out_dir / "accuracy.png")]

    fig, ax = plt.subplots(figsize=FIGSIZE)
    for key, label in [
        ("speedup", "speedup"),
        ("macs_ratio", "MACs ratio"),
        ("comp_params", "compression (params)"),
        ("comp_conv", "compression (conv weights)"),
        ("memory_comp", "runtime memory"),
    ]:
        if all(r[key] is not None for r in flat):
            ax.plot(depths, [r[key] for r in flat], marker="o", label=label)
    ax.set(xlabel="shared blocks (depth)", ylabel="teachers / zipper (x)", title="Savings over zipper depth")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the axes, never on a point
    paths.append(_save(fig, out_dir / "ratios.png"))
    return paths


def _save(fig, path: Path) -> Path:
    """PNG (>= 1200 px wide) and SVG beside it; the same bytes for the same rows (no dates, fixed SVG ids)."""
    import matplotlib.pyplot as plt

    with plt.rc_context({"svg.hashsalt": "zipper"}):
        for fmt in ("png", "svg"):
            with atomic_path(path.with_suffix(f".{fmt}")) as tmp:
                fig.savefig(
                    tmp, format=fmt, dpi=DPI, bbox_inches="tight", metadata={"Date": None} if fmt == "svg" else {}
                )
    plt.close(fig)
    return path


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | Path, *, tasks: Sequence[str]) -> str:
    """Write table.md, summary.json, depths.json and the plots into `out_dir`; return the markdown table."""
    out_dir = Path(out_dir)
    table = markdown_table(rows, tasks)
    r0 = rows[0]
    inits = ", ".join(sorted({r["init"] for r in rows if r["init"]})) or "-"  # as each checkpoint records it
    header = (
        f"# Zipper report\n\nscope `{r0['scope']}`, init `{inits}`; teachers: "
        + ", ".join(f"{t} {100 * r0['teacher_acc'][t]:.2f}%" for t in tasks)
        + ". Ratios are teachers run one after the other / zipper (bigger is better); "
        "accuracy in brackets: change against the teacher in points.\n\n"
    )
    write_text(out_dir / "table.md", header + table + "\n![accuracy](accuracy.png)\n![ratios](ratios.png)\n")
    write_json(out_dir / "summary.json", summary(rows, tasks))
    write_json(out_dir / "depths.json", flat_rows(rows, tasks))
    plot(rows, tasks, out_dir)
    return table
