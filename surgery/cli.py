"""`surgery` command line: a thin layer over `surgery.api`.

User errors (`SurgeryError`) are printed without a traceback, with their location and fix, and the
command exits with status 1. `SURGERY_DEBUG=1` shows tracebacks.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from surgery._version import __version__

EPILOG_APPLY = """\b
Examples:
  surgery apply examples/llama-pro.yaml -o ./llama-pro-out
  surgery apply plan.yaml --force        # replace an existing output
"""


# what Ctrl-C leaves behind, per command (the rest write nothing, or a whole file or nothing)
_RESUME = {
    "apply": "no output was completed (`surgery apply --resume` continues it)",
    "train": "no output was completed (`surgery train --resume` continues from the last checkpoint)",
    "convert": "no output was completed; run the conversion again",
    "analyze": "no report was written; run the analysis again",
}


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from surgery.errors import SurgeryError

        try:
            return fn(*a, **kw)
        except SurgeryError as e:
            if os.environ.get("SURGERY_DEBUG"):
                raise
            click.echo(f"error: {e}".replace("\n", "\n  "), err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo(f"interrupted; {_RESUME.get(fn.__name__, 'nothing was completed; run the command again')}", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except OSError as e:  # the file system said no: name the file, no traceback
            if os.environ.get("SURGERY_DEBUG"):
                raise
            where = f" ({str(e.filename)[:300]})" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)
        except Exception as e:  # a bug of ours or a dependency's: still one line, with how to see more
            if os.environ.get("SURGERY_DEBUG"):
                raise
            click.echo(
                f"internal error: {type(e).__name__}: {str(e)[:500]}\n  run with SURGERY_DEBUG=1 for the traceback, and please report it",
                err=True,
            )
            sys.exit(2)

    return wrapper


def _write_file(out: Path, text: str, force: bool, reads: dict | None = None) -> None:
    """A one-file output, written whole or not at all, never over anything the command reads."""
    from surgery.io.outdir import atomic_write, check_file_target

    check_file_target(out, force, reads or {})
    atomic_write(out, text)
    click.echo(f"wrote {out}", err=True)


def _check_figure_suffix(out: Path, option: str = "-o/--out") -> None:
    """A figure's file name must end in a format matplotlib writes: said before any work, with the choices."""
    from surgery.errors import OutputError

    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure

        formats = sorted(Figure().canvas.get_supported_filetypes())
    except ImportError:
        raise OutputError("drawing figures needs matplotlib", fix="pip install matplotlib (or 'surgery[train]')") from None
    suffix = out.suffix.lstrip(".").lower()
    if suffix not in formats:
        raise OutputError(
            f"{option}: {out.name} has {'no extension' if not suffix else f'the extension .{suffix}'}, which is not a figure format",
            where=str(out),
            fix=f"end the file name in one of: {', '.join('.' + f for f in formats)}",
        )


def _program_reads(program, plan: Path) -> dict:
    """What a compiled plan reads: the plan file and every source model's folder."""
    return {"the plan": plan} | {f"source model {n!r}": ck.path for n, ck in program.ckpts.items()}


class _Group(click.Group):
    """Adds subcommands that plugins provide (e.g. `surgery mergekit` from the mergekit plugin)."""

    def _plugin_commands(self) -> dict:
        from surgery.errors import SurgeryError
        from surgery.registry import current

        try:
            return dict(current().commands)
        except SurgeryError as e:
            click.echo(f"warning: {e}", err=True)
            return {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._plugin_commands()))

    def get_command(self, ctx, name):
        return super().get_command(ctx, name) or self._plugin_commands().get(name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="surgery")
def main():
    """Checkpoint surgery and model growth for HuggingFace transformer checkpoints.

    \b
    Write a YAML plan, check it, apply it:
      surgery validate plan.yaml     what would be written (reads headers only)
      surgery apply plan.yaml -o out a complete, loadable checkpoint in ./out
      surgery inspect ./model        family, layers, params, dtypes of a checkpoint
      surgery convert m.gguf -o m    a llama.cpp GGUF file as a HuggingFace checkpoint
      surgery show plan.yaml         the layer map as a picture (SVG/PNG)
      surgery train cfg.yaml         continue pretraining the result, or grow-then-train
      surgery advise -N 7B -D 2T     when to grow (Gstack's guideline)
      surgery analyze ./model --data d.jsonl which layers to cut (from activations)
      surgery verify ./out           sizes, headers and checksums of an output
      surgery demo                   the whole flow on a tiny bundled model, offline

    \b
    A plan (see README.md for every operation):
      models: {base: ./llama-2-7b}
      steps:
        - take: {model: base}                              # all 32 layers
        - expand: {groups: 8, per_group: 1, init: identity} # LLaMA Pro: 40 layers, same function
      output: {dtype: bfloat16, shard_size: 5GB}
    """


@main.command(epilog=EPILOG_APPLY)
@click.argument("plan", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", default=None, help="Output folder (overrides the plan's output.path).")
@click.option(
    "--force",
    is_flag=True,
    help="Replace the output folder if it exists (only once the new one is complete; "
    "only a model folder, never one holding the plan, a source or the current directory).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--allow-pickle", is_flag=True, help="Accept .bin/.pt checkpoints, loaded with torch.load(weights_only=True).")
@click.option(
    "--workers", type=click.IntRange(1, 64), default=None, help="Writer threads (default 8; computed tensors use at most one per CPU)."
)
@click.option("--seed", type=int, default=None, help="Seed for random merge methods (dare, della, ...); overrides the plan's `seed`.")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where merges, casts and random init run: auto, cpu, cuda, cuda:N. Copies never touch the device.",
)
@click.option("--max-memory", default=None, help="Bound on the compute working set, e.g. 2GB (chunks shrink to fit).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run: finished shards that match the plan are kept.")
@click.option(
    "--pipeline",
    type=click.Choice(["off", "on", "host"]),
    default="off",
    show_default=True,
    help="Device staging: off = per chunk copy in, compute, copy back; on = pinned buffers and overlapping "
    "streams (opt-in until measured on your GPU: check with `surgery selftest`); host = that pipeline on the CPU.",
)
@click.option(
    "--stats-json",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write device and memory figures of the run to this file (for bench/).",
)
@_user_errors
def apply(plan, out, force, quiet, allow_pickle, workers, seed, device, max_memory, resume, pipeline, stats_json):
    """Apply PLAN and write the new checkpoint.

    The output is built in a hidden side folder and renamed into place when complete, with
    config.json, tokenizer files, a model card (README.md) and surgery.json (the plan, the
    sources and the layer map; which layers are new, for `surgery train`)."""
    from surgery.api import apply as do_apply
    from surgery.report.summary import human_bytes

    from surgery.errors import SurgeryError
    from surgery.plan import parse_size

    try:
        limit = parse_size(max_memory, "", 1024) if max_memory is not None else None
    except ValueError as e:
        raise SurgeryError(f"--max-memory: {e}") from None
    res = do_apply(
        plan,
        out,
        force=force,
        progress=False if quiet else None,
        allow_pickle=allow_pickle,
        workers=workers,
        seed=seed,
        device=device,
        max_memory=limit,
        resume=resume,
        pipeline=pipeline,
        stats=stats_json,
    )
    if not quiet:
        rate = res.bytes_written / res.seconds / 1e9 if res.seconds else 0
        click.echo(
            f"wrote {res.path}: {res.num_layers} layers, {res.num_params:,} params, {human_bytes(res.bytes_written)} "
            f"in {len(res.shards)} shard(s), {res.seconds:.2f} s ({rate:.2f} GB/s)"
            + (f"; new layers {res.new_layers}" if res.new_layers else "")
        )


EPILOG_VALIDATE = """\b
Examples:
  surgery validate plan.yaml                       the layer map, sizes, config changes
  surgery validate 'plans/**/*.yaml' --strict      CI: every plan, warnings fail too
  surgery validate plans/*.yaml --format github    annotations on the pull request's lines
  surgery validate plan.yaml --format json         the versioned report (`surgery schema --report`)
  surgery validate plan.yaml --offline             the local cache only, no network
\b
Warning codes (for --ignore): duplicated-layers, vocab-mismatch, rope-mismatch,
narrowing-dtype, gradient-too-long, unknown-family, guessed-identity, config, chat-template,
unused-parameter (a mergekit config's parameter its method does not use; ignored, as mergekit does),
approximate-growth (widen hidden by a non-multiple: the function is kept only approximately).
"""


@main.command(epilog=EPILOG_VALIDATE)
@click.argument("plans", nargs=-1, required=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "github"]),
    default="text",
    show_default=True,
    help="text: the layer map; json: a versioned report; github: workflow annotations (::error file=,line=::).",
)
@click.option("--strict", is_flag=True, help="Warnings count as errors (exit 1).")
@click.option("--ignore", "ignore", multiple=True, metavar="CODE", help="Drop warnings with this code (repeatable).")
@click.option("--offline", is_flag=True, help="Use only the local caches (hub cache, surgery's header cache); no network.")
@click.option("--tensors", is_flag=True, help="Also list every output tensor with its recipe (text format).")
@click.option("--allow-pickle", is_flag=True, help="Accept pickled checkpoints (headers are read with weights_only=True).")
@_user_errors
def validate(plans, fmt, strict, ignore, offline, tensors, allow_pickle):
    """Check PLANS (files or globs; surgery plans or mergekit configs) without downloading weights.

    Hub models are resolved from config.json, the index and each safetensors header, fetched
    with ranged requests (no tensor data) and cached by revision. Prints what `apply` would
    write: the layer map (output layer <- source model[layer], how it is made), parameters,
    bytes read and written, config changes and warnings. Exit 0 when every plan is valid
    (and, with --strict, warning-free), 1 otherwise."""
    from surgery.api import validate_many
    from surgery.compile.lint import CODES
    from surgery.report.summary import as_github, envelope

    bad = sorted(set(ignore) - set(CODES))
    if bad:
        click.echo(f"error: --ignore {bad[0]}: unknown warning code\n  fix: codes: {', '.join(CODES)}", err=True)
        sys.exit(1)
    reports = validate_many(plans, allow_pickle=allow_pickle, offline=offline, ignore=set(ignore))
    ok = all(r.passed(strict) for r in reports)
    if fmt == "json":
        click.echo(json.dumps(envelope(reports, strict=strict), indent=2))
    elif fmt == "github":
        text = as_github(reports, strict=strict)
        if text:
            click.echo(text)
    else:
        for i, r in enumerate(reports):
            if i:
                click.echo("")
            click.echo(r.text(tensors=tensors), err=not r.valid)
            if r.valid and not r.passed(strict):
                click.echo(f"  --strict: {len(r.warnings)} warning(s) count as errors", err=True)
        if len(reports) > 1:
            n_bad = sum(1 for r in reports if not r.passed(strict))
            click.echo(f"\n{len(reports) - n_bad} of {len(reports)} plan(s) passed", err=bool(n_bad))
    sys.exit(0 if ok else 1)


@main.command()
@click.option("--train", "which", flag_value="train", help="The training config schema (`surgery train`).")
@click.option("--report", "which", flag_value="report", help="The `validate --format json` report schema.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file instead of stdout.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@_user_errors
def schema(which, out, force):
    """Print the JSON Schema of surgery plans (or --train configs, or the --report format).

    \b
    Editors validate and complete plans with it (VS Code's YAML extension, any
    yaml-language-server client): save it once and point a plan at it on its first line:
      surgery schema -o .surgery-plan.schema.json
      # yaml-language-server: $schema=./.surgery-plan.schema.json"""
    from surgery.plan.schema import plan_schema, report_schema
    from surgery.train.config import train_schema

    doc = {"train": train_schema, "report": report_schema}.get(which, plan_schema)()
    text = json.dumps(doc, indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        _write_file(out, text, force)


@main.command()
@click.argument("plan", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="map.svg or map.png (default: PLAN's name with .svg).",
)
@click.option("--force", is_flag=True, help="Replace an existing picture.")
@click.option("--offline", is_flag=True, help="Use only the local caches for hub models.")
@_user_errors
def show(plan, out, force, offline):
    """Draw PLAN's layer map: source layers left, output layers right, lines coloured by how each
    output layer is made (copy, identity, merge, random, zero). Reads headers only, like validate."""
    from surgery.api import compile_plan, load_plan
    from surgery.report.show import draw_layer_map

    from surgery.io.outdir import check_file_target

    out = out or plan.with_suffix(".svg")
    check_file_target(out, force, {"the plan": plan})  # before opening the models
    program = compile_plan(load_plan(plan), headers_only=True, offline=offline)
    check_file_target(out, force, _program_reads(program, plan))
    click.echo(f"wrote {draw_layer_map(program, out)}")


@main.command()
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--allow-pickle", is_flag=True)
@_user_errors
def inspect(model, fmt, allow_pickle):
    """Describe MODEL (a folder or hub id): family, layers, parameters, dtypes, shards, tied embeddings."""
    from surgery.api import inspect_model
    from surgery.report.summary import human_bytes, human_count

    info = inspect_model(model, allow_pickle=allow_pickle)
    if fmt == "json":
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}")
    click.echo(
        f"  family: {info['family']} (model_type {info['model_type']}){'  [guessed from tensor names]' if info['family_guessed'] else ''}"
    )
    click.echo(f"  layers: {info['num_layers']} under '{info['layer_prefix']}{{i}}.'")
    click.echo(f"  parameters: {human_count(info['parameters'])} ({info['parameters']:,}), {human_bytes(info['bytes'])}")
    click.echo("  dtypes: " + ", ".join(f"{k} {human_count(v)}" for k, v in info["dtypes"].items()))
    click.echo(f"  files: {', '.join(info['files'])}")
    click.echo(f"  tied embeddings: {'yes' if info['tied_embeddings'] else 'no'}")
    click.echo(f"  per-layer tensors: {', '.join(info['layer_tensors'])}")
    click.echo(f"  output projections (zeroed by init: identity): {', '.join(info['output_projections']) or 'none known'}")


@main.command()
@click.argument("plan", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--mergekit", "fmt", flag_value="mergekit", required=True, help="Write a mergekit 0.1.5 config (the only format so far).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file instead of stdout.")
@click.option("--force", is_flag=True, help="Replace an existing output file.")
@_user_errors
def export(plan, fmt, out, force):
    """Write the mergekit config equivalent to PLAN.

    Identity blocks become passthrough slices with `scale: 0` on that family's output
    projections; a plan that upcycles one model (`take`, then `upcycle`) becomes a mergekit-moe
    config (run it with `mergekit-moe`). A plan mergekit cannot express (random init, two merge
    methods, copies mixed with merges, `non_layer`, a zero router) is refused with the step and
    the reason."""
    from surgery.api import compile_plan, load_plan
    from surgery.compile.export import to_mergekit_yaml

    program = compile_plan(load_plan(plan))
    text = to_mergekit_yaml(program)
    if out is None:
        click.echo(text, nl=False)
        return
    _write_file(out, text, force, _program_reads(program, plan))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--sources",
    "recompute",
    is_flag=True,
    help="Also recompute every tensor from the sources surgery.json records (they must still be there) and compare.",
)
@_user_errors
def verify(out, recompute):
    """Check an output folder: every shard's size, header and CRC-32 against surgery.json, the
    tensors against the index; with --sources, every tensor recomputed from the recorded sources.
    Exit 0 when whole, 1 with the problems listed."""
    from surgery.io.verify import verify_output

    problems = verify_output(out)
    if not problems and recompute:
        from surgery.engine.recompute import recompute as redo
        from surgery.io.gguf import is_conversion, recompute_converted

        problems = recompute_converted(out) if is_conversion(out) else redo(out)
    if problems:
        from surgery.errors import OutputError

        raise OutputError(problems)
    click.echo(
        f"ok: {out} is complete; every shard's size, header and CRC-32 match its surgery.json"
        + ("; every tensor equals its recomputation from the sources" if recompute else "")
    )


@main.command()
@click.argument("gguf", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, help="The checkpoint folder to write (safetensors, config, tokenizer, chat template).")
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float32", "float16"]),
    default="bfloat16",
    show_default=True,
    help="What the dequantized weights are stored as (float32 keeps every dequantized value exactly).",
)
@click.option("--shard-size", default="5GB", show_default=True, help="Largest shard (e.g. 2GB, 500MB).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once the new one is complete).")
@_user_errors
def convert(gguf, out, dtype, shard_size, force):
    """Convert a llama.cpp GGUF file (quantized or not) into a HuggingFace checkpoint folder.

    \b
    Read with the `gguf` package and transformers' own GGUF mapping (config, tokenizer, chat
    template, tensor names), dequantized one tensor at a time (memory: one tensor), written
    through surgery's output protocol; surgery.json records the file's SHA-256, so
    `surgery verify OUT --sources` re-reads the GGUF and compares every tensor.
      surgery convert SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2 --dtype float32
    A plan may also name a .gguf file as a model (converted once into the cache, float32)."""
    from surgery.errors import PlanError
    from surgery.io.gguf import convert as run
    from surgery.plan import parse_size

    try:
        size = parse_size(shard_size)
    except ValueError as e:
        raise PlanError(f"--shard-size: {e}", fix="e.g. --shard-size 2GB") from None
    run(gguf, out, dtype=dtype, force=force, shard_size=size, echo=lambda m: click.echo(m, err=True))


@main.command()
@_user_errors
def plugins():
    """List installed plugins (entry points in the `surgery.plugins` group) and what each adds."""
    from surgery.methods import method_names
    from surgery.plugins import load_plugins

    found = load_plugins()
    if not found:
        click.echo("no plugins installed (plugins/surgery-mergekit is the first-party one)")
    for p in found:
        click.echo(f"{p.name}: {p.origin}")
        for kind, names in (("merge methods", p.methods), ("steps", p.steps), ("architectures", p.families), ("commands", p.commands)):
            if names:
                click.echo(f"  {kind}: {', '.join(names)}")
    click.echo(f"merge methods available: {', '.join(method_names())}")


EPILOG_TRAIN = """\b
Examples:
  surgery train examples/train-llama-pro.yaml              # one CPU or GPU
  surgery train cfg.yaml --tokens 50M --lr 1e-4 -o ./out   # flags override the file
  torchrun --nproc-per-node 8 -m surgery train cfg.yaml    # 8 GPUs (DDP; fsdp: true shards)
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
      --rdzv-endpoint HOST0:29500 -m surgery train cfg.yaml   # the same on each of 2 machines
  surgery train cfg.yaml --stop-after 1000 && surgery train cfg.yaml --resume
"""


def _train_extra():
    from importlib.util import find_spec

    if find_spec("accelerate") is None or find_spec("transformers") is None:
        from surgery.errors import SurgeryError

        raise SurgeryError("training needs transformers and accelerate, which are not installed", fix="pip install 'surgery[train]'")


@main.command(epilog=EPILOG_TRAIN)
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Output folder (overrides the config's `output`).")
@click.option("--model", help="Model folder or hub id to train (overrides `model`).")
@click.option("--data", "files", multiple=True, help="Training data file or glob (repeatable; overrides data.files).")
@click.option("--tokens", help="Token budget, e.g. 50M (replaces `tokens`/`steps`).")
@click.option("--steps", type=int, help="Optimizer-step budget (replaces `tokens`/`steps`).")
@click.option("--lr", type=float, help="Peak learning rate.")
@click.option(
    "--trainable", help="all, new-layers / new-params (from the model's surgery.json), routers / experts (a MoE) or a parameter-name glob."
)
@click.option("--micro-batch", type=int, help="Sequences per device per step.")
@click.option("--grad-accum", type=int, help="Gradient accumulation steps.")
@click.option("--seq-len", type=int, help="Packed sequence length.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]))
@click.option("--seed", type=int)
@click.option(
    "--report-to",
    help="Experiment tracking through HF Trainer's integrations, comma-separated: tensorboard (events in OUT/logs), wandb, "
    "mlflow, trackio, ... or none (overrides `report_to`).",
)
@click.option("--force", is_flag=True, help="Replace an existing output (when the new one is complete) or discard an interrupted run.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option(
    "--stop-after", type=click.IntRange(1), help="Stop after this many steps of the current stage, with a checkpoint to --resume from."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_user_errors
def train(
    config,
    out,
    model,
    files,
    tokens,
    steps,
    lr,
    trainable,
    micro_batch,
    grad_accum,
    seq_len,
    precision,
    seed,
    report_to,
    force,
    resume,
    stop_after,
    quiet,
):
    """Continue pretraining a checkpoint (typically a `surgery apply` output), optionally growing it.

    \b
    CONFIG is YAML (relative paths are relative to it):
      model: ./llama-pro-out        # an HF causal LM folder
      output: ./llama-pro-trained
      data: {files: [corpus/*.jsonl], seq_len: 2048}
      trainable: new-layers         # LLaMA Pro: only the inserted blocks; or all, or globs
      tokens: 500M                  # or steps: 10000
      lr: 2e-4
      grow: {at_tokens: 10B, plan: stack4.yaml}   # Gstack: train, stack, continue

    \b
    Writes OUT with the model, tokenizer, metrics.jsonl (step, tokens, loss, lr, tokens/s),
    loss.png, train.json and a model card; OUT appears only when the run is complete. Built on
    HF Trainer + accelerate: launch with torchrun or `accelerate launch` for many GPUs/machines."""
    _train_extra()
    from surgery.train import train as do_train

    overrides = {
        "model": model,
        "files": list(files) or None,
        "tokens": tokens,
        "steps": steps,
        "lr": lr,
        "trainable": trainable,
        "micro_batch": micro_batch,
        "grad_accum": grad_accum,
        "seq_len": seq_len,
        "precision": precision,
        "seed": seed,
        "report_to": report_to,
    }
    res = do_train(
        config,
        out=out,
        force=force,
        resume=resume,
        stop_after=stop_after,
        progress=False if quiet else None,
        echo=click.echo,
        overrides=overrides,
    )
    from surgery.train.dist import is_main

    if res.path is not None and is_main():
        ppl = f"; held-out loss {res.eval_loss:.4f}, perplexity {res.perplexity:.3f}" if res.perplexity is not None else ""
        click.echo(f"wrote {res.path}: {res.steps} steps, {res.tokens:,} tokens in {res.seconds:.1f} s{ppl}")


@main.command()
@click.option("--params", "-N", required=True, help="Target model size in parameters, e.g. 7B.")
@click.option("--tokens", "-D", required=True, help="Target training budget in tokens, e.g. 2T.")
@click.option("--layers", type=int, help="Target depth, to size the small model (target layers / 4).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_user_errors
def advise(params, tokens, layers, fmt):
    """When to grow: Gstack's guideline for a target of N parameters and D tokens.

    \b
    Train a model 4x shallower for d tokens, stack it 4x, continue to D:
      log10(d) = 0.88*log10(N) + 163.27/log10(C) - 5.74,   C = 6*N*D
    e.g. `surgery advise -N 7B -D 2T` gives d = 11.11B tokens (Llama2-7B)."""
    from surgery.errors import SurgeryError
    from surgery.train.advise import advice, advice_text
    from surgery.train.config import parse_count

    try:
        a = advice(parse_count(params), parse_count(tokens), layers)
    except ValueError as e:
        raise SurgeryError(str(e), fix="write sizes like 7B, 1.1B, 2T, 15T") from None
    click.echo(json.dumps(a, indent=2) if fmt == "json" else advice_text(a))


class _DefaultShow(click.Group):
    """`surgery mix CONFIG` is `surgery mix show CONFIG`; `surgery mix fit RUN...` its own command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


EPILOG_MIX = """\b
Examples:
  surgery mix train.yaml                       the domains' statistics and each rule's proportions
  surgery mix fit runs/p25 runs/p50 runs/p75   fit BiMix to proxy runs; print the best data.sources
  surgery mix fit runs/* --steps 20000         ... for a longer run
"""


@main.group(cls=_DefaultShow, epilog=EPILOG_MIX)
def mix():
    """Data mixtures: what proportions a config's `data.sources` get, and BiMix fitted to proxy runs.

    \b
    A training config mixes domains with `data.sources`:
      data:
        sources:
          - {name: docs, files: [docs/*.jsonl], weight: 3}
          - {name: code, files: [code/*.jsonl], eval_files: [code-eval.jsonl], weight: 1}
        weights: given     # or uniform, tokens, entropy (BiMix's conditional entropy), joint-entropy, marginal-entropy
        exhausted: repeat  # a domain smaller than its share: reuse it (reported), or stop (the run does not start)
    Each domain gets its own held-out loss in metrics.jsonl; eval_loss is their weighted average."""


@mix.command(name="show")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_user_errors
def mix_show(config, fmt):
    """Print a config's domains, their token statistics (entropies from the token cache) and the
    proportions every weights rule gives them, without training."""
    _train_extra()
    from surgery.train.mix import describe, describe_text

    doc = describe(config, progress=sys.stderr.isatty() and fmt == "text")
    click.echo(json.dumps(doc, indent=2) if fmt == "json" else describe_text(doc))


@mix.command(name="fit")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", type=click.IntRange(1), help="Optimise the proportions for a run of this many steps (default: the longest run's).")
@click.option(
    "--holdout",
    default="final",
    show_default=True,
    help="What is held out of the fit: `final` (each run's final evaluation, as BiMix evaluates its law) or a fraction "
    "of each run's last evaluations (e.g. 0.25).",
)
@click.option(
    "--min-share",
    type=click.FloatRange(0, 1),
    default=0.0,
    show_default=True,
    help="Every domain keeps at least this proportion (not in the paper; with 0 a domain whose loss does not fall with "
    "its share gets none).",
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_user_errors
def mix_fit(runs, steps, holdout, min_share, fmt):
    """Fit BiMix's law L_i(r_i, s) = A_i / r_i^alpha_i (B_i / s^beta_i + C_i) per domain to the
    held-out curves of finished proxy runs (different proportions, the same domains), report R^2 and
    the mean relative error on held-out points, and print the proportions that minimise the
    predicted average loss at --steps as a ready `data.sources` block."""
    from surgery.errors import PlanError
    from surgery.train.mix import fit_runs, fit_text

    if holdout != "final":
        try:
            holdout = float(holdout)
        except ValueError:
            holdout = -1.0
        if not 0 <= holdout <= 0.9:
            raise PlanError(f"--holdout {holdout!r}: give `final` or a fraction in [0, 0.9]", fix="e.g. --holdout final or --holdout 0.25")
    doc = fit_runs(list(runs), steps=steps, holdout=holdout, min_share=min_share)
    click.echo(json.dumps(doc, indent=2) if fmt == "json" else fit_text(doc))


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--x", "x", type=click.Choice(["tokens", "flops", "steps"]), default="tokens", show_default=True, help="The horizontal axis.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("runs.png"), show_default=True)
@click.option("--no-train-loss", is_flag=True, help="Held-out curves only.")
@click.option("--title", default="", help="The figure's title.")
@click.option("--force", is_flag=True, help="Replace an existing figure.")
@_user_errors
def plot(runs, x, out, no_train_loss, title, force):
    """Overlay several `surgery train` runs' loss curves on one figure: held-out loss (points and
    lines) and training loss (faint), against tokens, training FLOPs (each stage of a grown run
    counted at its own size) or steps; growth marked in each run's colour.

    \b
      surgery plot out-scratch out-stack out-random --x flops -o growth.png"""
    from surgery.train.plot import compare_runs

    from surgery.io.outdir import check_file_target

    check_file_target(out, force, {"a run's metrics.jsonl": [Path(r) / "metrics.jsonl" for r in runs]})
    _check_figure_suffix(out)
    click.echo(f"wrote {compare_runs(list(runs), out, x=x, title=title, train_loss=not no_train_loss)}")


@main.command(name="eval")
@click.argument("model")
@click.option(
    "--data",
    "files",
    multiple=True,
    required=True,
    help="Held-out text: .txt, .jsonl or .parquet files or globs (repeatable); or one YAML file with `sources:` "
    "(a training config's data.sources) to score each domain and their weighted average.",
)
@click.option(
    "--against", help="Another checkpoint: also report its perplexity and the max |logit difference| (0 for an identity expansion)."
)
@click.option("--seq-len", type=int, help="Window length (default: the model's context, at most 2048).")
@click.option("--stride", type=int, help="Window step (default: half the window).")
@click.option("--max-tokens", type=int, help="Score at most this many tokens.")
@click.option("--text-field", default="text", show_default=True, help="JSONL field / parquet column holding the text.")
@click.option("--device", default="auto", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_user_errors
def eval_(model, files, against, seq_len, stride, max_tokens, text_field, device, fmt):
    """Perplexity of MODEL on held-out text (strided windows); `--against BASE` compares logits."""
    _train_extra()
    from surgery.train.evaluate import evaluate

    r = evaluate(
        model,
        list(files),
        seq_len=seq_len,
        stride=stride,
        against=against,
        text_field=text_field,
        max_tokens=max_tokens,
        device=device,
        progress=sys.stderr.isatty() and fmt == "text",
    )
    if fmt == "json":
        click.echo(json.dumps(r, indent=2))
        return
    if "domains" in r:  # --data SOURCES.yaml: per domain, then the weighted average
        for name, d in r["domains"].items():
            line = f"{name}: perplexity {d['perplexity']:.4f} (loss {d['loss']:.4f}) on {d['scored_tokens']:,} tokens"
            if "against_loss" in d:
                line += f"; {d['against']}: {d['against_perplexity']:.4f}, max |logit difference| {d['max_abs_logit_diff']:.3g}"
            click.echo(line)
        click.echo(f"{r['model']}: perplexity {r['perplexity']:.4f} (loss {r['loss']:.4f}), the domains weighted ({r['weights']})")
        if "against_loss" in r:
            click.echo(f"{r['against']}: perplexity {r['against_perplexity']:.4f} (loss {r['against_loss']:.4f})")
        return
    click.echo(
        f"{r['model']}: perplexity {r['perplexity']:.4f} (loss {r['loss']:.4f}) on {r['scored_tokens']:,} tokens, "
        f"windows of {r['seq_len']} every {r['stride']}"
    )
    if "against" in r:
        click.echo(f"{r['against']}: perplexity {r['against_perplexity']:.4f} (loss {r['against_loss']:.4f})")
        click.echo(f"logits: max |difference| {r['max_abs_logit_diff']:.3g}, mean {r['mean_abs_logit_diff']:.3g}")


EPILOG_ANALYZE = """\b
Examples:
  surgery analyze ./model --data held-out.jsonl                    the layer table, best block per size
  surgery analyze ./model --data 'docs/*.txt' -o analysis/         + analysis.json, analysis.txt, layers.png
  surgery analyze ./model --data d.jsonl --suggest drop:4 > p.yaml a plan dropping the 4 layers that cost least
  surgery analyze ./merged --data d.jsonl --against ./parent        per-layer cosine and CKA against a parent
"""


@main.command(epilog=EPILOG_ANALYZE)
@click.argument("model")
@click.option("--data", "files", multiple=True, required=True, help="Held-out text: .txt, .jsonl or .parquet files or globs.")
@click.option("--samples", type=click.IntRange(1, 100_000), default=256, show_default=True, help="Sequences to run.")
@click.option("--seq-len", type=click.IntRange(2, 1 << 16), default=128, show_default=True, help="Tokens per sequence.")
@click.option(
    "--micro-batch",
    type=click.IntRange(1, 4096),
    default=8,
    show_default=True,
    help="Sequences per forward call (memory: one layer plus all samples' states at one depth).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    help="What the layers compute in: float32, bfloat16, float16, or auto (the checkpoint's); 16-bit halves memory.",
)
@click.option("--text-field", default="text", show_default=True, help="JSONL/parquet field holding the text.")
@click.option(
    "--suggest",
    "suggestions",
    multiple=True,
    metavar="drop:N|dus:S|expand:K",
    help="Print a plan: drop the N contiguous layers whose removal costs the least held-out loss (see --rank); "
    "SOLAR up-scale to S layers; K identity blocks.",
)
@click.option(
    "--rank",
    type=click.Choice(["loss", "distance"]),
    default="loss",
    show_default=True,
    help="How --suggest drop:N picks the block: the one whose removal raises the held-out loss least (measured, "
    "in the same pass), or the smallest angular distance alone (Gromov et al.; no extra memory).",
)
@click.option(
    "--loss-samples",
    type=click.IntRange(1, 100_000),
    default=64,
    show_default=True,
    help="Sequences the held-out loss of each candidate block is measured on (memory: one set of their states per candidate).",
)
@click.option("--against", default=None, help="Another model to compare layer by layer (same samples): cosine and CKA.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("-o", "--out", default=None, help="Write analysis.json, analysis.txt and layers.png to this folder.")
@click.option("--force", is_flag=True, help="Replace an existing report folder.")
@_user_errors
def analyze(
    model, files, samples, seq_len, micro_batch, device, dtype, text_field, suggestions, rank, loss_samples, against, fmt, out, force
):
    """Measure which layers change the representation least, streamed one layer at a time.

    For every layer l and span n, the angular distance between the hidden states entering layer l
    and layer l + n (last token; Gromov et al. 2024), Block Influence per layer (all tokens;
    ShortGPT), and hidden-state norms; the most redundant block of each size. Peak memory is about
    one layer plus the activations, whatever the depth. --suggest turns the result into a plan;
    for drop:N it also measures, in the same pass, the held-out loss with each block of N removed and
    suggests the cheapest (--rank distance: the smallest angular distance alone)."""
    from surgery.analyze import analyze as run, check_report_target, compare, parse_suggestion, report_reads, suggest, text_report
    from surgery.analyze import write_report

    show = sys.stderr.isatty() and fmt == "text"
    kinds = [parse_suggestion(w) for w in suggestions]
    reads = report_reads([model, against], list(files))
    if out is not None:  # an empty -o is an error, as everywhere; refused before any work
        out = check_report_target(out, reads, force)
    if against:
        from surgery.analyze import check_comparable

        check_comparable(model, against)
    sizes = tuple(n for kind, n in kinds if kind == "drop") if rank == "loss" else ()
    common = dict(
        samples=samples, seq_len=seq_len, micro_batch=micro_batch, device=device, text_field=text_field, progress=show, dtype=dtype
    )
    a = run(model, list(files), drop_sizes=sizes, loss_samples=loss_samples, **common)
    doc = a.as_dict()
    if against:
        b = run(against, list(files), **common)
        doc["against"] = {"model": str(against), **compare(a, b)}
    plans = []
    for what in suggestions:
        text, why = suggest(a, what, "m", str(Path(model).resolve()) if Path(model).exists() else str(model))
        plans.append((what, text, why))
    doc["suggestions"] = [{"suggest": w, "plan": t, "why": y} for w, t, y in plans]
    if out is not None:
        write_report(a, out, reads=reads, force=force, extra=doc, plans=plans)
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    if plans and out is None and len(plans) == 1 and not sys.stdout.isatty():
        click.echo(plans[0][1], nl=False)  # `--suggest drop:4 > plan.yaml`
        click.echo(f"# {plans[0][2]}")
        return
    click.echo(text_report(a))
    if against:
        click.echo(f"\nagainst {against}: boundary  cosine  CKA (last token)")
        for i, (c, k) in enumerate(zip(doc["against"]["cosine_last_token"], doc["against"]["linear_cka_last_token"], strict=True)):
            click.echo(f"  {i:>4}  {c:8.5f}  {k:8.5f}")
    for what, text, why in plans:
        click.echo(f"\n--suggest {what}: {why}\n{text}")


@main.command()
@click.option("--device", default="auto", show_default=True, help="The device to check: auto, cpu, cuda, cuda:N.")
@click.option("--bench", is_flag=True, help="Also time the device paths against the CPU.")
@_user_errors
def selftest(device, bench):
    """Check that this machine's device path writes the right bytes.

    Builds two small synthetic checkpoints and applies a plan using every recipe the engine
    computes (copies, casts, scales, linear, slerp, nuslerp, random and identity blocks, a plugin
    kernel when the mergekit plugin is there) on the CPU and on DEVICE, with the default
    synchronous staging and with `--pipeline on`; copies must match bit for bit, computed tensors
    within 1 ulp. Run it once on a new GPU setup before trusting `--device cuda`."""
    from surgery.selftest import selftest as run

    if not run(device, bench=bench, echo=click.echo):
        from surgery.errors import SurgeryError

        raise SurgeryError(
            "selftest failed: the device path disagrees with the CPU",
            fix="use --device cpu (and --pipeline off), and report the table above",
        )
    click.echo("selftest passed")


@main.command()
@click.option(
    "--dir",
    "folder",
    type=click.Path(path_type=Path),
    default=Path("surgery-demo"),
    show_default=True,
    help="Where the tiny model, plans and outputs go.",
)
@click.option("--force", is_flag=True, help="Replace an existing demo folder.")
@click.option("--no-train", is_flag=True, help="Skip the grow-then-train run.")
@_user_errors
def demo(folder, force, no_train):
    """Run the whole flow offline on a tiny Llama built on the spot.

    Builds a 4-layer model, validates and applies a LLaMA Pro identity expansion (4 -> 6
    layers), a SOLAR depth up-scale and a Gstack, loads each result with transformers, and
    checks that the identity expansion computes exactly what the original did. With the
    `train` extra, then grows-and-trains in one command (Gstack: train, stack 4x, continue)
    on Python's own documentation text, writing metrics.jsonl and loss.png."""
    from surgery.demo import run_demo

    run_demo(folder, force=force, echo=click.echo, train=not no_train)


if __name__ == "__main__":
    main()
