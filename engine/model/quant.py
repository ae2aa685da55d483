"""Int8 draft: `quantize_int8` copies a `Decoder` with its Linear layers replaced by W8A8 `Int8Linear`.

Kernel: oneDNN `onednn::qlinear_pointwise` (the op torchao's x86 int8 lowering targets; plain uint8/int8 tensors).
On our AVX2 CPU, `torch._int_mm` and `_weight_int8pack_mm` run 4-60x slower than fp32 `F.linear`, and fbgemm's
`quantized::linear_dynamic` needs the deprecated qint8 tensors (docs/draft-choice.md has the measurements).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from engine.model.decoder import Decoder

# Activations are 7-bit: without VNNI, oneDNN sums u8*s8 pairs in int16 (vpmaddubsw), and 2*255*127 would
# saturate while 2*127*127 fits. fbgemm's `reduce_range` (what quantize_dynamic used) does the same.
ACT_QMAX = 63
_ACT_ZERO_POINT = 64  # symmetric [-63, 63] shifted into uint8 [1, 127]
WEIGHT_QMAX = 127
_EPS = 1e-12  # keeps an all-zero row or channel from dividing by zero


class Int8Linear(nn.Module):
    """`y = x @ W.T + b` with per-output-channel int8 W and per-row dynamic 7-bit x, int32 accumulation.

    Each row is quantized with its own scale and integer sums are exact, so a row's output never depends on the
    other rows of the batch. CPU only; the oneDNN operand is packed lazily from `qweight`.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # [N, K]
        scale = w.abs().amax(dim=1).clamp_min(_EPS) / WEIGHT_QMAX  # [N]
        qweight = torch.round(w / scale[:, None]).clamp_(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8)  # [N, K]
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("_weight_zero_point", torch.zeros(self.out_features, dtype=torch.long))
        # +0.5 makes the float->uint8 truncation round half up, saving a separate round kernel.
        self.register_buffer("_act_offset", torch.tensor(_ACT_ZERO_POINT + 0.5))
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        self._packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        x2 = x.reshape(-1, self.in_features).float()  # [M, K]
        amax = x2.abs().amax(dim=1, keepdim=True).clamp_min_(_EPS)  # [M, 1]
        xq = torch.addcmul(self._act_offset, x2, torch.div(ACT_QMAX, amax)).to(torch.uint8)  # [M, K]
        y = torch.ops.onednn.qlinear_pointwise(
            xq, 1.0 / ACT_QMAX, _ACT_ZERO_POINT, self._packed_weight(), self.weight_scale,
            self._weight_zero_point, None, 1.0, 0, torch.float32, "none", [], "",
        )  # [M, N] fp32 = int32 sums * weight_scale / ACT_QMAX
        y.mul_(amax)
        if self.bias is not None:
            y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _packed_weight(self) -> torch.Tensor:  # opaque oneDNN layout of qweight.T [K, N]
        if self._packed is None:
            if self.qweight.device.type != "cpu":
                raise NotImplementedError(f"Int8Linear runs on CPU only, not {self.qweight.device}")
            self._packed = torch.ops.onednn.qlinear_prepack(self.qweight, None)
        return self._packed

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        self._packed = None  # buffers may have moved or changed; pack again on the next forward
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # The packed tensor is opaque (no storage), so deepcopy and pickle drop it and it is rebuilt lazily.
        return {**super().__getstate__(), "_packed": None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: Decoder, *, include_lm_head: bool = True) -> Decoder:
    """A new Decoder whose Linear layers are `Int8Linear`; `model` is untouched and embeddings stay fp32.

    A tied `lm_head` is quantized from its own copy of the embedding matrix, so the copy's config is untied.
    """
    draft = copy.deepcopy(model)
    keep: set[nn.Module] = set() if include_lm_head else {draft.lm_head}
    _replace_linears(draft, keep)
    if include_lm_head and draft.config.tie_word_embeddings:
        draft.config = dataclasses.replace(draft.config, tie_word_embeddings=False)
    return draft


def _replace_linears(module: nn.Module, keep: set[nn.Module]) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            if child not in keep:
                setattr(module, name, Int8Linear(child))
        else:
            _replace_linears(child, keep)
