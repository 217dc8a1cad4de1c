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


class ExpertLoad:
    """Per-expert load while a mixture of experts trains, from its routers' outputs (transformers'
    top-k routers return (logits, scores, chosen experts)): the share of routed token slots each
    expert received since the last record, over every layer, and Switch Transformer's balance
    term E * sum_i f_i P_i (f_i: that share, P_i: the mean router probability of expert i; the
    quantity transformers' router loss is), 1 when either is uniform, up to E when all tokens and
    all probability go to one expert."""

    def __init__(self, routers: list, experts: int):
        import torch

        self.experts = experts
        self.counts = torch.zeros(experts, dtype=torch.float64)
        self.probs = torch.zeros(experts, dtype=torch.float64)
        self.tokens = 0
        for r in routers:
            r.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        import torch

        if not module.training or not isinstance(output, tuple) or len(output) != 3:
            return
        logits, _scores, chosen = output
        with torch.no_grad():
            self.counts += torch.bincount(chosen.reshape(-1).cpu(), minlength=self.experts)[: self.experts].double()
            self.probs += torch.softmax(logits.detach().float(), dim=-1).sum(0).cpu().double()
            self.tokens += logits.shape[0]

    def take(self) -> dict | None:
        """The record since the last one ({"expert_load": [share per expert], "router_balance": E sum f P}), and reset."""
        if not self.tokens:
            return None
        share = self.counts / self.counts.sum()
        balance = float(self.experts * (share * (self.probs / self.tokens)).sum())
        out = {"expert_load": [round(float(x), 5) for x in share], "router_balance": round(balance, 5)}
        self.counts.zero_()
        self.probs.zero_()
        self.tokens = 0
        return out


def watch_experts(model) -> ExpertLoad | None:
    """An ExpertLoad over every top-k router of the model (None for a dense model)."""
    cfg = model.config
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    routers = [
        m for n, m in model.named_modules() if type(m).__name__.endswith("TopKRouter") or n.endswith(".mlp.gate") and hasattr(m, "top_k")
    ]
    if not experts or not routers:
        return None
    return ExpertLoad(routers, int(experts))
