"""What a study's cells add up to: one CSV row per grid point (mean and std over seeds) and three
plots. Drawn with matplotlib's Agg canvas, without pyplot: no display, no global backend set."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..common.files import atomic_write

COLUMNS = (
    "setting", "tune", "shots", "n_md_prompts", "n_ie_prompts", "trainable_parameters", "n_seeds",
    "test_dice_mean", "test_dice_std", "val_dice_mean", "seconds_mean", "peak_gpu_gib_max",
)  # fmt: skip
_ORDER = {"MD": 0, "MD+IE": 1, "decoder": 2}


def summarize(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (setting, shots, prompt counts): the seeds' mean and sample std (0 for one seed)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in results:
        key = (r["setting"], r["tune"], r["shots"], r["n_md_prompts"], r["n_ie_prompts"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (setting, tune, shots, md, ie), cells in groups.items():
        dice = [float(c["test_dice"]) for c in cells]
        val = [float(c["val_dice"]) for c in cells if math.isfinite(float(c["val_dice"]))]
        peaks = [float(c["peak_gpu_gib"]) for c in cells if c.get("peak_gpu_gib") is not None]
        rows.append(
            {
                "setting": setting,
                "tune": tune,
                "shots": shots,
                "n_md_prompts": md,
                "n_ie_prompts": ie,
                "trainable_parameters": cells[0]["trainable_parameters"],
                "n_seeds": len(cells),
                "test_dice_mean": statistics.fmean(dice),
                "test_dice_std": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                "val_dice_mean": statistics.fmean(val) if val else float("nan"),
                "seconds_mean": statistics.fmean(float(c["seconds"]) for c in cells),
                "peak_gpu_gib_max": max(peaks) if peaks else None,  # None: not on a GPU
            }
        )
    rows.sort(key=lambda r: (_ORDER[r["setting"]], r["n_ie_prompts"], r["n_md_prompts"], r["shots"]))
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=COLUMNS)
            out.writeheader()
            for row in rows:
                out.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()})

    return atomic_write(path, write)


def _label(row: Mapping[str, Any]) -> str:
    if row["setting"] == "decoder":
        return f"decoder fine-tuned (+{row['n_md_prompts']} MD)"
    ie = f" + {row['n_ie_prompts']} IE/block" if row["n_ie_prompts"] else ""
    return f"{row['n_md_prompts']} MD{ie}"


def _series(rows: Sequence[Mapping[str, Any]], key: str, x: str) -> dict[Any, list[Mapping[str, Any]]]:
    out: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(row[key], []).append(row)
    return {k: sorted(v, key=lambda r: r[x]) for k, v in out.items()}


def _categorical(ax: Any, values: Sequence[int], label: str) -> dict[int, int]:
    """Evenly spaced ticks (shots and token counts are powers of two, 0 included)."""
    ax.set_xticks(range(len(values)), [str(v) for v in values])
    ax.set_xlabel(label)
    return {v: i for i, v in enumerate(values)}


def _panels(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """One panel per image-encoder token count (0: MD only)."""
    return sorted({r["n_ie_prompts"] for r in rows if r["tune"] == "prompts"}) or [0]


def _figure(n: int, title: str) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * n, 4.2), layout="constrained")
    axes = [fig.add_subplot(1, n, i + 1) for i in range(n)]
    fig.suptitle(title)
    for ax in axes:
        ax.set_ylabel("test Dice (mean ± std over seeds)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    return fig, axes


def _errorbar(ax: Any, xs: Sequence[float], rows: Sequence[Mapping[str, Any]], **style: Any) -> None:
    means, stds = [r["test_dice_mean"] for r in rows], [r["test_dice_std"] for r in rows]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, **style)


def _save(fig: Any, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))


def plot_dice_vs_shots(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    panels = _panels(rows)
    fig, axes = _figure(len(panels), "Dice vs training images")
    shots = sorted({r["shots"] for r in rows})
    baseline = [r for r in rows if r["tune"] == "decoder"]
    for ax, ie in zip(axes, panels, strict=True):
        at = _categorical(ax, shots, "training images (shots)")
        ax.set_title("MD only" if ie == 0 else f"MD + {ie} IE tokens per block")
        mine = [r for r in rows if r["tune"] == "prompts" and r["n_ie_prompts"] == ie]
        for series in _series(mine, "n_md_prompts", "shots").values():
            _errorbar(ax, [at[r["shots"]] for r in series], series, label=_label(series[0]))
        if baseline:
            series = sorted(baseline, key=lambda r: r["shots"])
            _errorbar(ax, [at[r["shots"]] for r in series], series, label=_label(series[0]), color="k", linestyle="--")
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_dice_vs_tokens(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    panels = _panels(rows)
    fig, axes = _figure(len(panels), "Dice vs mask-decoder tokens")
    prompt_rows = [r for r in rows if r["tune"] == "prompts"]
    tokens = sorted({r["n_md_prompts"] for r in prompt_rows}) or [0]
    for ax, ie in zip(axes, panels, strict=True):
        at = _categorical(ax, tokens, "mask-decoder tokens per class")
        ax.set_title("MD only" if ie == 0 else f"MD + {ie} IE tokens per block")
        for k, series in _series([r for r in prompt_rows if r["n_ie_prompts"] == ie], "shots", "n_md_prompts").items():
            _errorbar(ax, [at[r["n_md_prompts"]] for r in series], series, label=f"{k} shots")
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_parameters_vs_dice(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """At the largest shot count: what each setting gets for its trainable parameters."""
    shots = max(r["shots"] for r in rows)
    fig, (ax,) = _figure(1, f"Trainable parameters vs Dice ({shots} training images)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    top = [r for r in rows if r["shots"] == shots]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in top:
        groups.setdefault((r["setting"], r["n_ie_prompts"]), []).append(r)
    for (setting, ie), series in sorted(groups.items(), key=lambda g: (_ORDER[g[0][0]], g[0][1])):
        series.sort(key=lambda r: r["trainable_parameters"])
        label = {"MD": "MD prompts", "decoder": "decoder fine-tuned"}.get(setting, f"MD + {ie} IE tokens per block")
        style = {"color": "k", "linestyle": "--", "marker": "s"} if setting == "decoder" else {}
        means, stds = [r["test_dice_mean"] for r in series], [r["test_dice_std"] for r in series]
        xs = [r["trainable_parameters"] for r in series]
        ax.errorbar(xs, means, yerr=stds, capsize=3, label=label, **({"marker": "o"} | style))
    ax.legend(fontsize="small")
    return _save(fig, path)


def ie_gains(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """What image-encoder tokens add: for every MD+IE row, its test Dice minus that of the MD-only
    row with the same shots and MD tokens, with the two rows' standard errors combined."""
    md = {(r["shots"], r["n_md_prompts"]): r for r in rows if r["setting"] == "MD"}
    gains = []
    for r in rows:
        base = md.get((r["shots"], r["n_md_prompts"]))
        if r["setting"] != "MD+IE" or base is None:
            continue
        spread = sum(x["test_dice_std"] ** 2 / x["n_seeds"] for x in (r, base))
        gains.append({**r, "gain": r["test_dice_mean"] - base["test_dice_mean"], "gain_se": math.sqrt(spread)})
    return gains


def plot_ie_gain(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """MD+IE minus MD-only vs shots, a line per (MD, IE) token pair: above 0, the encoder's tokens help."""
    gains = ie_gains(rows)
    fig, (ax,) = _figure(1, "What image-encoder tokens add")
    ax.set_ylabel("test Dice, MD+IE minus MD only (± s.e.)")
    ax.set_ylim(auto=True)
    ax.axhline(0, color="k", linewidth=0.8)
    at = _categorical(ax, sorted({g["shots"] for g in gains}), "training images (shots)")
    for series in _series(gains, "n_md_prompts", "shots").values():
        for ie, line in _series(series, "n_ie_prompts", "shots").items():
            xs, ys, es = [at[g["shots"]] for g in line], [g["gain"] for g in line], [g["gain_se"] for g in line]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{line[0]['n_md_prompts']} MD + {ie} IE/block")
    ax.legend(fontsize="small")
    return _save(fig, path)


def write_plots(rows: Sequence[Mapping[str, Any]], folder: str | Path) -> list[Path]:
    """The three plots; and ``ie_gain_vs_shots.png`` where the grid has MD+IE and MD-only cells to pair."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = [
        plot_dice_vs_shots(rows, folder / "dice_vs_shots.png"),
        plot_dice_vs_tokens(rows, folder / "dice_vs_tokens.png"),
        plot_parameters_vs_dice(rows, folder / "parameters_vs_dice.png"),
    ]
    if ie_gains(rows):
        plots.append(plot_ie_gain(rows, folder / "ie_gain_vs_shots.png"))
    return plots
