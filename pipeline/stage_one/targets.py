"""The per-token targets stage one stores, from a teacher's full-vocabulary logits.

`teacher_targets` is the one function that turns logits into what the store keeps; its eager reference and its
compiled CPU kernels finish every row with the same formulas (`finish_rows`). All reductions run in fp32
whatever the teacher's dtype.
"""

from __future__ import annotations

import threading
import types
from concurrent.futures import ThreadPoolExecutor

import torch

from .native_topk import topk_rows_native


class NonFiniteLogits(ValueError):
    """The teacher produced NaN or +-inf logits; `rows` are the flat (B*L) row indices where it did."""

    def __init__(self, rows: list[int]):
        super().__init__(f"non-finite logits in {len(rows)} positions")
        self.rows = rows


# A tail position's shifted logit: exp(_MASKED / T) is 0 at every T, and 0 * _MASKED is 0, not NaN.
_MASKED = -1e30


def _slice_rows(vocab: int, device: torch.device) -> int:
    """Rows of logits per slice: on CPU about 1 MB of fp32 (L2-resident, so the passes over the
    vocabulary below cost what the arithmetic costs, not what main memory does: measured 2-3x cheaper
    than 16 MB slices), but at least 8 rows so the per-op overhead stays small at V = 50257."""
    if device.type != "cpu":
        return max(1, (1 << 26) // vocab)
    return max(8, (1 << 18) // vocab)


def _compiled_slice_rows(vocab: int) -> int:
    """Rows per call of the compiled kernels: as `_slice_rows`, but at least 16 (3.2 MB at V = 50257): each
    call pays dynamo's guards and wrappers, under the GIL, and with two worker threads 16-row calls ran
    ~13 % faster than 8-row ones (a fused kernel reads the slice twice, not once per op, so L2 matters less)."""
    return max(16, (1 << 18) // vocab)


_TOPK_GROUP = 16
_TOPK_INNER_MIN_GROUPS = 2


def topk_uses_groups(vocab: int, k: int, device: torch.device, min_groups: int = 8) -> bool:
    return device.type == "cpu" and vocab >= min_groups * k * _TOPK_GROUP


def topk_rows(z: torch.Tensor, k: int, sorted: bool = True, min_groups: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(z, k, sorted=sorted) for 2-D z, in two small top-k's instead of one over the vocabulary.

    The row is cut into W strided groups of g elements (group j = {j, j + W, j + 2W, ...}) plus single
    elements past g * W. Every one of the row's k largest lies in one of the k groups with the largest
    maxima (a group outside them has k groups above it, so k distinct elements above its maximum), so
    the top-k of those k * g candidates is the row's top-k (equal values may come in another order).
    The group maxima are one vectorised pass; the two top-k's see V / g and k * g elements, and where V / g
    is itself large (3,142 at V = 50257) its top-k is found the same way, one level down. CPU only (on a GPU
    torch.topk is fast and this saves nothing); plain torch.topk when the vocabulary is small.
    sorted=False: the k in any order (the inner level's).
    """
    rows, vocab = z.shape
    g = _TOPK_GROUP
    if not topk_uses_groups(vocab, k, z.device, min_groups):
        return torch.topk(z, k, dim=-1, sorted=sorted)
    width = vocab // g
    # group maxima by halving: max of the two halves, four times (elementwise ops run vectorised; a
    # reduction over a middle axis of 16 does not, measured 5x slower)
    maxima = torch.maximum(z[:, : width * g // 2], z[:, width * g // 2 : width * g])
    while maxima.shape[1] > width:
        half = maxima.shape[1] // 2
        maxima = torch.maximum(maxima[:, :half], maxima[:, half:])
    rest = vocab - width * g
    if rest:
        maxima = torch.cat([maxima, z[:, width * g :]], -1)  # the remainder: groups of one
    # the k largest maxima: the same two-level search again where the maxima are still many (3,142 at
    # V = 50257: 4x cheaper than their plain top-k)
    _, group = topk_rows(maxima, k, sorted=False, min_groups=_TOPK_INNER_MIN_GROUPS)  # (rows, k)
    cols = group.unsqueeze(-1) + torch.arange(g, device=z.device) * width  # (rows, k, g)
    if rest:
        single = group >= width  # a remainder element: its own column, once; its other g - 1 slots masked
        cols = torch.where(single.unsqueeze(-1), (group + (width * g - width)).unsqueeze(-1), cols)
        cand = z.gather(-1, cols.view(rows, k * g)).view(rows, k, g)
        cand[..., 1:].masked_fill_(single.unsqueeze(-1), float("-inf"))
        cand = cand.view(rows, k * g)
    else:
        cand = z.gather(-1, cols.view(rows, k * g))
    vals, j = torch.topk(cand, k, dim=-1, sorted=sorted)
    return vals, cols.view(rows, k * g).gather(-1, j)


def _temperature_order(temps: list[float]) -> tuple[list[tuple[int, float]], set[int]]:
    """The order to visit the temperatures in, and which of them are squares of the one before.

    exp(s / T) = exp(s / 2T)^2, so where T and 2T are both stored (1, 2, 4 and 1.5, 3 by default) one
    exp and a multiplication replace two exps, the costliest pass per temperature. Each squaring doubles
    the relative rounding error of an element (4 ulp for T = 1 from T = 4, 2.4e-7), below the fp32
    summation error over the vocabulary that the tail sum has anyway; a 0 (a masked top-k entry) stays 0.
    """
    index = {t: j for j, t in enumerate(temps)}
    order, squared_from, seen = [], set(), set()
    for j, t in sorted(enumerate(temps), key=lambda jt: -jt[1]):  # hottest first: chains run downwards
        if j in seen:
            continue
        chain = [(j, t)]
        while t / 2 in index and index[t / 2] not in seen:
            t = t / 2
            chain.append((index[t], t))
        for i, (jj, _) in enumerate(chain):
            seen.add(jj)
            if i:
                squared_from.add(jj)
        order += chain
    return order, squared_from


_MAX_EXP_POWER = 64


def exp_power_plan(temps) -> tuple[int, list[int]] | None:
    """(N, n_j) with 1 / T_j = n_j / N for every stored temperature, n_j an integer <= 64, N the smallest
    such; None if there is none (a temperature like 1.1 beside 1.25 needs N = 55: fine; an irrational one
    has none).

    Then exp(s / T_j) = u^n_j with u = exp(s / N): one exp per logit and a few multiplications make every
    temperature's term, where each exp costs several times a multiplication (the default grid 1, 1.25, 1.5,
    2, 3, 4 is N = 60, powers 60, 48, 40, 30, 20, 15). Each multiplication adds half an ulp, and u's own
    rounding is raised to the n-th power: at most ~n ulp of relative error per element (3.6e-6 at n = 60),
    below the 1e-5 the targets are held to and unbiased enough that the tail sums over the vocabulary
    keep far less (tested against float64). Terms small enough to underflow do so as the direct exp would
    (u^n < 1e-38 either way); a tail that small is recomputed exactly anyway (`_redo_low_tails`).
    """
    for n_base in range(1, _MAX_EXP_POWER + 1):
        powers = [n_base / t for t in temps]
        if all(abs(p - round(p)) < 1e-9 and 1 <= round(p) <= _MAX_EXP_POWER for p in powers):
            return n_base, [int(round(p)) for p in powers]
    return None


def _powers_of(u: torch.Tensor, wanted) -> dict[int, torch.Tensor]:
    """u^n for each n in `wanted`, by repeated squaring with shared intermediate powers (u^15 = (u^7)^2 u,
    u^7 = (u^3)^2 u, ...): about two multiplications per distinct power."""
    out = {1: u}

    def power(n: int) -> torch.Tensor:
        if n not in out:
            half = power(n // 2)
            out[n] = half * half if n % 2 == 0 else half * half * u
        return out[n]

    for n in sorted(set(wanted)):
        power(n)
    return out


def finish_rows(head_s: torch.Tensor, tails, dot: torch.Tensor, gold_s: torch.Tensor, order):
    """Every per-row target from a row's top-k and its tail sums: the formulas both paths of
    `teacher_targets` share (the eager reference calls this, and the compiled kernel traces it).

    head_s (n, k): the top-k logits minus the row's max (<= 0); tails[j] (n,): the sum of exp(s / T_j) over the
    tail (never total minus head); dot (n,): the tail's sum(exp(s) * s) at T = 1; gold_s (n,): the gold
    token's shifted logit; order: (j, T_j) pairs (`_temperature_order`). Returns (top-k log-probs (n, k),
    tail log-masses (n, T), entropy, gold NLL, log totals (n, T)), T = 1 giving the first, third and fourth:
    log p_i = s_i - log S, H = log S - sum(e * s) / S over every id (the tail's part from `dot`, the head's
    from its k values), with S the row's total sum of exp(s) at T = 1.
    """
    logmass, log_totals = [None] * len(order), [None] * len(order)
    for j, t in order:
        head_e = torch.exp(head_s / t) if t != 1.0 else torch.exp(head_s)
        total = tails[j] + head_e.sum(-1)
        log_totals[j] = total.log()
        logmass[j] = tails[j].log() - log_totals[j]
        if t == 1.0:
            entropy = log_totals[j] - (dot + (head_e * head_s).sum(-1)) / total
            gold_nll = log_totals[j] - gold_s
            logprobs = head_s - log_totals[j].unsqueeze(-1)
    return logprobs, torch.stack(logmass, -1), entropy, gold_nll, torch.stack(log_totals, -1)


class _CompiledReductions:
    """The vocabulary-wide passes of `teacher_targets` for one slice of rows as two compiled kernels: the top-k
    in C (`native_topk.topk_rows_native`: the k-th largest strided group maximum, then the ~k logits of the
    groups that reach it ranked branch-free; torch.topk's sorts mispredict on every new row and were two
    thirds of these reductions at V = 8192), then one torch.compile'd (inductor) function for every
    temperature's tail sum, the entropy's tail dot product and the count of ties with the k-th value in one
    more read of the logits, with one exp per logit where the temperatures allow (`exp_power_plan`). The
    eager ops they replace make one pass (and one (n, V) temporary) per shift, mask, exp, square and sum.
    Equal to the eager reference to fp32 rounding (summation order and the powers differ), tested; the top-k
    keeps equal values in ascending id order (torch.topk's order among ties is its own).

    The tail is every id whose logit is below the k-th largest value v_k; ids equal to v_k that top-k left out
    (ties at the boundary) are added back by count, so the masks agree with the eager path's index mask.
    Kernels are generated for one thread (`cpp.threads` 1): slices are small, and the caller shares them out
    among its own worker threads. They are called through inductor's C++ wrapper (`cpp_wrapper`), which
    releases the GIL, as ctypes does for the C top-k; through the default Python wrapper two worker threads
    ran them no faster than one. Built, and compiled by one call on random logits, once per (temperatures,
    rows, vocabulary, k), on the thread that asks first (`compiled_reductions`), so worker threads never race
    to compile."""

    def __init__(self, temps: tuple[float, ...], rows: int, vocab: int, top_k: int):
        self.rows, self.vocab, self.top_k = rows, vocab, top_k
        order, squared_from = _temperature_order(list(temps))
        plan = exp_power_plan(temps)

        def slice_targets(z, vals, gold):
            """Everything per row but the top-k itself: (top-k log-probs, tail log-masses, entropy, gold
            NLL, tail sums, log totals), finished by `finish_rows` as the eager path is."""
            m, vk = vals[:, :1], vals[:, -1:]
            s = z - m
            tail = z < vk
            # ids equal to v_k that the top-k left out belong to the tail: added back by count (exact, no
            # subtraction of masses; ties at the boundary are rare, so almost always 0)
            extra = ((z == vk).sum(-1) - (vals == vk).sum(-1)).to(z.dtype)
            head_s = vals - m
            sk = (vk - m)[:, 0]
            tails, e = [None] * len(temps), None
            if plan is not None:  # one exp per logit, every temperature's term a power of it
                n_base, powers = plan
                u_pow = _powers_of(torch.where(tail, torch.exp(s * (1.0 / n_base)), 0.0), powers)
            for j, t in order:
                if plan is not None:
                    e = u_pow[powers[j]]
                else:
                    e = e * e if j in squared_from else torch.where(tail, torch.exp(s * (1.0 / t)), 0.0)
                tails[j] = e.sum(-1) + extra * torch.exp(sk * (1.0 / t))
                if t == 1.0:
                    dot = (e * s).sum(-1) + extra * torch.exp(sk) * sk
            gold_s = z.gather(-1, gold).squeeze(-1) - m[:, 0]
            logprobs, logmass, entropy, gold_nll, log_totals = finish_rows(head_s, tails, dot, gold_s, order)
            return logprobs, logmass, entropy, gold_nll, torch.stack(tails, -1), log_totals

        # the options go with every compilation, a recompilation included (a guard that fails on new inputs)
        options = {"cpp.threads": 1, "cpp_wrapper": True}
        self.slice_targets = torch.compile(_own_code(slice_targets), dynamic=False, fullgraph=True, options=options)

    @torch.inference_mode()
    def compile_now(self) -> None:
        """One call on random logits of the slice shape (inference tensors, as the teacher's logits are): the
        compilation happens here, not in the first worker thread to need it. At one torch thread, the count
        every caller runs the kernels at (`teacher_targets` gives each slice to a one-thread worker or runs it
        on a one-thread caller): dynamo guards on the count, and a compilation at another would be redone,
        by every worker thread at once."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            z = torch.randn(self.rows, self.vocab)
            vals, _ = topk_rows_native(z, self.top_k)  # builds the C top-k as well
            self.slice_targets(z, vals, torch.zeros(self.rows, 1, dtype=torch.long))
        finally:
            torch.set_num_threads(threads)


def _own_code(fn):
    """fn with a code object of its own: dynamo keeps compiled graphs, and counts recompilations against its
    limit of 8, per code object, and every instance above is one shape of its own (a process that builds
    stores for several teachers or temperature sets would otherwise run into the limit)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


_COMPILED: dict[tuple, _CompiledReductions] = {}
_COMPILED_LOCK = threading.Lock()


def compiled_reductions(tail_temperatures, vocab: int, top_k: int) -> _CompiledReductions:
    """The compiled kernels for CPU slices of this shape, built and compiled on first use (4-20 s; raises
    whatever inductor raises if it cannot build them, e.g. without a C++ compiler)."""
    rows = _compiled_slice_rows(vocab)
    key = (tuple(float(t) for t in tail_temperatures), rows, vocab, top_k)
    with _COMPILED_LOCK:
        if key not in _COMPILED:
            kernels = _CompiledReductions(key[0], rows, vocab, top_k)
            kernels.compile_now()
            _COMPILED[key] = kernels
        return _COMPILED[key]


class _TargetRows:
    """`teacher_targets`' flat (B * L, ...) outputs, filled a slice of rows at a time, with what every slice
    reads: the logits, the gold ids, k and the temperatures in visiting order."""

    def __init__(self, flat: torch.Tensor, input_ids: torch.Tensor, top_k: int, temps: list[float]):
        n, device = flat.shape[0], flat.device
        B, L = input_ids.shape
        gold = torch.zeros(B, L, dtype=torch.long, device=device)
        gold[:, :-1] = input_ids[:, 1:]
        self.flat, self.gold, self.top_k, self.temps = flat, gold.reshape(-1, 1), top_k, temps
        self.order, self.squared_from = _temperature_order(temps)
        self.topk_logprobs = torch.empty(n, top_k, dtype=torch.float32, device=device)
        self.topk_ids = torch.empty(n, top_k, dtype=torch.long, device=device)
        self.tail_logmass = torch.empty(n, len(temps), dtype=torch.float32, device=device)
        self.gold_nll = torch.empty(n, dtype=torch.float32, device=device)
        self.entropy = torch.empty(n, dtype=torch.float32, device=device)

    def put(self, r0: int, idx, logprobs, logmass, entropy, gold_nll) -> None:
        n = idx.shape[0]
        self.topk_ids[r0 : r0 + n], self.topk_logprobs[r0 : r0 + n] = idx, logprobs
        self.tail_logmass[r0 : r0 + n], self.entropy[r0 : r0 + n], self.gold_nll[r0 : r0 + n] = logmass, entropy, gold_nll

    def redo_low_tails(self, z, r0: int, idx, m, tail, log_total, j: int, t: float) -> None:
        """A tail far below the top (< e^-69 of it) loses precision in fp32 or underflows to zero: redo
        those rows shifted by their own largest tail logit, so only an empty tail (k = V) is -inf."""
        low = (tail < 1e-30).nonzero().squeeze(-1)
        if len(low) and self.top_k < z.shape[-1]:
            zt = z[low].scatter(-1, idx[low], float("-inf")) / t
            self.tail_logmass[r0 + low, j] = torch.logsumexp(zt, -1) - (m[low, 0] / t + log_total[low])


def _eager_slice(z: torch.Tensor, out: _TargetRows, s_buf: torch.Tensor, e_buf: torch.Tensor):
    """(top-k values, ids, tail sums (n, T), tail dot sum(exp(s) * s) at T = 1) of a slice: the reference."""
    n = z.shape[0]
    vals, idx = topk_rows(z, out.top_k)
    m = vals[:, :1]
    s = torch.sub(z, m, out=s_buf[:n])  # <= 0: every exp below is in (0, 1], no overflow at any T
    s.scatter_(-1, idx, _MASKED)  # the tail only
    e = e_buf[:n]
    tails = torch.empty(n, len(out.temps), dtype=torch.float32, device=z.device)
    dot = None
    for j, t in out.order:
        if j in out.squared_from:  # exp(s / t) = exp(s / 2t)^2, from the temperature done just before
            torch.mul(e, e, out=e)
        elif t == 1.0:
            torch.exp(s, out=e)
        else:
            torch.mul(s, 1.0 / t, out=e)
            e.exp_()
        tails[:, j] = e.sum(-1)
        if t == 1.0:
            # the entropy's tail term as one dot product (in place: e is not read again at this
            # temperature, and a fresh (n, V) product costs more in allocation than the multiply does)
            dot = torch.mul(e, s, out=e).sum(-1)
    return vals, idx, tails, dot


def _eager_rows(out: _TargetRows, lo: int, hi: int, rows: int) -> None:
    """Rows lo..hi of every output by the eager reference, in slices of `rows`, with their own scratch."""
    V = out.flat.shape[-1]
    s_buf = torch.empty(min(rows, hi - lo), V, dtype=torch.float32, device=out.flat.device)
    e_buf = torch.empty_like(s_buf)
    for r0 in range(lo, hi, rows):
        z = out.flat[r0 : min(r0 + rows, hi)].float()
        vals, idx, tails, dot = _eager_slice(z, out, s_buf, e_buf)
        m = vals[:, :1]
        head_s = vals - m  # (n, k), <= 0
        gold_s = z.gather(-1, out.gold[r0 : r0 + z.shape[0]]).squeeze(-1) - m[:, 0]
        logprobs, logmass, ent, nll, log_totals = finish_rows(head_s, tails.unbind(-1), dot, gold_s, out.order)
        out.put(r0, idx, logprobs, logmass, ent, nll)
        for j, t in out.order:
            out.redo_low_tails(z, r0, idx, m, tails[:, j], log_totals[:, j], j, t)


def _compiled_rows(out: _TargetRows, kernels: _CompiledReductions, lo: int, hi: int, rows: int) -> None:
    """Rows lo..hi by the compiled kernels, built for one slice shape: a short last slice is padded to it."""
    V = out.flat.shape[-1]
    for r0 in range(lo, hi, rows):
        n = min(rows, hi - r0)
        z = out.flat[r0 : r0 + n].float()
        g = out.gold[r0 : r0 + n]
        if n < rows:
            z = torch.cat([z, z[:1].expand(rows - n, V)])
            g = torch.cat([g, g.new_zeros(rows - n, 1)])
        vals, idx = topk_rows_native(z, out.top_k)
        logprobs, logmass, ent, nll, tails, log_totals = kernels.slice_targets(z, vals, g)
        out.put(r0, idx[:n], logprobs[:n], logmass[:n], ent[:n], nll[:n])
        if bool((tails[:n] < 1e-30).any()):  # one check for every temperature
            m = z[:n].gather(-1, idx[:n, :1])  # the max: the top-1's logit
            for j, t in out.order:
                out.redo_low_tails(z[:n], r0, idx[:n], m, tails[:n, j], log_totals[:n, j], j, t)


@torch.inference_mode()
def teacher_targets(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    top_k: int,
    tail_temperatures: tuple[float, ...],
    samples: int = 0,
    sample_seeds: list[int] | None = None,
    threads: int = 1,
    compiled: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-token targets from full logits (B, L, V) and the window's ids (B, L).

    topk_ids / topk_logprobs: the k most likely tokens, sorted descending, with their log-probabilities
        at T=1 (log p_i = z_i - logsumexp(z), computed in fp32; the store keeps them in uint16 fixed point,
        4.9e-4 nats, where fp16 raw GPT-2 logits near -80 would keep 0.03).
    tail_logmass[..., j]: log of the probability mass outside the top-k at T_j, as
        logsumexp(z/T_j over the non-top-k ids) - logsumexp(z/T_j over all ids), both sums taken
        directly in fp32 (the non-top-k entries summed on their own, never total minus head), so the tail
        bucket is exact at every stored temperature however confident the token is.
    gold_nll: -log p(next token) at T=1; the last position has no next token in the window: NaN.
    entropy: H(p) at T=1.
    sample_ids/sample_counts: unique ids and counts of `samples` draws from p (RS-KD), ascending ids,
        zero-padded; each window's draws are seeded by its own seed, so resume and batching can't change them.

    Raises NonFiniteLogits if any logit is NaN or +-inf (checked for free: such a row makes its entropy
    non-finite, and only those rows are then checked exactly).

    One pass structure per slice of rows (about 1 MB on CPU, so every pass below runs from cache): the
    top-k, one shifted copy s = z - max with the top-k entries masked out, then per temperature one
    scale-and-exp into a scratch buffer (or a squaring of the previous temperature's, where
    T and 2T are both stored) and one sum (the tail mass); the head's mass at each T comes from
    the k top values alone, and the entropy's tail term is one dot product of exp(s) with s. The max is
    shared by all temperatures (max(z / T) = max(z) / T exactly). Everything stays on the logits' device;
    only the (B, L, k) and (B, L, T) results leave it. threads > 1 (CPU): the slices are shared out among
    that many worker threads; every slice is computed as with one, so the results are identical.
    compiled=True: the top-k in C and the other passes as torch.compile'd fused loops (`_CompiledReductions`),
    equal to this eager reference to fp32 rounding (equal logits in ascending id order).
    """
    B, L, V = logits.shape
    if compiled and logits.device.type != "cpu":
        raise ValueError("compiled teacher targets are for CPU logits (on a GPU the eager reductions are cheap)")
    filled = _TargetRows(logits.reshape(B * L, V), input_ids, top_k, [float(t) for t in tail_temperatures])
    kernels = compiled_reductions(filled.temps, V, top_k) if compiled else None
    rows = _compiled_slice_rows(V) if compiled else _slice_rows(V, logits.device)

    def reduce_rows(lo: int, hi: int, torch_threads: int | None = None) -> None:
        if torch_threads is not None:  # a worker thread: inference mode and the thread count are per thread
            torch.set_num_threads(torch_threads)
        with torch.inference_mode():
            if kernels is not None:
                _compiled_rows(filled, kernels, lo, hi, rows)
            else:
                _eager_rows(filled, lo, hi, rows)

    if threads > 1 and logits.device.type == "cpu" and B * L > rows:
        # the slices are independent: spread them over `threads` workers of one torch thread each (a slice
        # is too small for torch's own intra-op threads to help)
        bounds = [min(B * L, -(-B * L // threads // rows) * rows * i) for i in range(threads + 1)]
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="goose-reduce") as pool:
            for job in [pool.submit(reduce_rows, lo, hi, 1) for lo, hi in zip(bounds, bounds[1:]) if lo < hi]:
                job.result()
    else:
        reduce_rows(0, B * L)
    # a NaN or infinite logit anywhere in a row makes its entropy NaN (NaN or inf - inf in the sums, or
    # 0 * -inf in the dot product); only such rows are checked exactly (one sync, no full-size pass)
    suspect = (~torch.isfinite(filled.entropy)).nonzero().squeeze(-1)
    if len(suspect):
        bad = suspect[~torch.isfinite(filled.flat[suspect]).all(-1)]
        if len(bad):
            raise NonFiniteLogits(bad.tolist())
    gold_nll = filled.gold_nll.view(B, L)
    gold_nll[:, -1] = float("nan")
    out = {
        "topk_ids": filled.topk_ids.view(B, L, top_k),
        "topk_logprobs": filled.topk_logprobs.view(B, L, top_k),
        "tail_logmass": filled.tail_logmass.view(B, L, len(filled.temps)),
        "gold_nll": gold_nll,
        "entropy": filled.entropy.view(B, L),
    }
    if samples:
        out["sample_ids"], out["sample_counts"] = draw_samples(logits, samples, sample_seeds)
    return out


def draw_samples(logits: torch.Tensor, n: int, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws with replacement per token from softmax(logits) (B, L, V) -> unique ids and counts (B, L, n).

    One seeded generator per window (seeds[b]) and one multinomial call per window, so a window's draws
    do not depend on which batch it was computed in.
    """
    B, L, _ = logits.shape
    draws = torch.empty(B, L, n, dtype=torch.long, device=logits.device)
    for b in range(B):
        gen = torch.Generator(device=logits.device).manual_seed(int(seeds[b]))
        probs = torch.softmax(logits[b].float(), dim=-1)
        draws[b] = torch.multinomial(probs, n, replacement=True, generator=gen)
    ordered, _ = draws.sort(dim=-1)
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    slot = is_new.long().cumsum(-1) - 1  # index of each draw's unique id
    ids = torch.zeros_like(ordered).scatter_(-1, slot, ordered)
    counts = torch.zeros_like(ordered).scatter_add_(-1, slot, torch.ones_like(ordered))
    return ids, counts


def quantize_int8(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric int8 with a per-token and a per-channel scale: h ~= q * token_scale * channel_scale.

    hidden: (B, L, d). channel_scale (B, d) is each channel's RMS over the window, so GPT-2's outlier
    channels (~100x typical) get their own range instead of flattening every ordinary channel of the
    token to a level or two (per-token absmax alone loses ~23% there); token_scale (B, L) is the absmax of
    the channel-normalised token / 127, so an outlier token (GPT-2's first position) keeps its own range.
    Both scales are kept in fp16, and q is computed against the fp16-rounded scales.
    """
    h = hidden.float()
    tiny = torch.finfo(torch.float16).tiny
    # RMS over positions 1.. : GPT-2's first position can be ~30x every other, and would set a coarse step
    # for the whole window; the per-token scale below gives that position its own range
    body = h[:, 1:] if h.shape[1] > 1 else h
    channel = body.pow(2).mean(1).sqrt().clamp_min(tiny).to(torch.float16)  # (B, d)
    hc = h / channel.float().unsqueeze(1)
    token = (hc.abs().amax(-1) / 127.0).clamp_min(tiny).to(torch.float16)  # (B, L)
    q = torch.round(hc / token.float().unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, token, channel
