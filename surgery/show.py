"""`surgery show`: the layer map as a picture (SVG or PNG, through matplotlib).

Source models' layers are on the left (one column per model), the output's layers on the right,
top to bottom from layer 0; a line joins each output layer to the layers it is made from, coloured
by how: copy, identity (output projections zeroed), merge, random, zero.
"""

from __future__ import annotations

from pathlib import Path

from .errors import OutputError

COLOURS = {"copy": "#4C72B0", "identity": "#55A868", "merge": "#8172B2", "random": "#DD8452", "zero": "#8C8C8C"}
LABELS = {"copy": "copy", "identity": "identity (outputs zeroed)", "merge": "merge", "random": "random init", "zero": "zero"}


def draw_layer_map(program, out: Path, *, title: str | None = None) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError:
        raise OutputError("drawing needs matplotlib, which is not installed", fix="pip install matplotlib (or 'surgery[train]')") from None
    out = Path(out)
    if out.suffix.lower() not in (".svg", ".png"):
        raise OutputError(f"{out}: the picture is written as .svg or .png", fix="name the output map.svg or map.png")
    rows = program.layer_map()
    models = list(program.ckpts)
    n_src = {m: program.ckpts[m].num_layers for m in models}
    used = {m for r in rows for m, _ in r["sources"]}
    models = [m for m in models if m in used] or models
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
        ax.text(x + box_w / 2, y, label, ha="center", va="center", fontsize=6.5, color="white",
                fontweight="bold" if bold else "normal")

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
            ax.plot([xs[m] + box_w, x_out], [ys, y], color=COLOURS[made], lw=0.8, alpha=0.75,
                    ls="--" if made in ("identity", "zero", "random") else "-")
        seen.add(made)
    handles = [plt.Line2D([0], [0], color=COLOURS[k], lw=3) for k in COLOURS if k in seen]
    ax.legend(handles, [LABELS[k] for k in COLOURS if k in seen], loc="lower center", bbox_to_anchor=(0.5, -0.02),
              ncol=len(handles), fontsize=7, frameon=False)
    name = title or program.plan.body.name or Path(program.plan.source).name
    ax.set_title(f"{name}: {sum(n_src[m] for m in models)} source layers -> {len(rows)}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, metadata={"Date": None} if out.suffix.lower() == ".svg" else None)
    plt.close(fig)
    return out
