#!/usr/bin/env python3
"""Summarise the `overhead` bench: Markdown tables and an SVG chart, from its JSON results.

Usage (from the repository root):

    cargo bench --bench overhead && python3 scripts/perf_report.py --subtitle "..."

for example `--subtitle "2-core VM, rustc 1.95, 2026-11-24"` (without it, the subtitle is made
from the machine facts the bench recorded).

Input: `<target>/tower-timeouts-bench/overhead.json`, written by `benches/overhead.rs`, where
`<target>` is, in order of precedence, `--target DIR`, the `CARGO_TARGET_DIR` environment
variable, or `target/` at the repository root (`--results FILE` names the file itself). The
bench ran every case in interleaved rounds; for each driver (`ct`, `mt_block_on`, `mt_spawned`)
and inner behaviour (`ready`, `pending`) it recorded every round's ns per request, each case's
overhead over its baseline (`bare`, or `bare_subscribed` for the subscribed cases) as the
median and quartiles over the rounds, and the ratios of overheads as the median and quartiles
of the per-round ratios. This script only formats those figures; it computes none of its own.
Groups or cases missing from the file (a filtered run) are shown as a dash.

Output:

- on stdout, Markdown: a line on the machine and the run, a table of the ratios (median of the
  per-round ratios, with p25-p75 in brackets, and the project's target for each), and a table
  of the overheads (median ns added per request, p25-p75 in brackets unless `--no-spread`);
  `--markdown FILE` also writes it to FILE;
- an SVG chart of the overheads (bars: medians; whiskers: p25-p75), hand-written (no
  dependency beyond the standard library), at `docs/overhead.svg` under the repository root
  unless `--svg PATH` says otherwise (`--no-svg` skips it).
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

DRIVER_LABELS = {
    "ct": "current-thread block_on",
    "mt_block_on": "multi-thread block_on",
    "mt_spawned": "multi-thread spawned",
}
BEHAVIOUR_LABELS = {"ready": "ready", "pending": "pending once"}

# (driver, behaviour), in column order.
GROUPS: list[tuple[str, str]] = [
    (driver, behaviour) for driver in DRIVER_LABELS for behaviour in BEHAVIOUR_LABELS
]

# Colour per group: hue = driver (blue: current-thread, grey: multi-thread block_on, orange:
# multi-thread spawned), shade = inner behaviour (light: ready, dark: pending once).
# Blue/grey/orange stays distinct under the common colour-vision deficiencies.
GROUP_COLOURS = ["#74a9cf", "#0b5a9c", "#bdbdbd", "#4d4d4d", "#fdae6b", "#c94a02"]


def group_label(driver: str, behaviour: str) -> str:
    return f"{DRIVER_LABELS[driver]}, {BEHAVIOUR_LABELS[behaviour]}"


@dataclass(frozen=True)
class Layer:
    case: str  # the bench's case name
    label: str  # one line, for Markdown
    svg_lines: tuple[str, ...]  # the same label, wrapped for the chart
    anchor: bool  # tower / tower-http, the yardstick; False for this crate's layers


LAYERS: list[Layer] = [
    Layer("tower_timeout", "tower::timeout", ("tower::timeout",), True),
    Layer("tower_http_timeout", "tower-http Timeout", ("tower-http Timeout",), True),
    Layer(
        "tower_http_on_early_drop",
        "tower-http on-early-drop (no-op closures)",
        ("tower-http on-early-drop", "(no-op closures)"),
        True,
    ),
    Layer(
        "tower_http_timeout_on_early_drop",
        "tower-http on-early-drop + Timeout",
        ("tower-http on-early-drop", "+ Timeout"),
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
        "tower-http Trace + on-early-drop + Timeout, subscriber",
        ("tower-http Trace + on-early-drop", "+ Timeout, subscriber"),
        True,
    ),
]
LAYER_BY_CASE = {layer.case: layer for layer in LAYERS}

BASELINES = {"unsubscribed": "bare", "subscribed": "bare_subscribed"}

# The project's targets for the ratios (issue 10): the ratio must be <= target.
TARGETS = {
    ("ours_response_timeout", "tower_timeout"): 1.0,
    ("ours_full_stack", "tower_http_timeout_on_early_drop"): 0.5,
    ("ours_client_disconnect", "tower_http_on_early_drop"): 1.5,
    ("ours_full_stack_subscribed", "tower_http_trace_stack_subscribed"): 1.0,
}


def note(message: str) -> None:
    print(f"perf_report: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Spread:
    median: float
    p25: float
    p75: float

    @staticmethod
    def of(value: dict | None) -> Spread | None:
        if not value or value.get("median") is None:
            return None
        return Spread(float(value["median"]), float(value["p25"]), float(value["p75"]))


class Results:
    """The bench's JSON, indexed: (phase, driver, behaviour) -> group."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.rounds: int = data["config"]["rounds"]
        self.groups: dict[tuple[str, str, str], dict] = {
            (g["phase"], g["driver"], g["behaviour"]): g for g in data["groups"]
        }
        self.phase_of = {c["name"]: c["phase"] for c in data["cases"]}
        self.ratios: list[tuple[str, str]] = [
            (r["numerator"], r["denominator"]) for r in data["ratios"]
        ]

    def present(self) -> list[tuple[str, str]]:
        """The (driver, behaviour) groups with results, in column order."""
        return [(d, b) for d, b in GROUPS if any((p, d, b) in self.groups for p in BASELINES)]

    def case(self, name: str, driver: str, behaviour: str) -> dict | None:
        group = self.groups.get((self.phase_of.get(name, ""), driver, behaviour))
        if group is None:
            return None
        return next((c for c in group["cases"] if c["name"] == name), None)

    def overhead(self, name: str, driver: str, behaviour: str) -> Spread | None:
        case = self.case(name, driver, behaviour)
        return Spread.of(case["overhead"]) if case else None

    def ratio(
        self, numerator: str, driver: str, behaviour: str
    ) -> tuple[Spread | None, int] | None:
        group = self.groups.get((self.phase_of.get(numerator, ""), driver, behaviour))
        if group is None:
            return None
        ratio = next((r for r in group["ratios"] if r["numerator"] == numerator), None)
        if ratio is None:
            return None
        return Spread.of(ratio["ratio"]), int(ratio["rounds_used"])

    def layers(self) -> list[Layer]:
        """The layers with a figure in at least one group."""
        return [
            layer
            for layer in LAYERS
            if any(self.overhead(layer.case, d, b) for d, b in self.present())
        ]

    def facts(self, short: bool = False) -> str:
        """The machine and versions; `short`: one line of a chart."""
        machine = self.data["machine"]
        versions = machine.get("versions", {})
        rustc = machine.get("rustc", "rustc ?")
        if short:
            rustc = " ".join(rustc.split()[:2])
            versions = {k: v for k, v in versions.items() if k in ("tokio", "tower", "tower-http")}
        parts = [
            f"{machine.get('cpu', '?')}, {machine.get('threads', '?')} threads",
            rustc,
            ", ".join(f"{k} {v}" for k, v in versions.items()),
        ]
        return "; ".join(p for p in parts if p)


def target_dir(cli: str | None) -> Path:
    if cli:
        return Path(cli)
    env = os.environ.get("CARGO_TARGET_DIR")
    if env:
        return Path(env)
    return REPO_ROOT / "target"


# --------------------------------------------------------------------------------------------
# Markdown


def fmt_ns(value: float, signed: bool = True) -> str:
    text = f"{abs(value):,.0f}"
    if round(value) < 0:
        return f"\u2212{text}"  # minus sign
    if round(value) == 0:
        return "0"
    return f"+{text}" if signed else text


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}".replace("-", "\u2212")


def ratio_cell(found: tuple[Spread | None, int] | None, rounds: int) -> str:
    if found is None:
        return "\u2014"
    spread, used = found
    if spread is None:
        return "n/a (anchor \u2264 0 ns)"
    cell = f"{fmt_ratio(spread.median)} ({fmt_ratio(spread.p25)}\u2013{fmt_ratio(spread.p75)})"
    if used < rounds:
        cell += f" [{used}/{rounds} rounds]"
    return cell


def target_mark(found: tuple[Spread | None, int] | None, target: float | None) -> str:
    """✓: met in at least 3 rounds of 4 (p75 <= target); ✗: missed in at least 3 of 4
    (p25 > target); ~: the target lies within the quartiles."""
    if found is None or found[0] is None or target is None:
        return ""
    spread = found[0]
    if spread.p75 <= target:
        return " \u2713"
    if spread.p25 > target:
        return " \u2717"
    return " ~"


def markdown(results: Results, with_spread: bool) -> str:
    groups = results.present()
    config = results.data["config"]
    labels = [group_label(d, b) for d, b in groups]
    out = [
        f"Measured with `cargo bench --bench overhead` on {results.facts()}: "
        f"{config['rounds']} interleaved rounds of {config['requests']:,} requests per case "
        f"(per worker when spawned), {results.data.get('elapsed_s', 0):.0f} s.",
        "",
        "Ratios of overheads over a bare service, median of the per-round ratios (p25\u2013p75); "
        "lower is better. \u2713: the target is met in at least 3 rounds of 4, \u2717: missed "
        "in at least 3 of 4, ~: in between.",
        "",
        "| Ratio | Target | " + " | ".join(labels) + " |",
        "|:--|:-:|" + "--:|" * len(groups),
    ]
    for numerator, denominator in results.ratios:
        num, den = LAYER_BY_CASE.get(numerator), LAYER_BY_CASE.get(denominator)
        name = f"{num.label if num else numerator} / {den.label if den else denominator}"
        target = TARGETS.get((numerator, denominator))
        cells = []
        for d, b in groups:
            found = results.ratio(numerator, d, b)
            cells.append(ratio_cell(found, results.rounds) + target_mark(found, target))
        if all(cell == "\u2014" for cell in cells):
            continue
        target_text = "\u2014" if target is None else f"\u2264 {target:.1f}"
        out.append(f"| {name} | {target_text} | " + " | ".join(cells) + " |")

    out += [
        "",
        "Per-request overhead over a bare service (median over the rounds of the case's ns per "
        "request minus the bare service's in the same round"
        + ("; in brackets p25\u2013p75" if with_spread else "")
        + "); the subscribed rows are over the bare service with the same subscriber:",
        "",
        "| Layer | " + " | ".join(labels) + " |",
        "|:--|" + "--:|" * len(groups),
    ]
    for baseline, label in [
        ("bare", "*bare service (absolute)*"),
        ("bare_subscribed", "*bare service, subscriber (absolute)*"),
    ]:
        cells = []
        for d, b in groups:
            case = results.case(baseline, d, b)
            cells.append("\u2014" if case is None else f"{case['median_ns']:,.0f} ns")
        if any(cell != "\u2014" for cell in cells):
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    for layer in results.layers():
        cells = []
        for d, b in groups:
            o = results.overhead(layer.case, d, b)
            if o is None:
                cells.append("\u2014")
            elif with_spread:
                cells.append(f"{fmt_ns(o.median)} ns ({fmt_ns(o.p25)}\u2026{fmt_ns(o.p75)})")
            else:
                cells.append(f"{fmt_ns(o.median)} ns")
        out.append(f"| {layer.label} | " + " | ".join(cells) + " |")
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
BAR_H = 9
BAR_GAP = 2
LAYER_PAD = 8  # above and below each layer's bars


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


def svg(results: Results, subtitle: str, whiskers: bool) -> str:
    groups = [(GROUPS.index(g), g) for g in results.present()]
    layers = results.layers()
    n = len(groups)

    peak = 0.0
    for layer in layers:
        for _, (d, b) in groups:
            o = results.overhead(layer.case, d, b)
            if o is not None:
                peak = max(peak, o.p75 if whiskers else o.median, o.median)
    axis_max, step = nice_axis(peak)

    def x_of(value: float) -> float:
        value = min(max(value, 0.0), axis_max)
        return PLOT_X0 + (PLOT_X1 - PLOT_X0) * value / axis_max

    parts: list[str] = []
    add = parts.append

    # Header: title, subtitle, legend.
    y = 34
    add(
        f'<text x="{LABEL_X}" y="{y}" font-size="19" font-weight="700" fill="{INK}">'
        "tower-timeouts: per-request overhead</text>"
    )
    y += 21
    if subtitle:
        add(f'<text x="{LABEL_X}" y="{y}" font-size="11.5" fill="{MUTED}">{escape(subtitle)}</text>')
        y += 21
    # Legend: one entry per group (with the bare service's own time), two per line (a line
    # per driver), in aligned columns; then the key to the anchor bands.
    y += 6
    entries = []
    for i, (d, b) in groups:
        bare = results.case("bare", d, b)
        own = f" (bare: {bare['median_ns']:,.0f} ns)" if bare else ""
        entries.append((i, group_label(d, b) + own))
    column = 18 + max(text_width(entry, 11.5) for _, entry in entries) + 28
    for k, (i, entry) in enumerate(entries):
        lx = LABEL_X + (k % 2) * column
        ly = y + (k // 2) * 20
        add(
            f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" rx="2" '
            f'fill="{GROUP_COLOURS[i]}"/>'
            f'<text x="{lx + 18}" y="{ly}" font-size="11.5" fill="{INK}">{escape(entry)}</text>'
        )
    legend_row_y = y + ((len(entries) + 1) // 2) * 20
    add(
        f'<rect x="{LABEL_X - 4}" y="{legend_row_y - 11}" width="20" height="14" rx="2" '
        f'fill="{BAND}"/>'
        f'<text x="{LABEL_X + 22}" y="{legend_row_y}" font-size="11.5" fill="{MUTED}">'
        "tower / tower-http, for comparison</text>"
        f'<rect x="{LABEL_X + column - 3.5}" y="{legend_row_y - 10.5}" width="19" height="13" '
        f'rx="2" fill="#ffffff" stroke="{GRID}"/>'
        f'<text x="{LABEL_X + column + 22}" y="{legend_row_y}" font-size="11.5" '
        f'font-weight="700" fill="{INK}">this crate</text>'
    )

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
        "ns added per request over a bare service (median of rounds; lower is better)</text>"
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
        for slot, (i, (d, b)) in enumerate(groups):
            o = results.overhead(layer.case, d, b)
            by = top + LAYER_PAD + slot * (BAR_H + BAR_GAP)
            if o is None:
                add(
                    f'<text x="{PLOT_X0 + 4}" y="{by + BAR_H - 1}" font-size="9" '
                    f'fill="{MUTED}">no data</text>'
                )
                continue
            x1 = x_of(o.median)
            add(
                f'<rect x="{PLOT_X0}" y="{by}" width="{x1 - PLOT_X0:.1f}" height="{BAR_H}" '
                f'fill="{GROUP_COLOURS[i]}"><title>{escape(layer.label)}, '
                f"{escape(group_label(d, b))}: {fmt_ns(o.median)} ns "
                f"(p25\u2013p75 {fmt_ns(o.p25)}\u2026{fmt_ns(o.p75)})</title></rect>"
            )
            end = x1
            if whiskers:
                lo, hi = x_of(o.p25), x_of(o.p75)
                if hi - lo >= 1:
                    cy = by + BAR_H / 2
                    add(
                        f'<path d="M{lo:.1f} {cy}H{hi:.1f}M{lo:.1f} {cy - 3}v6'
                        f'M{hi:.1f} {cy - 3}v6" stroke="{INK}" stroke-opacity="0.55" '
                        'stroke-width="1" fill="none"/>'
                    )
                end = max(end, hi)
            add(
                f'<text x="{end + 4:.1f}" y="{by + BAR_H - 1}" font-size="9.5" fill="{INK}">'
                f"{fmt_ns(o.median, signed=False)}</text>"
            )

    # Footnote.
    foot = [
        "Bars: median over interleaved rounds of the case's ns per request minus the bare "
        "service's in the same round;",
        "the subscribed cases' over the bare service with the same subscriber.",
    ]
    if whiskers:
        foot.append("Whiskers: p25\u2013p75 of those per-round differences.")
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
        description="Markdown tables and an SVG chart from the `overhead` bench's JSON results.",
    )
    parser.add_argument(
        "--target",
        metavar="DIR",
        help="cargo's target directory (default: $CARGO_TARGET_DIR, else target/ at the repo root)",
    )
    parser.add_argument(
        "--results",
        metavar="FILE",
        help="the bench's results (default: <target>/tower-timeouts-bench/overhead.json)",
    )
    parser.add_argument(
        "--subtitle", help="a line under the chart's title (default: the machine facts recorded)"
    )
    parser.add_argument(
        "--svg",
        metavar="PATH",
        default=str(REPO_ROOT / "docs" / "overhead.svg"),
        help="where to write the chart (default: docs/overhead.svg at the repo root)",
    )
    parser.add_argument("--no-svg", action="store_true", help="do not write the chart")
    parser.add_argument("--markdown", metavar="FILE", help="also write the Markdown to FILE")
    parser.add_argument(
        "--no-spread", action="store_true", help="leave the quartiles out of the overhead table"
    )
    parser.add_argument(
        "--no-whiskers", action="store_true", help="leave the quartiles out of the chart"
    )
    args = parser.parse_args()

    path = (
        Path(args.results)
        if args.results
        else target_dir(args.target) / "tower-timeouts-bench" / "overhead.json"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        note(f"no results at {path}: run `cargo bench --bench overhead` first")
        return 1
    except (OSError, ValueError) as e:
        note(f"cannot read {path}: {e}")
        return 1
    if data.get("bench") != "overhead" or not data.get("groups"):
        note(f"{path} holds no results of the overhead bench")
        return 1
    results = Results(data)
    if data["config"].get("filter"):
        note(f"a filtered run ({' '.join(data['config']['filter'])}): some figures are missing")

    text = markdown(results, not args.no_spread)
    sys.stdout.write(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if not args.no_svg:
        subtitle = args.subtitle or results.facts(short=True)
        out = Path(args.svg)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(svg(results, subtitle, not args.no_whiskers), encoding="utf-8")
        note(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
