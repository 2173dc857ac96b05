# SPDX-License-Identifier: Apache-2.0
"""LinearInt: a weight-only int4 / int8 per-group linear layer, the target of QAT with integer configs."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LinearInt", "quantize_int_weight", "int_qparams"]

# Registered tensors that hold the quantization: never cast by .to(dtype) / .half().
_QUANT_TENSORS = ("weight", "weight_scale", "weight_zero_point")


def int_qparams(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool, eps: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Per-group quantization parameters of a ``[..., K]`` tensor (groups of ``group_size`` along the last dim),
    computed in float32 without gradient, torchao's rules:

    * symmetric: levels ``[-2^(bits-1), 2^(bits-1) - 1]``, ``scale = max|w| / ((quant_max - quant_min) / 2)``
      (int4: ``/ 7.5``), ``zero_point = 0``;
    * asymmetric: levels ``[0, 2^bits - 1]``, ``scale = (max(w, 0) - min(w, 0)) / (quant_max - quant_min)``,
      ``zero_point = clamp(quant_min - round(min(w, 0) / scale))``.

    ``scale`` is clamped to at least ``eps``. Returns ``(scale, zero_point, quant_min, quant_max)`` with scale float32
    and zero_point float32 (integer values), both shaped ``[..., K // group_size]``.
    """
    if symmetric:
        quant_min, quant_max = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        quant_min, quant_max = 0, (1 << bits) - 1
    with torch.no_grad():
        w = weight.detach().float().reshape(*weight.shape[:-1], weight.shape[-1] // group_size, group_size)
        if symmetric:
            amax = w.abs().amax(dim=-1)
            scale = (amax / ((quant_max - quant_min) / 2)).clamp(min=eps)
            zero_point = torch.zeros_like(scale)
        else:
            min_neg = w.amin(dim=-1).clamp(max=0)
            max_pos = w.amax(dim=-1).clamp(min=0)
            scale = ((max_pos - min_neg) / (quant_max - quant_min)).clamp(min=eps)
            zero_point = (quant_min - torch.round(min_neg / scale)).clamp(quant_min, quant_max)
    return scale, zero_point, quant_min, quant_max


def quantize_int_weight(
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    bits: int,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of ``weight`` ``[N, K]`` on the grid of ``fourbit.fake_quantize(weight, scale, zero_point, quant_min,
    quant_max, group_size=group_size)``, with the same arithmetic (``round(w * (1 / scale))`` half to even in float32,
    zero point rounded and clamped), so LinearInt dequantizes to exactly the fake-quantized weight.

    Returns ``(qweight, scale, zero_point)`` in LinearInt's format: uint8 codes ``u = q - quant_min`` (int4: two per
    byte, the first in the high nibble), float32 scale and uint8 zero point ``zero_point - quant_min``.
    """
    n, k = weight.shape
    if not 0 <= quant_max - quant_min < (1 << bits):
        raise ValueError(f"[{quant_min}, {quant_max}] does not fit in {bits} bits")
    groups = k // group_size
    scale = scale.detach().float().reshape(n, groups)
    zp = zero_point.detach().float().reshape(n, groups).round().clamp(quant_min, quant_max)
    with torch.no_grad():
        w = weight.detach().float().reshape(n, groups, group_size)
        inv_scale = 1.0 / scale
        q = (zp.unsqueeze(-1) + torch.round(w * inv_scale.unsqueeze(-1))).clamp(quant_min, quant_max)
        codes = (q - quant_min).to(torch.uint8).reshape(n, k)
        if bits == 4:
            codes = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return codes.contiguous(), scale.contiguous(), (zp - quant_min).to(torch.uint8).contiguous()


class LinearInt(nn.Module):
    """``y = x @ W.T + bias`` with W stored as int4 or int8 codes with one float32 scale and one zero point per group
    of ``group_size`` input features: ``W = (code - zero_point) * scale``.

    Registered tensors: ``weight`` (uint8 codes ``[out, in * bits / 8]``, a Parameter with ``requires_grad=False``),
    ``weight_scale`` (float32 ``[out, in / group_size]``), ``weight_zero_point`` (uint8, same shape) and ``bias``.
    ``.to(dtype)`` / ``.half()`` never cast the codes or the scales. ``forward`` runs ``matmul_int``, which dequantizes
    W a tile of rows at a time into the compute dtype and multiplies (CPU and CUDA kernels).

    Build one with ``LinearInt.from_linear(linear, bits, group_size, symmetric)`` or ``fourbit.qat.convert_qat``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int = 32,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features} and {out_features}")
        if group_size <= 0 or in_features % group_size or (bits == 4 and group_size % 2):
            raise ValueError(f"group_size must be positive (even for int4) and divide in_features = {in_features}, "
                             f"got {group_size}")  # fmt: skip
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.compute_dtype = compute_dtype
        self.weight_dtype = dtype  # the dtype the weight had before quantization
        groups = in_features // group_size
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, device=device))
        self.register_buffer(
            "weight_zero_point", torch.full((out_features, groups), 1 << (bits - 1), dtype=torch.uint8, device=device)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_quantized(
        cls,
        weight: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        quant_min: int,
        quant_max: int,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> LinearInt:
        """The layer holding ``weight`` ``[out, in]`` quantized on the grid of
        ``fake_quantize(weight, scale, zero_point, quant_min, quant_max, group_size=group_size)``: its dequantized
        weight equals that fake-quantized weight bit for bit."""
        n, k = weight.shape
        layer = cls(k, n, bias=bias is not None, bits=bits, group_size=group_size, compute_dtype=compute_dtype,
                    device=weight.device, dtype=weight.dtype)  # fmt: skip
        qweight, s, zp = quantize_int_weight(weight, scale, zero_point, quant_min, quant_max, bits, group_size)
        layer.weight = nn.Parameter(qweight, requires_grad=False)
        layer.weight_scale = s
        layer.weight_zero_point = zp
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int = 32,
        symmetric: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> LinearInt:
        """Post-training quantization of ``linear``'s weight with :func:`int_qparams`'s rules."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if group_size <= 0 or linear.in_features % group_size:
            raise ValueError(f"group_size must be positive and divide in_features = {linear.in_features}, got {group_size}")
        scale, zero_point, qmin, qmax = int_qparams(linear.weight, bits, group_size, symmetric)
        return cls.from_quantized(linear.weight, scale, zero_point, qmin, qmax, bits, group_size, linear.bias,
                                  compute_dtype)  # fmt: skip

    def _op_args(self):
        return (self.weight, self.weight_scale, self.weight_zero_point, self.bits, self.group_size,
                [self.out_features, self.in_features])  # fmt: skip

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense ``[out, in]`` tensor (``dtype`` or the dtype it had before quantization)."""
        return torch.ops.fourbit.dequantize_int(*self._op_args(), dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        bias = self.bias.to(dtype) if self.bias is not None else None
        return torch.ops.fourbit.matmul_int(x.to(dtype), *self._op_args(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int{self.bits}, group_size={self.group_size}, compute_dtype={self.compute_dtype}"
        )

    def _apply(self, fn, recurse=True):
        # Dtype casts must move the quantization tensors without changing them: hand the float32 scales to `fn` as
        # int32 views of the same bits (which dtype casts skip), then view them back.
        scale = self.weight_scale
        self._buffers["weight_scale"] = scale.view(torch.int32)
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight_scale"] = self._buffers["weight_scale"].view(torch.float32)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        # Validate the shapes and dtypes before they replace this layer's tensors.
        expected = {
            "weight": (torch.uint8, (self.out_features, self.in_features * self.bits // 8)),
            "weight_scale": (torch.float32, (self.out_features, self.in_features // self.group_size)),
            "weight_zero_point": (torch.uint8, (self.out_features, self.in_features // self.group_size)),
        }
        for name, (dtype, shape) in expected.items():
            t = state_dict.get(prefix + name)
            if t is not None and (t.dtype != dtype or tuple(t.shape) != shape):
                error_msgs.append(f"{prefix}{name}: expected {dtype} of shape {shape}, got {t.dtype} of shape "
                                  f"{tuple(t.shape)}")  # fmt: skip
                return
        scale = state_dict.get(prefix + "weight_scale")
        if scale is not None and not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            error_msgs.append(f"{prefix}weight_scale: scales must be positive and finite")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
