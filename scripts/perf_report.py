#!/usr/bin/env python3
"""Summarise the `overhead` criterion benchmark: Markdown tables and an SVG chart.

Usage (from the repository root):

    cargo bench --bench overhead && python3 scripts/perf_report.py --subtitle "..."

for example `--subtitle "2-core VM, rustc 1.80, 2024-06-01"`.

The script reads criterion's saved estimates,
`<target>/criterion/<group>/<row>/new/estimates.json`, for the four groups of
`benches/overhead.rs` (current-thread / multi-thread runtime, inner service ready at once /
pending once) and each of their rows. `<target>` is, in order of precedence, `--target DIR`,
the `CARGO_TARGET_DIR` environment variable, or `target/` at the repository root. Missing
groups and rows are skipped with a note on stderr (e.g. after a filtered `cargo bench` run,
whatever an earlier run left behind is read as well: run the whole bench for a consistent
picture). The `pieces` group is not read.

For each group it computes every layer's overhead over the `bare` row (row mean - bare mean,
in ns added per request) and the ratios the project's targets are stated in:

- ours `ResponseTimeout` / `tower::timeout` (target <= 1.0);
- ours full stack / tower-http `Timeout` + on-early-drop (target <= 0.5);
- ours full stack with a subscriber / tower-http `Trace` + `Timeout` + on-early-drop with the
  same subscriber (target <= 1.0).

Output:

- on stdout, a Markdown table of the overheads (layers x groups) and one of the ratios with
  their targets; `--markdown FILE` also writes it to FILE, `--ci` adds each overhead's
  interval (see below);
- an SVG chart, hand-written (no dependency beyond the standard library), at
  `docs/overhead.svg` under the repository root unless `--svg PATH` says otherwise
  (`--no-svg` skips it).

Intervals: criterion gives a 95% confidence interval of each row's mean; the interval shown for
an overhead is the conservative difference of two of them, [row lower - bare upper,
row upper - bare lower]. A negative overhead is noise: the chart draws it as a zero-length
bar and still prints its value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# (criterion directory name, label)
GROUPS: list[tuple[str, str]] = [
    ("current_thread_ready", "current-thread, ready"),
    ("current_thread_pending_once", "current-thread, pending once"),
    ("multi_thread_ready", "multi-thread, ready"),
    ("multi_thread_pending_once", "multi-thread, pending once"),
]

# Colour per group: hue = runtime flavour (blue: current-thread, orange: multi-thread),
# shade = inner behaviour (light: ready, dark: pending once). Blue/orange stays distinct
# under the common colour-vision deficiencies.
GROUP_COLOURS = ["#74a9cf", "#0b5a9c", "#fdae6b", "#c94a02"]

BARE = "bare"


@dataclass(frozen=True)
class Layer:
    row: str  # criterion function id
    label: str  # one line, for Markdown
    svg_lines: tuple[str, ...]  # the same label, wrapped for the chart
    anchor: bool  # tower / tower-http, the yardstick; False for this crate's layers


LAYERS: list[Layer] = [
    Layer("tower_timeout", "tower::timeout", ("tower::timeout",), True),
    Layer("tower_http_timeout", "tower-http TimeoutLayer", ("tower-http TimeoutLayer",), True),
    Layer(
        "tower_http_on_early_drop",
        "tower-http on-early-drop",
        ("tower-http on-early-drop",),
        True,
    ),
    Layer(
        "tower_http_timeout_on_early_drop",
        "tower-http Timeout + on-early-drop",
        ("tower-http Timeout", "+ on-early-drop"),
        True,
    ),
    Layer("ours_response_timeout", "ours ResponseTimeout", ("ours ResponseTimeout",), False),
    Layer("ours_client_disconnect", "ours ClientDisconnect", ("ours ClientDisconnect",), False),
    Layer("ours_full_stack", "ours full stack", ("ours full stack",), False),
    Layer(
        "ours_full_stack_subscribed",
        "ours full stack, subscriber",
        ("ours full stack,", "subscriber"),
        False,
    ),
    Layer(
        "tower_http_trace_stack_subscribed",
        "tower-http Trace + Timeout + on-early-drop, subscriber",
        ("tower-http Trace + Timeout", "+ on-early-drop, subscriber"),
        True,
    ),
]
LAYER_BY_ROW = {layer.row: layer for layer in LAYERS}


@dataclass(frozen=True)
class Ratio:
    numerator: str
    denominator: str
    target: float | None  # the ratio must be <= target; None: for information


RATIOS: list[Ratio] = [
    Ratio("ours_response_timeout", "tower_timeout", 1.0),
    Ratio("ours_full_stack", "tower_http_timeout_on_early_drop", 0.5),
    Ratio("ours_full_stack_subscribed", "tower_http_trace_stack_subscribed", 1.0),
]


@dataclass(frozen=True)
class Estimate:
    """A criterion mean, in ns, with its confidence interval."""

    mean: float
    lower: float
    upper: float


@dataclass(frozen=True)
class Overhead:
    """ns added per request over `bare`, with the conservative interval of the difference."""

    value: float
    lower: float
    upper: float


def note(message: str) -> None:
    print(f"perf_report: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Reading


def target_dir(cli: str | None) -> Path:
    if cli:
        return Path(cli)
    env = os.environ.get("CARGO_TARGET_DIR")
    if env:
        return Path(env)
    return REPO_ROOT / "target"


def read_estimate(path: Path) -> Estimate | None:
    try:
        with path.open(encoding="utf-8") as f:
            mean = json.load(f)["mean"]
        ci = mean["confidence_interval"]
        return Estimate(
            float(mean["point_estimate"]), float(ci["lower_bound"]), float(ci["upper_bound"])
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        note(f"skipping {path}: cannot read it ({e})")
        return None


def read_results(criterion: Path) -> dict[str, dict[str, Estimate]]:
    """group -> row -> estimate, for the groups and rows that exist."""
    results: dict[str, dict[str, Estimate]] = {}
    for group, _ in GROUPS:
        group_dir = criterion / group
        if not group_dir.is_dir():
            note(f"group {group} missing ({group_dir}), skipped")
            continue
        rows: dict[str, Estimate] = {}
        for row in [BARE] + [layer.row for layer in LAYERS]:
            estimate = read_estimate(group_dir / row / "new" / "estimates.json")
            if estimate is None:
                note(f"row {group}/{row} missing, skipped")
            else:
                rows[row] = estimate
        if BARE not in rows:
            note(f"group {group} has no `{BARE}` row, so no overheads: skipped")
            continue
        results[group] = rows
    return results


def overheads(rows: dict[str, Estimate]) -> dict[str, Overhead]:
    bare = rows[BARE]
    return {
        row: Overhead(e.mean - bare.mean, e.lower - bare.upper, e.upper - bare.lower)
        for row, e in rows.items()
        if row != BARE
    }


# --------------------------------------------------------------------------------------------
# Markdown


def fmt_ns(value: float, signed: bool = True) -> str:
    text = f"{abs(value):,.0f}"
    if round(value) < 0:
        return f"\u2212{text}"  # minus sign
    return f"+{text}" if signed else text


def ratio_cell(num: Overhead | None, den: Overhead | None, target: float | None) -> str:
    if num is None or den is None:
        return "\u2014"
    if den.value <= 0:
        return "n/a (anchor \u2264 0 ns)"
    r = num.value / den.value
    digits = 2
    if target is not None:
        # Enough digits that the figure shown is not the target itself when the ratio is not.
        while digits < 4 and r != target and round(r, digits) == target:
            digits += 1
    text = f"{r:.{digits}f}".replace("-", "\u2212")
    if target is None:
        return text
    mark = "\u2713" if r <= target else "\u2717"
    return f"{text} {mark}"


def markdown(
    results: dict[str, dict[str, Estimate]],
    over: dict[str, dict[str, Overhead]],
    with_ci: bool,
) -> str:
    groups = [(g, label) for g, label in GROUPS if g in results]
    header = "| Layer | " + " | ".join(label for _, label in groups) + " |"
    align = "|:--|" + "--:|" * len(groups)
    out = [
        "Per-request overhead over a bare service (criterion mean of the row minus that of "
        "`bare`, ns per request"
        + ("; in brackets the conservative 95% interval" if with_ci else "")
        + "):",
        "",
        header,
        align,
    ]
    bare_cells = [f"{results[g][BARE].mean:,.0f} ns" for g, _ in groups]
    out.append("| *bare service (absolute)* | " + " | ".join(bare_cells) + " |")
    for layer in LAYERS:
        cells = []
        for g, _ in groups:
            o = over[g].get(layer.row)
            if o is None:
                cells.append("\u2014")
            elif with_ci:
                cells.append(f"{fmt_ns(o.value)} ns [{fmt_ns(o.lower)}, {fmt_ns(o.upper)}]")
            else:
                cells.append(f"{fmt_ns(o.value)} ns")
        out.append(f"| {layer.label} | " + " | ".join(cells) + " |")

    out += [
        "",
        "Ratios of overheads (lower is better):",
        "",
        "| Ratio | Target | " + " | ".join(label for _, label in groups) + " |",
        "|:--|:-:|" + "--:|" * len(groups),
    ]
    for ratio in RATIOS:
        name = f"{LAYER_BY_ROW[ratio.numerator].label} / {LAYER_BY_ROW[ratio.denominator].label}"
        target = "\u2014" if ratio.target is None else f"\u2264 {ratio.target:.1f}"
        cells = [
            ratio_cell(over[g].get(ratio.numerator), over[g].get(ratio.denominator), ratio.target)
            for g, _ in groups
        ]
        out.append(f"| {name} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# SVG

FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
INK = "#1f2328"  # GitHub's light-theme text
MUTED = "#59636e"
GRID = "#d8dee4"
BAND = "#eef1f4"

WIDTH = 900
LABEL_X = 20  # left edge of the layer labels
PLOT_X0 = 250  # x of 0 ns
PLOT_X1 = WIDTH - 70  # x of the axis maximum; the margin holds the values of the longest bars
BAR_H = 11
BAR_GAP = 2
LAYER_PAD = 9  # above and below each layer's bars


def nice_axis(maximum: float) -> tuple[float, float]:
    """(axis maximum, tick step) with 4 to 8 ticks."""
    if maximum <= 0:
        return 100.0, 25.0
    raw = maximum / 6
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return math.ceil(maximum / step) * step, step


def text_width(text: str, size: float) -> float:
    """A generous estimate of a sans-serif text's width, for layout."""
    return len(text) * size * 0.6


def svg(
    results: dict[str, dict[str, Estimate]],
    over: dict[str, dict[str, Overhead]],
    subtitle: str | None,
    with_ci: bool,
) -> str:
    groups = [(i, g, label) for i, (g, label) in enumerate(GROUPS) if g in results]
    layers = [layer for layer in LAYERS if any(layer.row in over[g] for _, g, _ in groups)]
    n = len(groups)

    peak = 0.0
    for _, g, _ in groups:
        for o in over[g].values():
            peak = max(peak, o.value, o.upper if with_ci else o.value)
    axis_max, step = nice_axis(peak)

    def x_of(value: float) -> float:
        value = min(max(value, 0.0), axis_max)
        return PLOT_X0 + (PLOT_X1 - PLOT_X0) * value / axis_max

    parts: list[str] = []
    add = parts.append

    # Header: title, subtitle, legend.
    y = 34
    header = [
        f'<text x="{LABEL_X}" y="{y}" font-size="19" font-weight="700" fill="{INK}">'
        "tower-timeouts: per-request overhead</text>"
    ]
    y += 21
    if subtitle:
        header.append(
            f'<text x="{LABEL_X}" y="{y}" font-size="12.5" fill="{MUTED}">{escape(subtitle)}</text>'
        )
        y += 21
    # Legend: one entry per group (with the bare service's own time), two per line (a line
    # per runtime flavour), in aligned columns; then the key to the anchor bands.
    y += 6
    entries = [(i, f"{label} (bare: {results[g][BARE].mean:,.0f} ns)") for i, g, label in groups]
    column = 18 + max(text_width(entry, 11.5) for _, entry in entries) + 28
    for k, (i, entry) in enumerate(entries):
        lx = LABEL_X + (k % 2) * column
        ly = y + (k // 2) * 20
        header.append(
            f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" rx="2" '
            f'fill="{GROUP_COLOURS[i]}"/>'
            f'<text x="{lx + 18}" y="{ly}" font-size="11.5" fill="{INK}">{escape(entry)}</text>'
        )
    legend_row_y = y + ((len(entries) + 1) // 2) * 20
    header.append(
        f'<rect x="{LABEL_X - 4}" y="{legend_row_y - 11}" width="20" height="14" rx="2" '
        f'fill="{BAND}"/>'
        f'<text x="{LABEL_X + 22}" y="{legend_row_y}" font-size="11.5" fill="{MUTED}">'
        "tower / tower-http, for comparison</text>"
        f'<rect x="{LABEL_X + column - 3.5}" y="{legend_row_y - 10.5}" width="19" height="13" '
        f'rx="2" fill="#ffffff" stroke="{GRID}"/>'
        f'<text x="{LABEL_X + column + 22}" y="{legend_row_y}" font-size="11.5" '
        f'font-weight="700" fill="{INK}">this crate</text>'
    )
    parts += header

    plot_y0 = legend_row_y + 22
    layer_h = 2 * LAYER_PAD + n * BAR_H + (n - 1) * BAR_GAP
    plot_y1 = plot_y0 + layer_h * len(layers)

    # Anchor bands (under everything else).
    for k, layer in enumerate(layers):
        if layer.anchor:
            top = plot_y0 + k * layer_h
            add(
                f'<rect x="{LABEL_X - 10}" y="{top + 1}" width="{WIDTH - 2 * LABEL_X + 20}" '
                f'height="{layer_h - 2}" rx="3" fill="{BAND}"/>'
            )

    # Grid and x axis.
    ticks = [step * t for t in range(int(round(axis_max / step)) + 1)]
    for t in ticks:
        x = x_of(t)
        colour = "#8c959f" if t == 0 else GRID
        add(
            f'<line x1="{x:.1f}" y1="{plot_y0}" x2="{x:.1f}" y2="{plot_y1 + 4}" '
            f'stroke="{colour}" stroke-width="1"/>'
        )
        add(
            f'<text x="{x:.1f}" y="{plot_y1 + 18}" font-size="11" fill="{MUTED}" '
            f'text-anchor="middle">{t:,.0f}</text>'
        )
    add(
        f'<text x="{(PLOT_X0 + PLOT_X1) / 2:.1f}" y="{plot_y1 + 38}" font-size="12.5" '
        f'fill="{INK}" text-anchor="middle">'
        "ns added per request over a bare service (criterion mean; lower is better)</text>"
    )

    # Layers.
    for k, layer in enumerate(layers):
        top = plot_y0 + k * layer_h
        mid = top + layer_h / 2
        weight = "400" if layer.anchor else "700"
        colour = MUTED if layer.anchor else INK
        lines = layer.svg_lines
        for j, line in enumerate(lines):
            ly = mid + 4.5 + (j - (len(lines) - 1) / 2) * 15
            add(
                f'<text x="{LABEL_X}" y="{ly:.1f}" font-size="12.5" font-weight="{weight}" '
                f'fill="{colour}">{escape(line)}</text>'
            )
        for slot, (i, g, _) in enumerate(groups):
            o = over[g].get(layer.row)
            by = top + LAYER_PAD + slot * (BAR_H + BAR_GAP)
            if o is None:
                add(
                    f'<text x="{PLOT_X0 + 4}" y="{by + BAR_H - 2}" font-size="9.5" '
                    f'fill="{MUTED}">no data</text>'
                )
                continue
            x1 = x_of(o.value)
            add(
                f'<rect x="{PLOT_X0}" y="{by}" width="{x1 - PLOT_X0:.1f}" height="{BAR_H}" '
                f'fill="{GROUP_COLOURS[i]}"><title>{escape(layer.label)}, '
                f"{escape(GROUPS[i][1])}: {fmt_ns(o.value)} ns "
                f"(95% CI {fmt_ns(o.lower)}..{fmt_ns(o.upper)})</title></rect>"
            )
            end = x1
            if with_ci:
                lo, hi = x_of(o.lower), x_of(o.upper)
                if hi - lo >= 1:
                    cy = by + BAR_H / 2
                    add(
                        f'<path d="M{lo:.1f} {cy}H{hi:.1f}M{lo:.1f} {cy - 3}v6'
                        f'M{hi:.1f} {cy - 3}v6" stroke="{INK}" stroke-opacity="0.55" '
                        'stroke-width="1" fill="none"/>'
                    )
                end = max(end, hi)
            add(
                f'<text x="{end + 4:.1f}" y="{by + BAR_H - 1.5}" font-size="10" fill="{INK}">'
                f"{fmt_ns(o.value, signed=False)}</text>"
            )

    # Footnote.
    foot = ["Bars: mean of the layer's row minus mean of the bare row, in each benchmark group."]
    if with_ci:
        foot[0] += " Whiskers: conservative 95% interval of that difference."
    foot.append("Negative values are noise: drawn at 0, value still shown.")
    for j, line in enumerate(foot):
        add(
            f'<text x="{LABEL_X}" y="{plot_y1 + 62 + 15 * j}" font-size="10.5" '
            f'fill="{MUTED}">{escape(line)}</text>'
        )
    height = plot_y1 + 62 + 15 * (len(foot) - 1) + 16

    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="{FONT}">\n'
        f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>\n'
        + "\n".join(parts)
        + "\n</svg>\n"
    )


# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Markdown tables and an SVG chart from the `overhead` criterion bench.",
    )
    parser.add_argument(
        "--target",
        metavar="DIR",
        help="cargo's target directory (default: $CARGO_TARGET_DIR, else target/ at the repo root)",
    )
    parser.add_argument("--subtitle", help="a line under the chart's title, e.g. machine and date")
    parser.add_argument(
        "--svg",
        metavar="PATH",
        default=str(REPO_ROOT / "docs" / "overhead.svg"),
        help="where to write the chart (default: docs/overhead.svg at the repo root)",
    )
    parser.add_argument("--no-svg", action="store_true", help="do not write the chart")
    parser.add_argument("--markdown", metavar="FILE", help="also write the Markdown to FILE")
    parser.add_argument(
        "--ci", action="store_true", help="show each overhead's interval in the Markdown table"
    )
    parser.add_argument(
        "--no-whiskers", action="store_true", help="leave the intervals out of the chart"
    )
    args = parser.parse_args()

    criterion = target_dir(args.target) / "criterion"
    if not criterion.is_dir():
        note(f"no criterion results at {criterion}: run `cargo bench --bench overhead` first")
        return 1
    results = read_results(criterion)
    if not results:
        note(f"none of the overhead groups found under {criterion}")
        return 1
    over = {g: overheads(rows) for g, rows in results.items()}

    text = markdown(results, over, args.ci)
    sys.stdout.write(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if not args.no_svg:
        path = Path(args.svg)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(svg(results, over, args.subtitle, not args.no_whiskers), encoding="utf-8")
        note(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
