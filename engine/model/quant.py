"""Int8 draft: `quantize_int8` copies a `Decoder` with its Linear layers replaced by W8A8 `Int8Linear`.

Kernel: `torch._weight_int8pack_mm` fed integer-valued bf16 activations. On the AVX2 dev CPU it is the one
non-deprecated int8 path that makes decode cheaper than fp32: `torch._int_mm` runs a generic loop there,
oneDNN `qlinear_pointwise` costs ~60 us a call, and fbgemm's `quantized::linear_dynamic` needs deprecated
qint8 tensors (docs/draft-choice.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from engine.model.decoder import Decoder, fuse_projections

WEIGHT_QMAX = 127
_EPS = 1e-12  # keeps an all-zero row or channel from dividing by zero
_K_MULTIPLE = 8  # the CPU kernel reads 8 activations per aligned load, so rows of other lengths would overrun


class Int8Linear(nn.Module):
    """`y = x @ W.T + b` with per-output-channel int8 W and per-row dynamic `act_bits` x.

    Activations are rounded to integers in [-qmax, qmax] per row (exact in bf16 up to 8 bits); the kernel
    sums `x_int * (w_int * scale)` in fp32 and rounds to bf16, and the row scale and bias are applied in fp32.
    Every output element is summed in the same order whatever the batch, so a row never depends on the others.
    """

    qweight: torch.Tensor  # [N, K] int8
    kernel_scale: torch.Tensor  # [N] bf16, weight step / act_qmax
    bias: torch.Tensor | None  # [N] fp32

    def __init__(self, linear: nn.Linear, act_bits: int = 8) -> None:
        super().__init__()
        if linear.in_features % _K_MULTIPLE:
            raise ValueError(f"in_features={linear.in_features} is not a multiple of {_K_MULTIPLE}")
        if not 2 <= act_bits <= 8:
            raise ValueError(f"act_bits={act_bits} is outside 2..8")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.act_qmax = 2 ** (act_bits - 1) - 1
        w = linear.weight.detach().float()  # [N, K]
        # The kernel's scale is bf16 and also carries the activation grid's 1/act_qmax; deriving the weight
        # step from the rounded scale keeps the weights on exactly the grid the kernel multiplies by.
        kernel_scale = (w.abs().amax(dim=1).clamp_min(_EPS) / (WEIGHT_QMAX * self.act_qmax)).bfloat16()  # [N]
        step = kernel_scale.float() * self.act_qmax  # [N]
        qweight = torch.round(w / step[:, None]).clamp_(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)  # [N, K]
        self.register_buffer("qweight", qweight)
        self.register_buffer("kernel_scale", kernel_scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        amax = torch.linalg.vector_norm(x2, math.inf, dim=1, keepdim=True).clamp_min_(_EPS)  # [M, 1] max |x|
        inv = torch.div(self.act_qmax, amax)  # [M, 1]
        # A fresh tensor, so its rows start aligned for the kernel's loads.
        xq = torch.mul(x2, inv).round_().to(torch.bfloat16)  # [M, K] integers in [-qmax, qmax]
        y = torch._weight_int8pack_mm(xq, self.qweight, self.kernel_scale)  # [M, N] bf16: the output / amax
        y = torch.mul(y, amax)  # [M, N] in x's dtype (fp32 for fp32 x)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"act_qmax={self.act_qmax}, bias={self.bias is not None}"
        )


def quantize_int8(model: Decoder, *, include_lm_head: bool = True, act_bits: int = 8, fuse: bool = True) -> Decoder:
    """A new Decoder whose Linear layers are `Int8Linear`; `model` is untouched and embeddings stay fp32.

    q/k/v and gate/up are fused first, so each layer quantizes its two inputs once instead of five times; the
    scales are per output channel, so the fused products equal the separate ones bit for bit (tested).
    `fuse=False` keeps the seven Linears of a layer (the baseline of benchmarks/draft_step.py).

    A tied `lm_head` is quantized from its own copy of the embedding matrix, so the copy's config is untied.
    `act_bits` below 8 coarsens the activation grid, for a draft that disagrees with the target more often.
    """
    draft = copy.deepcopy(model)
    if fuse:
        fuse_projections(draft)
    keep: set[nn.Module] = set() if include_lm_head else {draft.lm_head}
    _replace_linears(draft, keep, act_bits)
    if include_lm_head and draft.config.tie_word_embeddings:
        draft.config = dataclasses.replace(draft.config, tie_word_embeddings=False)
    return draft


def _replace_linears(module: nn.Module, keep: set[nn.Module], act_bits: int) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            if child not in keep:
                setattr(module, name, Int8Linear(child, act_bits))
        else:
            _replace_linears(child, keep, act_bits)
