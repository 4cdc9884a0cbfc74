"""The store's encodings in torch, on the device: decoded for training, the compact top-k encoded in stage one.

`CacheReader.read_indices(..., dequantize=True)` decodes on the host with numpy: the compact top-k back to
ids and float32 log-probabilities in probability order, int8 hidden states scaled back to float32, PCA
coordinates mapped back to full width. At GPT-2's shapes that is most of a reader's time (a `kd` batch of
16 x 1,024 spends about half its host time in the top-k decode; an `align` batch turns 2.3 KB/token of int8
into 9.2 KB/token of float32) and it multiplies the bytes copied to the GPU. `BatchDecoder` does the same
arithmetic on the stored arrays after they reach the device: the host only reads and decompresses.

Equal to the host path on CPU tensors (tests/test_loader.py): bit for bit on the top-k, the int8 hidden
states and every array passed through; PCA reconstructions to float32 matmul rounding (a different BLAS).
On CUDA, whose float64 exp and log are not numpy's, bench/gpu_check.py compares them element for element.

`encode_topk` is `cache.schema.encode_topk` in torch: on CUDA stage one encodes the top-k on the GPU, where
the numpy encode was a quarter to half of the host writer's time (docs/BENCHMARKS.md), and the same bytes
reach the store (tests/test_cache_teacher.py on CPU tensors; it is only correctly rounded arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch

from .schema import StoreSpec, hidden_channel_scale_name, hidden_layer_of, hidden_name, hidden_scale_name
from ..numerics import log1mexp


def encode_topk(ids: torch.Tensor, logprobs: torch.Tensor, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cache.schema.encode_topk in torch: (ids, log p) in any order (..., k) -> compact (gaps, rel) as int32
    tensors (the writer stores them at the schema's widths): the top-1 first (the first maximum on ties, as
    numpy's argmax), then the rest by id as gaps; rel = rint((log p_1 - log p_i) / step) in float64."""
    ids = ids.to(torch.int64)
    lp = logprobs.to(torch.float64)
    top = lp.argmax(-1, keepdim=True)
    key = torch.where(torch.arange(ids.shape[-1], device=ids.device) == top, -1, ids)
    order = torch.sort(key, dim=-1, stable=True).indices
    ids, lp = ids.gather(-1, order), lp.gather(-1, order)
    rel = torch.round((lp[..., :1] - lp) / step)  # round half to even, as np.rint
    gaps = ids.clone()
    gaps[..., 2:] = torch.diff(ids[..., 1:], dim=-1)
    return gaps.to(torch.int32), rel.clamp(0, 65535).to(torch.int32)


def fields_to_read(spec: StoreSpec, fields: list[str]) -> list[str]:
    """`fields` plus the stored arrays their decoding needs (the T=1 tail of a compact top-k, int8 scales)."""
    out = list(fields)

    def need(name: str) -> None:
        if name not in out:
            out.append(name)

    if spec.topk_encoding == "compact" and ("topk_ids" in fields or "topk_logprobs" in fields):
        need("topk_ids"), need("topk_logprobs"), need("tail_logmass")
    if spec.hidden_dtype == "int8":
        for layer in spec.hidden_layers:
            if hidden_name(layer) in fields:
                need(hidden_scale_name(layer)), need(hidden_channel_scale_name(layer))
    return out


def raw_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Stored arrays as tensors of the same width, for the copy to the device: uint16 travels as int16 (torch
    has little uint16 arithmetic; `BatchDecoder` reads it back unsigned), everything else as it is."""
    out = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        out[name] = torch.from_numpy(a.view(np.int16) if a.dtype == np.uint16 else a)
    return out


def _unsigned16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32).bitwise_and_(0xFFFF)


class BatchDecoder:
    """`raw_tensors` of `fields_to_read(spec, fields)` -> the batch `to_tensors(read_indices(..., fields))` gives:
    ids as int64, uint8 as int16, top-k log-probabilities and hidden states as float32, decoded in torch on
    whatever device the batch is on."""

    def __init__(self, spec: StoreSpec, fields: list[str], pca_basis: dict | None = None):
        self.spec, self.fields = spec, list(fields)
        self.dtypes = {name: np.dtype(a.dtype) for name, a in spec.arrays().items()}
        self.pca_basis = pca_basis or {}
        self._basis_on: dict = {}

    def _stored(self, batch: dict, name: str) -> torch.Tensor:
        """A stored array with its stored integer values (uint16 widened back), not yet converted."""
        t = batch[name]
        return _unsigned16(t) if self.dtypes[name] == np.uint16 else t

    def _passthrough(self, batch: dict, name: str) -> torch.Tensor:
        """What `to_tensors` makes of an array the reader does not decode."""
        dtype = self.dtypes[name]
        t = self._stored(batch, name)
        if dtype in (np.uint16, np.uint32, np.int32):
            return t.to(torch.int64)
        if dtype == np.uint8:
            return t.to(torch.int16)
        return t

    def _topk(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        spec = self.spec
        if spec.topk_encoding != "compact":
            lp = self._stored(batch, "topk_logprobs").to(torch.float32) * np.float32(-spec.logprob_step)
            return self._passthrough(batch, "topk_ids"), lp
        # cache.schema.decode_topk, in torch: the same float64 arithmetic and the same stable order
        g = self._stored(batch, "topk_ids").to(torch.int64)
        ids = torch.cat([g[..., :1], torch.cumsum(g[..., 1:], dim=-1)], dim=-1)
        lp = self._stored(batch, "topk_logprobs").to(torch.float64) * -spec.logprob_step
        m = lp.max(-1, keepdim=True).values
        lse = m + torch.log(torch.exp(lp - m).sum(-1, keepdim=True))
        t = batch["tail_logmass"][..., spec.tail_temperatures.index(1.0)].to(torch.float64)[..., None]
        log_head = log1mexp(t)  # log(1 - tail)
        lp = lp - lse + log_head
        order = torch.sort(-lp, dim=-1, stable=True).indices
        return ids.gather(-1, order), lp.gather(-1, order).to(torch.float32)

    def _basis(self, layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (layer, str(device))
        if key not in self._basis_on:
            mean, basis = self.pca_basis[layer]
            self._basis_on[key] = (torch.from_numpy(mean).to(device), torch.from_numpy(basis).to(device))
        return self._basis_on[key]

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        if "topk_ids" in self.fields or "topk_logprobs" in self.fields:
            ids, lp = self._topk(batch)
            if "topk_ids" in self.fields:
                out["topk_ids"] = ids
            if "topk_logprobs" in self.fields:
                out["topk_logprobs"] = lp
        for name in self.fields:
            if name in out:
                continue
            layer = hidden_layer_of(name)
            if layer is None:
                out[name] = self._passthrough(batch, name)
                continue
            h = batch[name]
            if self.spec.hidden_dtype == "int8":
                token = batch[hidden_scale_name(layer)].to(torch.float32)
                channel = batch[hidden_channel_scale_name(layer)].to(torch.float32)
                h = h.to(torch.float32) * token[..., None] * channel[:, None, :]
            if layer in self.pca_basis:
                mean, basis = self._basis(layer, h.device)
                h = h.to(torch.float32) @ basis + mean
            out[name] = h  # float16 as stored when neither int8 nor PCA, as the host path leaves it
        return out
