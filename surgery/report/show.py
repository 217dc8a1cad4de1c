"""`surgery show`: the layer map as a picture.

Source models' layers are on the left (one column per model), the output's layers on the right,
top to bottom from layer 0; a line joins each output layer to the layers it is made from, coloured
by how: copy, identity (output projections zeroed), merge, random, zero. SVG is written by hand
(no dependency; every `apply` output carries `layer_map.svg` for its model card); PNG goes
through matplotlib.
"""

from __future__ import annotations

from pathlib import Path

from surgery.errors import OutputError

COLOURS = {"copy": "#4C72B0", "identity": "#55A868", "merge": "#8172B2", "random": "#DD8452", "zero": "#8C8C8C"}
LABELS = {"copy": "copy", "identity": "identity (outputs zeroed)", "merge": "merge", "random": "random init", "zero": "zero"}


def _layout(program):
    rows = program.layer_map()
    models = [m for m in program.ckpts if any(m == s for r in rows for s, _ in r["sources"])] or list(program.ckpts)
    return rows, models, {m: program.ckpts[m].num_layers for m in models}


def layer_map_svg(program, *, title: str | None = None) -> str:
    """The layer map as a standalone SVG document (deterministic: same plan, same bytes)."""
    from html import escape

    rows, models, n_src = _layout(program)
    rh, bw, gap, top = 14, 64, 150, 46
    tallest = max([len(rows)] + list(n_src.values()))
    x_out = 20 + gap * len(models) + 60
    width = x_out + bw + 20
    height = top + tallest * rh + 40
    name = escape(title or program.plan.body.name or Path(program.plan.source).name)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        'font-family="sans-serif" font-size="9">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="12">{name}: '
        f"{sum(n_src.values())} source layers &#8594; {len(rows)}</text>",
    ]

    def box(x, y, label, colour, new=False):
        weight = ' font-weight="bold"' if new else ""
        out.append(
            f'<rect x="{x}" y="{y - rh / 2 + 1}" width="{bw}" height="{rh - 2}" fill="{colour}"/>'
            f'<text x="{x + bw / 2}" y="{y + 3}" text-anchor="middle" fill="white"{weight}>{label}</text>'
        )

    xs = {m: 20 + gap * i for i, m in enumerate(models)}
    for m in models:
        out.append(f'<text x="{xs[m] + bw / 2}" y="{top - 12}" text-anchor="middle" font-weight="bold">{escape(m)}</text>')
        for i in range(n_src[m]):
            box(xs[m], top + i * rh, i, "#B0B7C3")
    out.append(f'<text x="{x_out + bw / 2}" y="{top - 12}" text-anchor="middle" font-weight="bold">output</text>')
    seen = []
    lines = []
    for r in rows:
        made = r["made"] if r["made"] in COLOURS else "copy"
        y = top + r["layer"] * rh
        for m, i in r["sources"]:
            if m in xs:
                dash = ' stroke-dasharray="4 2"' if made in ("identity", "zero", "random") else ""
                lines.append(
                    f'<line x1="{xs[m] + bw}" y1="{top + i * rh}" x2="{x_out}" y2="{y}" stroke="{COLOURS[made]}" '
                    f'stroke-width="1" opacity="0.8"{dash}/>'
                )
        box(x_out, y, r["layer"], COLOURS[made], r["new"])
        if made not in seen:
            seen.append(made)
    out[3:3] = lines  # under the boxes: a line crossing another model's column passes behind it
    lx = 20
    for k in (k for k in COLOURS if k in seen):
        out.append(
            f'<rect x="{lx}" y="{height - 22}" width="12" height="8" fill="{COLOURS[k]}"/>'
            f'<text x="{lx + 16}" y="{height - 15}">{escape(LABELS[k])}</text>'
        )
        lx += 22 + 6 * len(LABELS[k])
    out.append("</svg>")
    return "\n".join(out) + "\n"


def draw_layer_map(program, out: Path, *, title: str | None = None) -> Path:
    out = Path(out)
    if out.suffix.lower() == ".svg":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(layer_map_svg(program, title=title))
        return out
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        raise OutputError("drawing needs matplotlib, which is not installed", fix="pip install matplotlib (or 'surgery[train]')") from None
    if out.suffix.lower() != ".png":
        raise OutputError(f"{out}: the picture is written as .svg or .png", fix="name the output map.svg or map.png")
    rows, models, n_src = _layout(program)
    tallest = max([len(rows)] + [n_src[m] for m in models])
    h = 0.22
    fig_h = max(2.5, 0.9 + tallest * h)
    width = 2.2 + 1.6 * len(models) + 2.2
    fig, ax = plt.subplots(figsize=(width, fig_h), dpi=100)
    ax.set_xlim(0, width)
    ax.set_ylim(tallest * h + 0.6, -0.5)
    ax.axis("off")
    box_w = 1.0
    xs = {m: 0.2 + 1.6 * i for i, m in enumerate(models)}
    x_out = width - 0.2 - box_w

    def box(x, y, label, colour, bold=False):
        ax.add_patch(Rectangle((x, y - h * 0.42), box_w, h * 0.84, facecolor=colour, edgecolor="white", lw=0.5))
        ax.text(x + box_w / 2, y, label, ha="center", va="center", fontsize=6.5, color="white", fontweight="bold" if bold else "normal")

    for m in models:
        ax.text(xs[m] + box_w / 2, -0.3, m, ha="center", va="bottom", fontsize=8, fontweight="bold")
        for i in range(n_src[m]):
            box(xs[m], 0.2 + i * h, str(i), "#B0B7C3")
    ax.text(x_out + box_w / 2, -0.3, "output", ha="center", va="bottom", fontsize=8, fontweight="bold")
    seen = set()
    for r in rows:
        made = r["made"] if r["made"] in COLOURS else "copy"
        y = 0.2 + r["layer"] * h
        box(x_out, y, str(r["layer"]), COLOURS[made], bold=r["new"])
        for m, i in r["sources"]:
            if m not in xs:
                continue
            ys = 0.2 + i * h
            ax.plot(
                [xs[m] + box_w, x_out],
                [ys, y],
                color=COLOURS[made],
                lw=0.8,
                alpha=0.75,
                ls="--" if made in ("identity", "zero", "random") else "-",
            )
        seen.add(made)
    handles = [plt.Line2D([0], [0], color=COLOURS[k], lw=3) for k in COLOURS if k in seen]
    ax.legend(
        handles,
        [LABELS[k] for k in COLOURS if k in seen],
        loc="lower center",
        bbox_to_anchor=(0.5, -0.02),
        ncol=len(handles),
        fontsize=7,
        frameon=False,
    )
    name = title or program.plan.body.name or Path(program.plan.source).name
    ax.set_title(f"{name}: {sum(n_src[m] for m in models)} source layers -> {len(rows)}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
