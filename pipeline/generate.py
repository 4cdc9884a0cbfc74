"""`goose generate`: sampling from a student in its recurrent form (O(1) state per token)."""

from __future__ import annotations

import math
import os
import signal
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


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Bad sampling arguments fail before any model is loaded."""
    if max_new_tokens < 1:
        raise GooseError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise GooseError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise GooseError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GooseError(f"--top-p must be in (0, 1], got {top_p}")


class TextStream:
    """Turns tokens into text as they are generated and hands each new piece to `write` at once.

    The prompt (`context`, its token ids) and the continuation are decoded *together*: after each new token
    the text of the prompt plus everything generated so far is decoded, and only what that adds to the text
    already written is passed on. So the space (or its absence) between the prompt and the first new token,
    and between any two new tokens, is exactly what the tokenizer's `decode` of the whole sequence gives
    (`raw prompt + streamed text == decode(prompt_ids + new_ids)` for a prompt that round-trips). A piece that
    ends inside a multi-byte character (byte-level BPE) waits for the token that completes it.

    To keep each step O(1) in a long generation, only the last `window` tokens are decoded (the decoded text
    of a window is re-anchored when it grows past that); decoding is local, so this matches decoding the
    whole sequence."""

    def __init__(self, tokenizer, write, context: list[int] | None = None, skip_id: int | None = None,
                 window: int = 64):
        self.tokenizer, self.write, self.skip_id = tokenizer, write, skip_id
        self.window = max(int(window), 4)
        self.ids: list[int] = list(context or [])[-self.window:]  # the decoded tail: prompt, then new tokens
        self.done = len(self.ids)  # self.ids[:done] are the tokens whose text is out (the prompt counts)
        self.text = self._decode(self.ids)  # decode(self.ids[:done])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False) if ids else ""

    def _emit(self, full: str) -> None:
        if full.startswith(self.text):
            piece = full[len(self.text):]
        else:  # the tokenizer rewrote earlier text (rare): print the new tokens decoded after the last written one
            base = self._decode(self.ids[max(self.done - 1, 0):self.done])
            tail = self._decode(self.ids[max(self.done - 1, 0):])
            piece = tail[len(base):] if tail.startswith(base) else self._decode(self.ids[self.done:])
        if piece:
            self.write(piece)
        self.done, self.text = len(self.ids), full
        if len(self.ids) > self.window:  # re-anchor: keep the last half window as context
            self.ids = self.ids[-(self.window // 2):]
            self.done = len(self.ids)
            self.text = self._decode(self.ids)

    def __call__(self, token: int) -> None:
        if token == self.skip_id:  # the end-of-text token that stops generation is not printed
            return
        self.ids.append(int(token))
        full = self._decode(self.ids)
        if full.endswith("\ufffd") and len(self.ids) - self.done < 8:
            return  # half a character: wait for the rest
        self._emit(full)

    def flush(self) -> None:
        if len(self.ids) > self.done:
            self._emit(self._decode(self.ids))


def load_for_generation(folder, device: str, *, ternary: bool = False):
    """(student, device) for `goose generate`: the saved student, or with `ternary` its ternary inference
    path (CPU only; it compiles too, its C kernels one opaque op of the graph)."""
    from .devices import resolve_device, ternary_device

    dev = ternary_device(device) if ternary else resolve_device(device)
    model = Student.from_pretrained(folder, device=dev)
    if ternary:
        from ..student.ternary import ternary_student

        model = ternary_student(model)
    return model, dev


@torch.no_grad()
def generate(model: Student, prompt_ids: list[int], *, max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, device="cpu", eos_id: int | None = None,
             on_token=None, keep_tokens: bool = True, compile: bool = False) -> dict:
    """Prompt through the chunked form, then one token per call through the recurrent form.

    compile=True runs the recurrent steps through torch.compile: the per-token step is many small ops, so
    fusing them cuts its time ~3-4x on CPU (bench/bench_student_vs_dense.py), after a compilation of ~10-40 s
    that pays off only over long generations (the first step includes it; `compile_seconds` reports it).

    `on_token(id)` is called for every new token as soon as it is sampled; generation stops after
    `eos_id` (when given; it is kept in `new_tokens`) or after `max_new_tokens` tokens, or at Ctrl-C
    (`interrupted`). keep_tokens=False keeps only the count (`n_new`), for very long streamed runs."""
    if not prompt_ids:
        raise GooseError("the prompt is empty (give at least one token)")
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if max(prompt_ids) >= model.cfg.vocab_size or min(prompt_ids) < 0:
        raise GooseError(f"the prompt has token ids outside the student's vocabulary of {model.cfg.vocab_size}: "
                         f"wrong --tokenizer")
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    out = model(ids)
    state, logits = out.state, out.logits[:, -1]
    if ids.is_cuda:  # the prompt's kernels finish before its time is taken (else they leak into the first token)
        torch.cuda.synchronize(ids.device)
    prompt_s = time.perf_counter() - t0
    step = torch.compile(model) if compile else model
    compile_s = None
    new, rss, n_new, interrupted = [], [], 0, False
    # Ctrl-C sets a flag checked once per token: a KeyboardInterrupt raised at an arbitrary point (inside a
    # finaliser, where Python only prints it) can be lost and the loop would run on
    stop = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum))
    except ValueError:  # not the main thread: KeyboardInterrupt stays the only way in
        previous = None
    t1 = time.perf_counter()
    try:
        for i in range(max_new_tokens):
            if stop:
                interrupted = True
                break
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), -1)
                nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
            token = int(nxt)
            n_new += 1
            if keep_tokens:
                new.append(token)
            if on_token is not None:
                on_token(token)
            if eos_id is not None and token == eos_id:
                break
            t_step = time.perf_counter()
            out = step(nxt.view(1, 1), state, mode="recurrent")
            state, logits = out.state, out.logits[:, -1]
            if compile and compile_s is None:
                compile_s = time.perf_counter() - t_step
            if i % 32 == 0:
                rss.append(_rss_mb())
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    gen_s = time.perf_counter() - t1
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new, "n_new": n_new, "interrupted": interrupted,
            "prompt_seconds": prompt_s, "seconds": gen_s, "compile_seconds": compile_s,
            "tokens_per_s": n_new / gen_s if gen_s > 0 else None,
            "state_bytes": _state_bytes(state), "rss_mb_first": rss[0] if rss else None,
            "rss_mb_last": rss[-1] if rss else None}
