"""Quantized cold KV pages, KIVI's way: keys per channel, values per token, 8, 4 or 2 bits.

A page record is the KV of one page for every layer, ``[num_layers, 2 (K, V), P, H_kv, D]`` (``memory/tiers.py``).
:func:`quantize_page` turns one into a :class:`QuantizedPage`; :func:`dequantize_page` gives back a tensor of the
record's shape and dtype. The split is KIVI's (Liu et al., 2024): key outliers sit in a few fixed channels, so

    K  per channel: one (scale, zero) per layer, head and channel for each group of ``min(group, P)`` tokens
       of the page (the tokens of the page, at the default page size 16 and group 32)
    V  per token:   one (scale, zero) per layer, token and head for each group of ``min(group, D)`` channels

Asymmetric: ``zero`` is the group's minimum (rounded down to the scale dtype), ``scale`` the step
``(max - zero) / (2^bits - 1)`` (rounded up), ``q = round((x - zero) / scale)`` in ``[0, 2^bits - 1]`` and
``deq(q) = zero + q * scale``. Codes are packed into uint8 (one int8, two int4 or four int2 per byte); scales and
zeros are stored beside them in float16 (float32 when a page holds values float16 cannot represent, or when asked).

**Error bound.** Every element x lies in its group's ``[zero, zero + (2^bits - 1) * scale]`` (the directed roundings
above make sure of it), so rounding to the nearest code gives, per element,

    |x - deq(x)| <= scale / 2,   scale = (max - min) / (2^bits - 1) of its group

(``scale`` is the stored step: never below that quotient, above it only by the float16 rounding of the zero point
and of the step itself), plus float32 arithmetic eps, plus,
for a record in bfloat16/float16, half an ulp of that dtype when the result is cast back. ``bits=16`` keeps the
page exact (bit-identical round trip). Each extra bit halves the step: int8's error is 1/85 of int2's for the same
group.

Accounting (pure integer functions, no tensors): :func:`quantized_page_nbytes` is exactly
``quantize_page(...).nbytes()``; :func:`device_bytes_per_request` is what a request holds on the device when its hot
tokens stay exact and its cold pages are kept quantized; :func:`pages_at_equal_bytes` is how many quantized pages fit
in the bytes of N exact ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

BITS = (16, 8, 4, 2)
"""Allowed cold-page precisions (16: exact)."""

__all__ = [
    "BITS",
    "QuantizedPage",
    "dequantize_page",
    "dequantize_keys",
    "dequantize_values",
    "device_bytes_per_request",
    "exact_page_nbytes",
    "pages_at_equal_bytes",
    "quantize_keys",
    "quantize_page",
    "quantize_values",
    "quantized_page_nbytes",
]


def _check(bits: int, group: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits: allowed: {', '.join(map(str, BITS))}; got {bits!r}")
    if group < 1 or (group & (group - 1)) != 0:
        raise ValueError(f"group: must be a power of two, got {group!r}")


def _group_size(group: int, axis_len: int, what: str) -> int:
    g = min(group, axis_len)
    if axis_len % g != 0:
        raise ValueError(f"{what} ({axis_len}) is not a multiple of the quantization group ({g})")
    return g


# ------------------------------------------------------------------------------------------------- packing
def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2^bits) -> bytes, ``8 // bits`` codes per byte (low bits first), flat."""
    flat = q.reshape(-1).to(torch.uint8)
    per = 8 // bits
    if per == 1:
        return flat.clone()
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.view(-1, per)
    out = flat[:, 0].clone()
    for i in range(1, per):
        out |= flat[:, i] << (bits * i)
    return out


def _unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed[:numel]
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=1).reshape(-1)[:numel]


# ---------------------------------------------------------------------------------------- group quantization
def _scale_dtype_for(x: torch.Tensor, scale_dtype: torch.dtype) -> torch.dtype:
    if scale_dtype == torch.float16 and x.numel() and float(x.abs().max()) > 0.5 * torch.finfo(torch.float16).max:
        return torch.float32  # float16 cannot hold this page's range (nor its step): keep float32 scales
    return scale_dtype


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    low = y.to(x.dtype) > x
    return torch.where(low, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    high = y.to(x.dtype) < x
    return torch.where(high, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def _quantize_groups(x: torch.Tensor, dim: int, bits: int, scale_dtype: torch.dtype):
    """Quantize ``x`` with one (scale, zero) per slice along ``dim`` (the group axis): codes (same shape as
    ``x``, uint8), scale and zero (``x`` with ``dim`` reduced, in ``scale_dtype``)."""
    qmax = (1 << bits) - 1
    xd = x.double()
    mn, mx = xd.amin(dim=dim, keepdim=True), xd.amax(dim=dim, keepdim=True)
    zero = _round_down(mn, scale_dtype)
    scale = _round_up((mx - zero.double()) / qmax, scale_dtype)
    s, z = scale.double(), zero.double()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.where(s > 0, torch.round((xd - z) / safe), torch.zeros_like(xd)).clamp_(0, qmax).to(torch.uint8)
    return q, scale.squeeze(dim), zero.squeeze(dim)


def _dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dim: int) -> torch.Tensor:
    return zero.float().unsqueeze(dim) + q.float() * scale.float().unsqueeze(dim)


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized K or V tensor ``[..., P, H, D]``: packed codes, per-group scale and zero."""

    packed: torch.Tensor  # uint8, flat; at bits 16: the exact tensor itself
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    bits: int
    group: int  # the effective group size (tokens for K, channels for V)
    shape: tuple[int, ...]
    dtype: torch.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)


def quantize_keys(k: torch.Tensor, bits: int, group: int = 32, scale_dtype: torch.dtype = torch.float16) -> QuantizedTensor:
    """Keys ``[..., P, H, D]`` per channel: one (scale, zero) per head and channel for each ``min(group, P)`` tokens."""
    _check(bits, group)
    shape = tuple(k.shape)
    if bits == 16:
        return QuantizedTensor(k.detach().clone(), None, None, 16, group, shape, k.dtype)
    *lead, p, h, d = shape
    g = _group_size(group, p, "page size")
    sd = _scale_dtype_for(k, scale_dtype)
    x = k.reshape(*lead, p // g, g, h, d)
    q, scale, zero = _quantize_groups(x, x.dim() - 3, bits, sd)
    return QuantizedTensor(_pack(q, bits), scale, zero, bits, g, shape, k.dtype)


def quantize_values(v: torch.Tensor, bits: int, group: int = 32, scale_dtype: torch.dtype = torch.float16) -> QuantizedTensor:
    """Values ``[..., P, H, D]`` per token: one (scale, zero) per token and head for each ``min(group, D)`` channels."""
    _check(bits, group)
    shape = tuple(v.shape)
    if bits == 16:
        return QuantizedTensor(v.detach().clone(), None, None, 16, group, shape, v.dtype)
    *lead, p, h, d = shape
    g = _group_size(group, d, "head dim")
    sd = _scale_dtype_for(v, scale_dtype)
    x = v.reshape(*lead, p, h, d // g, g)
    q, scale, zero = _quantize_groups(x, x.dim() - 1, bits, sd)
    return QuantizedTensor(_pack(q, bits), scale, zero, bits, g, shape, v.dtype)


def _codes(t: QuantizedTensor, grouped_shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for s in t.shape:
        n *= s
    return _unpack(t.packed, t.bits, n).view(grouped_shape)


def dequantize_keys(t: QuantizedTensor) -> torch.Tensor:
    if t.bits == 16:
        return t.packed.clone()
    *lead, p, h, d = t.shape
    q = _codes(t, (*lead, p // t.group, t.group, h, d))
    return _dequantize_groups(q, t.scale, t.zero, len(lead) + 1).reshape(t.shape).to(t.dtype)


def dequantize_values(t: QuantizedTensor) -> torch.Tensor:
    if t.bits == 16:
        return t.packed.clone()
    *lead, p, h, d = t.shape
    q = _codes(t, (*lead, p, h, d // t.group, t.group))
    return _dequantize_groups(q, t.scale, t.zero, len(lead) + 3).reshape(t.shape).to(t.dtype)


# ------------------------------------------------------------------------------------------------ page records
@dataclass(frozen=True)
class QuantizedPage:
    """One page record ``[..., 2, P, H, D]`` (usually ``[num_layers, 2, P, H_kv, D]``), K and V quantized."""

    k: QuantizedTensor
    v: QuantizedTensor
    bits: int
    group: int  # as asked; the effective groups are ``k.group`` tokens and ``v.group`` channels
    shape: tuple[int, ...]
    dtype: torch.dtype

    def nbytes(self) -> int:
        """Exact bytes held: packed codes + scales + zeros (at bits 16: the exact K and V)."""
        return self.k.nbytes() + self.v.nbytes()


def quantize_page(
    record: torch.Tensor, bits: int, group: int = 32, scale_dtype: torch.dtype = torch.float16
) -> QuantizedPage:
    """Quantize one page record ``[..., 2, P, H, D]``: K per channel, V per token (see the module docstring)."""
    if record.dim() < 4 or record.shape[-4] != 2:
        raise ValueError(f"page record: expected [..., 2, P, H, D], got {tuple(record.shape)}")
    k, v = record.select(-4, 0), record.select(-4, 1)
    return QuantizedPage(
        quantize_keys(k, bits, group, scale_dtype),
        quantize_values(v, bits, group, scale_dtype),
        bits, group, tuple(record.shape), record.dtype,
    )


def dequantize_page(qp: QuantizedPage) -> torch.Tensor:
    """The record back: same shape and dtype as the one quantized (bit-exact at bits 16)."""
    return torch.stack([dequantize_keys(qp.k), dequantize_values(qp.v)], dim=len(qp.shape) - 4)


def _first_axis(t: QuantizedTensor, i: int) -> QuantizedTensor:
    """Entry ``i`` of a quantized tensor's first axis (a layer of a page record), without unpacking the others:
    codes are packed in order, so a layer's codes are a contiguous run of bytes when its element count fills
    whole bytes (it does for every page shape: P * H * D is a multiple of 4)."""
    n = 1
    for s in t.shape[1:]:
        n *= s
    if t.bits == 16:
        return replace(t, packed=t.packed[i], shape=t.shape[1:])
    per_byte = 8 // t.bits
    if n % per_byte:
        raise ValueError(f"a layer of {n} codes does not fill whole bytes at {t.bits} bits")
    nb = n // per_byte
    return replace(t, packed=t.packed[i * nb : (i + 1) * nb], scale=t.scale[i], zero=t.zero[i], shape=t.shape[1:])


def dequantize_page_layer(qp: QuantizedPage, layer: int) -> torch.Tensor:
    """Layer ``layer`` of a ``[num_layers, 2, P, H, D]`` record, dequantized alone: ``[2, P, H, D]``, equal to
    ``dequantize_page(qp)[layer]``. Routed decode reads a quantized cold page one layer at a time, so it never
    holds a whole dequantized page."""
    if len(qp.shape) != 5:
        raise ValueError(f"page record: expected [num_layers, 2, P, H, D], got {qp.shape}")
    return torch.stack([dequantize_keys(_first_axis(qp.k, layer)), dequantize_values(_first_axis(qp.v, layer))])


# -------------------------------------------------------------------------------------------------- accounting
def exact_page_nbytes(page_size: int, num_layers: int, num_kv_heads: int, head_dim: int, elem_size: int) -> int:
    """Bytes of one exact page record (K and V, every layer)."""
    return num_layers * 2 * page_size * num_kv_heads * head_dim * elem_size


def quantized_page_nbytes(
    page_size: int, num_layers: int, num_kv_heads: int, head_dim: int, elem_size: int, bits: int,
    group: int = 32, scale_bytes: int = 2,
) -> int:
    """Exactly ``quantize_page(record, bits, group).nbytes()`` for a record of that shape (``scale_bytes``: 2 for
    float16 scales, 4 for float32); ``elem_size`` only counts at bits 16."""
    _check(bits, group)
    if bits == 16:
        return exact_page_nbytes(page_size, num_layers, num_kv_heads, head_dim, elem_size)
    per_tensor = num_layers * page_size * num_kv_heads * head_dim
    data = 2 * (-(-per_tensor // (8 // bits)))
    gk = _group_size(group, page_size, "page size")
    gv = _group_size(group, head_dim, "head dim")
    k_groups = num_layers * (page_size // gk) * num_kv_heads * head_dim
    v_groups = num_layers * page_size * num_kv_heads * (head_dim // gv)
    return data + 2 * (k_groups + v_groups) * scale_bytes


def device_bytes_per_request(
    context_tokens: int, hot_tokens: int, page_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
    elem_size: int, cold_bits: int, group: int = 32, scale_bytes: int = 2,
) -> int:
    """Device KV bytes of one request whose ``hot_tokens`` stay exact and whose other full pages are kept quantized
    to ``cold_bits``. Cold = the whole pages of ``context_tokens - hot_tokens``; what is left over (less than a page)
    counts as exact, as the partial tail page always is. ``cold_bits=16``: the whole context exact.

    Example (SmolLM2-135M: 30 layers, 3 KV heads, dim 64, bf16, P 16): 8192 tokens with 2048 hot and int4 cold
    pages -> 2048 * 23,040 + 384 * 126,720 = 95,846,400 bytes (91.4 MiB) instead of 188,743,680 (180 MiB)."""
    if context_tokens < 0 or hot_tokens < 0:
        raise ValueError("context_tokens and hot_tokens must be >= 0")
    per_token = exact_page_nbytes(1, num_layers, num_kv_heads, head_dim, elem_size)
    cold_pages = 0 if cold_bits == 16 else max(context_tokens - hot_tokens, 0) // page_size
    exact_tokens = context_tokens - cold_pages * page_size
    qpage = quantized_page_nbytes(page_size, num_layers, num_kv_heads, head_dim, elem_size, cold_bits, group, scale_bytes)
    return exact_tokens * per_token + cold_pages * qpage


def pages_at_equal_bytes(
    exact_pages: int, page_size: int, num_layers: int, num_kv_heads: int, head_dim: int, elem_size: int,
    bits: int, group: int = 32, scale_bytes: int = 2,
) -> int:
    """How many pages quantized to ``bits`` fit in the bytes of ``exact_pages`` exact pages (scales included)."""
    exact = exact_page_nbytes(page_size, num_layers, num_kv_heads, head_dim, elem_size)
    q = quantized_page_nbytes(page_size, num_layers, num_kv_heads, head_dim, elem_size, bits, group, scale_bytes)
    return exact_pages * exact // q
