"""`goose generate`: sampling from a student in its recurrent form (O(1) state per token)."""

from __future__ import annotations

import os
import time

import torch

from ..errors import GooseError
from ..student.model import Student


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Keep the top-k logits and the smallest set whose probability reaches top_p; the rest -> -inf."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the token that crosses top_p
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _rss_mb() -> float | None:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def _state_bytes(state) -> int:
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, list):
        return sum(_state_bytes(v) for v in state)
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


@torch.no_grad()
def generate(model: Student, prompt_ids: list[int], *, max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, device="cpu", eos_id: int | None = None,
             on_token=None) -> dict:
    """Prompt through the chunked form, then one token per call through the recurrent form."""
    if not prompt_ids:
        raise GooseError("the prompt is empty (give at least one token)")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 0:
        raise GooseError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 0")
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    out = model(ids)
    state, logits = out.state, out.logits[:, -1]
    prompt_s = time.perf_counter() - t0
    new, rss = [], []
    t1 = time.perf_counter()
    for i in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), -1)
            nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
        token = int(nxt)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if eos_id is not None and token == eos_id:
            break
        out = model(nxt.view(1, 1), state, mode="recurrent")
        state, logits = out.state, out.logits[:, -1]
        if i % 32 == 0:
            rss.append(_rss_mb())
    gen_s = time.perf_counter() - t1
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new, "prompt_seconds": prompt_s,
            "seconds": gen_s, "tokens_per_s": len(new) / gen_s if gen_s > 0 else None,
            "state_bytes": _state_bytes(state), "rss_mb_first": rss[0] if rss else None,
            "rss_mb_last": rss[-1] if rss else None}
