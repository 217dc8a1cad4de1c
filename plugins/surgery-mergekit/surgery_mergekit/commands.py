"""`surgery mergekit CONFIG OUT`: run a config with mergekit itself, surgery's methods registered."""

from __future__ import annotations

import sys

import click


def is_output_projection(tensor_name: str) -> bool:
    """True when some known family says this tensor is a block's attention or MLP output projection."""
    from surgery.arch import families

    for fam in families().values():
        split = fam.split(tensor_name)
        if split is not None and fam.is_output_projection(split[1]):
            return True
    return False


def register_into_mergekit() -> None:
    """Register surgery's operations as mergekit merge methods (once)."""
    from mergekit import merge_methods

    if any(m.spec.name == "surgery_identity" for m in merge_methods.registered_methods()):
        return
    from .mk_methods import surgery_identity

    merge_methods.register(surgery_identity)


@click.command("mergekit")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path())
@click.option("--cuda", is_flag=True, help="Merge on the GPU (mergekit's --cuda).")
@click.option("--random-seed", type=int, default=None, help="mergekit's --random-seed.")
@click.option("--allow-crimes", is_flag=True, help="mergekit's --allow-crimes (mixed architectures).")
def mergekit_command(config, out, cuda, random_seed, allow_crimes):
    """Run a mergekit CONFIG with mergekit itself, writing OUT, with surgery's methods registered.

    \b
    Registered: surgery_identity, a passthrough whose per-model parameter `identity: true`
    zeroes the attention and MLP output projections (weights and biases; every MoE expert's)
    of every family surgery knows, so a LLaMA Pro expansion is one mergekit config:
      merge_method: surgery_identity
      slices:
        - sources: [{model: base, layer_range: [0, 4]}]
        - sources: [{model: base, layer_range: [3, 4], parameters: {identity: true}}]
    """
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    register_into_mergekit()
    with open(config, encoding="utf-8") as f:
        cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
    opts = MergeOptions(cuda=cuda, random_seed=random_seed, allow_crimes=allow_crimes)
    try:
        run_merge(cfg, out, options=opts)
    except Exception as e:  # mergekit raises many types; show it as a user error without a traceback
        click.echo(f"error: mergekit failed: {type(e).__name__}: {e}", err=True)
        sys.exit(1)
