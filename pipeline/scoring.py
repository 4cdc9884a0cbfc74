"""Scoring a token stream under eval's protocols (windows, sliding, stream), for `goose eval` and the
lm-eval harness alike: a model is a `Scorer` (log-probabilities of the next tokens for a window,
optionally with a state)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..errors import GooseError
from ..student.model import Student


PROTOCOLS = ("windows", "sliding", "stream")


class Scorer:
    """next_logprobs(ids (1, T), state) -> (log p(ids[t+1] | ids[..t]) for t < T - 1, last logits, new state)."""

    recurrent = False

    def next_logprobs(self, ids, state=None):
        raise NotImplementedError


class StudentScorer(Scorer):
    recurrent = True

    def __init__(self, model: Student, device):
        self.model, self.device = model.eval(), device
        self.stats: dict = {}

    @torch.no_grad()
    def next_logprobs(self, ids, state=None):
        out = self.model(ids.to(self.device), state, collect_stats=True)
        for key, st in out.spike_stats.items():
            if key in self.stats:
                self.stats[key].merge(st)
            else:
                self.stats[key] = st
        logp = torch.log_softmax(out.logits.float(), -1)
        tgt = logp[:, :-1].gather(-1, ids[:, 1:].to(self.device).unsqueeze(-1)).squeeze(-1)
        return tgt, logp[:, -1], out.state


class TeacherScorer(Scorer):
    def __init__(self, model, device):
        self.model, self.device = model, device

    @torch.no_grad()
    def next_logprobs(self, ids, state=None):
        logits = self.model(input_ids=ids.to(self.device), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1)
        tgt = logp[:, :-1].gather(-1, ids[:, 1:].to(self.device).unsqueeze(-1)).squeeze(-1)
        return tgt, logp[:, -1], None


def nll_windows(scorer: Scorer, tokens: np.ndarray, L: int) -> tuple[float, int]:
    """Sum of NLL and count over non-overlapping windows of L tokens (each scores its last L - 1)."""
    total, n = 0.0, 0
    for start in range(0, len(tokens) - 1, L):
        ids = torch.from_numpy(tokens[start : start + L]).long().unsqueeze(0)
        if ids.shape[1] < 2:
            break
        tgt, _, _ = scorer.next_logprobs(ids)
        total -= float(tgt.double().sum())
        n += tgt.numel()
    return total, n


def nll_sliding(scorer: Scorer, tokens: np.ndarray, L: int, stride: int) -> tuple[float, int]:
    """Windows of L every `stride` tokens; each scores only targets not scored before (HF recipe)."""
    if not 0 < stride <= L:
        raise GooseError(f"--stride must be in 1..{L}")
    total, n, scored_to = 0.0, 0, 0  # targets up to index `scored_to` (exclusive) are done
    N = len(tokens)
    for begin in range(0, N - 1, stride):
        end = min(begin + L, N)
        ids = torch.from_numpy(tokens[begin:end]).long().unsqueeze(0)
        tgt, _, _ = scorer.next_logprobs(ids)  # targets are tokens begin+1 .. end-1
        first_new = max(scored_to, begin + 1) - (begin + 1)
        new = tgt[0, first_new:]
        total -= float(new.double().sum())
        n += new.numel()
        scored_to = end
        if end == N:
            break
    return total, n


def nll_stream(scorer: Scorer, tokens: np.ndarray, L: int) -> tuple[float, int]:
    """The whole stream in chunks of L with carried state; every token after the first is scored."""
    if not scorer.recurrent:
        raise GooseError("the stream protocol needs a recurrent model (a goose student)")
    total, n, state, last = 0.0, 0, None, None
    for start in range(0, len(tokens), L):
        chunk = torch.from_numpy(tokens[start : start + L]).long().unsqueeze(0)
        if last is not None:  # the previous chunk's last position predicts this chunk's first token
            total -= float(last[0, chunk[0, 0]].double())
            n += 1
        tgt, last, state = scorer.next_logprobs(chunk, state)
        total -= float(tgt.double().sum())
        n += tgt.numel()
    return total, n


def evaluate_stream(scorer: Scorer, tokens: np.ndarray, protocol: str, L: int, stride: int | None = None) -> dict:
    if protocol not in PROTOCOLS:
        raise GooseError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    if protocol == "sliding" and stride is None:
        stride = max(1, L // 2)
    t0 = time.perf_counter()
    if protocol == "windows":
        total, n = nll_windows(scorer, tokens, L)
    elif protocol == "sliding":
        total, n = nll_sliding(scorer, tokens, L, stride)
    else:
        total, n = nll_stream(scorer, tokens, L)
    seconds = time.perf_counter() - t0
    if n == 0:
        raise GooseError(f"the text has {len(tokens)} tokens: too few to score (need at least 2)")
    return {"protocol": protocol, "seq_len": L, "stride": stride if protocol == "sliding" else None,
            "tokens_scored": n, "nll": total / n, "ppl": math.exp(total / n), "seconds": seconds,
            "tokens_per_s": len(tokens) / seconds if seconds > 0 else None}
