"""MoE plumbing for training: router logits collected by forward hooks, the D2S loss, the expert-load heatmap.

transformers 5's Llava cannot return router logits of an MoE text model (``output_router_logits=True`` raises),
so hooks on each MoE layer's router record its logits during the student's forward pass instead.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.losses.kd import reply_starts
from distill.losses.router import expert_load, load_balancing_loss, micro_batch_share, router_entropy, router_z_loss
from distill.models.modality import router_token_masks
from distill.models.upcycle import moe_blocks
from distill.training.kd import KDConfig, KDLoss


class RouterRecorder:
    """Keeps the router logits of the latest forward pass, one [tokens, E] tensor per MoE layer.

    Each router's forward hook stores its logits on the router module itself, under this recorder's own attribute
    name (a model may have several recorders: the loss's and the expert-load callback's). Inside a compiled decoder
    layer (``kernels: [compile]``) the hook is traced, and torch.compile guards on what it reads: a layer number
    in the hook, or the length of a shared list or dict, would differ from layer to layer and recompile the layer
    for each one (past the recompile limit, the rest ran uncompiled). The attribute is the same in every layer.
    A recomputation under gradient checkpointing overwrites a layer's entry, as a new forward does.
    """

    _count = itertools.count()

    def __init__(self, model: torch.nn.Module) -> None:
        self.blocks = moe_blocks(model)
        if not self.blocks:
            raise ValueError("the model has no MoE layers to record")
        self.slot = f"_distill_router_logits_{next(self._count)}"
        self.handles = [block.gate.register_forward_hook(self._record) for _, block in self.blocks]

    def _record(self, gate: torch.nn.Module, _inputs, output) -> None:
        setattr(gate, self.slot, output[0])  # routers return (logits, top-k weights, top-k indices)

    def _pop(self) -> dict[int, torch.Tensor]:
        return {i: block.gate.__dict__.pop(self.slot) for i, block in self.blocks if self.slot in block.gate.__dict__}

    def take(self) -> list[torch.Tensor]:
        return list(self._pop().values())

    def take_valid(self, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
        """As ``take``, each layer's logits cut to the real (non-padding) tokens its router saw. Behind modality
        experts a router sees only the text rows, so the padding mask is lined up with those rows first."""
        logits = self._pop()
        if attention_mask is None:
            return list(logits.values())
        masks = dict(zip((i for i, _ in self.blocks), router_token_masks(self.blocks, attention_mask), strict=True))
        return [x[masks[i].to(x.device)] for i, x in logits.items()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._pop()


def router_share(labels: torch.Tensor, num_items_in_batch: Any, normalise: str) -> torch.Tensor | float:
    """``micro_batch_share`` in the unit ``num_items_in_batch`` counts (tokens, or replies under
    ``kd.normalise=replies``), so that a step's shares add up to 1 either way."""
    return micro_batch_share(reply_starts(labels) if normalise == "replies" else labels, num_items_in_batch)


class SparseKDLoss(KDLoss):
    """KD (+ CE) as in D2D, plus the load-balancing loss (and optional z-loss), each counted once per step."""

    def __init__(self, teacher: torch.nn.Module, cfg: KDConfig, alpha: float, recorder: RouterRecorder,
                 top_k: int, aux_coef: float, z_coef: float, aux_layers: str = "mean") -> None:
        super().__init__(teacher, cfg, alpha)
        self.recorder, self.top_k, self.aux_coef, self.z_coef = recorder, top_k, aux_coef, z_coef
        self.aux_layers = aux_layers
        n_layers, n_experts = len(recorder.blocks), recorder.blocks[0][1].experts.num_experts
        self.load_sum = torch.zeros(n_layers, n_experts)
        self.batches = 0

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any):
        self.recorder.take()
        loss, parts = super().__call__(model, inputs, num_items_in_batch)
        router_logits = self.recorder.take_valid(inputs.get("attention_mask"))  # padding rows already cut
        # KD and CE are sums over the step's tokens divided by their count; the router terms are means per
        # micro-batch, so each is weighted by this micro-batch's share of those tokens to count once per step.
        share = router_share(inputs["labels"], num_items_in_batch, self.normalise)
        aux = load_balancing_loss(router_logits, self.top_k, layers=self.aux_layers)
        loss = loss + self.aux_coef * share * aux
        parts["aux"] = aux.detach() * share
        if self.z_coef > 0:
            z = router_z_loss(router_logits, layers=self.aux_layers)
            loss = loss + self.z_coef * share * z
            parts["z"] = z.detach() * share
        if model.training:
            # kept on the device (read once, at the stage's end): no host read per micro-batch
            load = expert_load(router_logits, self.top_k)
            self.load_sum = self.load_sum.to(load.device) + load
            self.batches += 1
            entropy = router_entropy(router_logits)
            for row, (layer, _) in enumerate(self.recorder.blocks):
                parts[f"router_entropy/L{layer}"] = entropy[row]
                for e in range(load.size(1)):
                    parts[f"expert_load/L{layer}_e{e}"] = load[row, e]
        return loss, parts

    def mean_load(self) -> torch.Tensor:
        return self.load_sum.cpu() / max(self.batches, 1)


def write_load_heatmap(load: torch.Tensor, layers: list[int], out_dir: Path) -> dict[str, str]:
    """``expert_load.png`` (layer x expert heatmap) and ``expert_load.json`` under ``out_dir``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(2.5 + 0.7 * load.size(1), 1.6 + 0.4 * load.size(0)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(load.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_xticks(range(load.size(1)))
    for (r, c), v in np.ndenumerate(load.numpy()):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax, label="share")
    ax.set_title("expert load (share of top-k assignments)", fontsize=9)
    fig.tight_layout()
    png, js = out_dir / "expert_load.png", out_dir / "expert_load.json"
    fig.savefig(png, dpi=100)
    js.write_text(json.dumps({"layers": layers, "load": load.tolist()}, indent=1))
    return {"png": str(png), "json": str(js)}
