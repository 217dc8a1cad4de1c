"""Training a mixture of experts (an upcycled model, or any Mixtral / Qwen-MoE): transformers' router
load-balancing loss (Switch Transformer's, `router_aux_loss_coef` x aux) added to the training loss,
and only to it: held-out losses stay the language-model loss, comparable with a dense model's."""

from __future__ import annotations


def enable_router_aux_loss(model, coef: float | None) -> float | None:
    """Turn the router's auxiliary loss on while the model trains (`coef`: the config's own
    coefficient when None; 0 turns it off). Returns the coefficient in effect, or None for a model
    with no router (a dense model)."""
    cfg = model.config
    if not hasattr(cfg, "output_router_logits") or not hasattr(cfg, "router_aux_loss_coef"):
        return None
    if coef is not None:
        cfg.router_aux_loss_coef = coef
        if hasattr(model, "router_aux_loss_coef"):  # transformers' MoE heads copy it at construction
            model.router_aux_loss_coef = coef
    if not cfg.router_aux_loss_coef:
        cfg.output_router_logits = False
        return 0.0

    def follow_mode(module, args):  # the loss carries the aux term in training, never in evaluation
        module.config.output_router_logits = module.training

    model.register_forward_pre_hook(follow_mode)
    return float(cfg.router_aux_loss_coef)
