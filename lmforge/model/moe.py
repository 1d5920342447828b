"""Mixture-of-experts FFN: token-choice top-k routing over SwiGLU experts, computed dropless.

Every token goes to exactly `top_k` experts (none is dropped for capacity, as in MegaBlocks
and torchtitan); tokens are sorted by expert and each expert's block is one matmul, a
single grouped matmul (`torch.nn.functional.grouped_mm`) where torch offers it for the
shapes, a loop over experts otherwise. Expert weights are stacked 3-D tensors
([experts, out, in]), which FSDP2 shards along the expert dimension like any parameter.

The layer keeps what training needs beside the output: its load-balancing losses of the
last forward (`aux_losses`, collected by `Transformer.pop_aux_losses`) and the tokens each
expert received since the trainer last read them (`expert_load`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.feedforward import FeedForward


def route(logits: torch.Tensor, moe: MoEConfig, bias: torch.Tensor | None = None):
    """Top-k choice per token from router logits [tokens, experts] (fp32).

    Returns (scores [tokens, experts]: softmax or sigmoid of the logits, indices [tokens, k],
    weights [tokens, k]). The bias (auxiliary-loss-free balancing) shifts which experts are
    chosen, not how much they weigh (DeepSeek-V3, section 2.1.2).
    """
    scores = logits.softmax(dim=-1) if moe.gate == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    indices = choice.topk(moe.top_k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if moe.norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return scores, indices, weights * moe.route_scale


def load_balancing_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, E * sum_i f_i * P_i (Fedus et al., 2021, eq. 4).

    f_i: the share of the token-to-expert assignments that went to expert i (no gradient);
    P_i: the mean routing probability of expert i (sigmoid scores normalised per token, as
    DeepSeek-V3's balance loss). Equal load gives 1.
    """
    counts = torch.bincount(indices.flatten(), minlength=num_experts).to(scores.dtype)
    f = counts / counts.sum()
    probs = scores / scores.sum(dim=-1, keepdim=True)
    return num_experts * (f * probs.mean(dim=0)).sum()


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [tokens, in] sorted by group, weight [groups, out, in], `counts` [groups] rows per group
    -> [tokens, out]."""
    aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[1], weight.shape[1]))
    # bf16 on any device; fp32 only in eager mode on CPU (CUDA's kernel and the compiler's
    # shape rules take bf16 only).
    fp32_ok = x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()
    if hasattr(F, "grouped_mm") and aligned and (x.dtype == torch.bfloat16 or fp32_ok):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=counts.cumsum(0).to(torch.int32))
    pieces = [x_g @ w.t() for x_g, w in zip(x.split(counts.tolist()), weight, strict=True)]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[1])


class Experts(nn.Module):
    """`num_experts` SwiGLU FFNs as stacked weights: w13 [E, 2 * hidden, dim], w2 [E, dim, hidden]."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [tokens, dim] sorted by expert, `counts` [E] tokens per expert -> [tokens, dim]."""
        # Autocast does not cover grouped matmuls: cast to its dtype here, as it would a linear.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x, w13, w2 = x.to(dtype), self.w13.to(dtype), self.w2.to(dtype)
        gate, up = grouped_matmul(x, w13, counts).chunk(2, dim=-1)
        return grouped_matmul(F.silu(gate) * up, w2, counts)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        assert moe is not None
        self.moe = moe
        self.router = nn.Linear(config.dim, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, config.dim, config.expert_ffn_dim)
        self.shared = (
            FeedForward(config.dim, config.expert_ffn_dim * moe.num_shared_experts)
            if moe.num_shared_experts else None
        )
        # Auxiliary-loss-free balancing bias (a learned state, not trained by gradients: the
        # trainer moves it) and the tokens each expert received since the trainer last looked.
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts))
        self.register_buffer("expert_load", torch.zeros(moe.num_experts), persistent=False)
        self.aux_losses: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float, generator: torch.Generator | None = None) -> None:
        nn.init.normal_(self.router.weight, std=std, generator=generator)
        nn.init.normal_(self.experts.w13, std=std, generator=generator)
        nn.init.normal_(self.experts.w2, std=residual_std, generator=generator)
        if self.shared is not None:
            self.shared.init_weights(std, residual_std, generator)
        self.expert_bias.zero_()
        self.expert_load.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        moe = self.moe
        # The router in fp32: top-k choices flip on rounding error in bf16.
        with torch.autocast(flat.device.type, enabled=False):
            logits = F.linear(flat.float(), self.router.weight.float())
        # The bias routes whenever it is set (trained here with bias_update_rate > 0, or imported,
        # as Dots1's e_score_correction_bias); zero, it changes nothing.
        scores, indices, weights = route(logits, moe, self.expert_bias)
        order = indices.flatten().argsort(stable=True)
        counts = torch.bincount(indices.flatten(), minlength=moe.num_experts)
        token = order // moe.top_k
        out = self.experts(flat.index_select(0, token), counts) * weights.flatten()[order, None].to(flat.dtype)
        routed = torch.zeros_like(flat).index_add_(0, token, out)
        if self.shared is not None:
            routed = routed + self.shared(flat)
        # Not while backward recomputes a checkpointed forward (activation checkpointing): that
        # forward's tokens were counted, and its losses taken, the first time.
        if self.training and torch.is_grad_enabled():
            self._record(logits, scores, indices, counts)
        return routed.view(shape)

    def _record(self, logits, scores, indices, counts) -> None:
        moe = self.moe
        # Backward recomputing a checkpointed forward (activation checkpointing) computes the same
        # losses (it must save the same tensors) but neither counts its tokens nor keeps them again.
        recomputing = torch._C._current_graph_task_id() != -1
        if not recomputing:
            self.expert_load += counts.to(self.expert_load.dtype)
        losses = {}
        if moe.aux_loss_coef:
            losses["moe_aux_loss"] = moe.aux_loss_coef * load_balancing_loss(scores, indices, moe.num_experts)
        if moe.router_z_loss_coef:
            # ST-MoE's router z-loss: the squared log-partition, keeping router logits small.
            losses["router_z_loss"] = moe.router_z_loss_coef * torch.logsumexp(logits, dim=-1).square().mean()
        # Summed over forwards until popped (DPO runs the policy twice per batch).
        for name, value in losses.items() if not recomputing else ():
            self.aux_losses[name] = self.aux_losses.get(name, 0) + value

    def _apply(self, fn, recurse=True):
        """Casting the model (`.to(bfloat16)`) leaves the expert bias in fp32, as transformers keeps
        `e_score_correction_bias`: its small steps would vanish in bf16 and flip top-k choices."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != bias.dtype and bias.device.type != "meta":
            self._buffers["expert_bias"] = bias.to(self.expert_bias.device)
        return self

    def extra_repr(self) -> str:
        m = self.moe
        return f"experts={m.num_experts}, top_k={m.top_k}, gate={m.gate}, shared={m.num_shared_experts}"

