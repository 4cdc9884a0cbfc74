"""The ternary inference path (student/ternary.py and its C kernels) against its references: the packed format against
its unpacking, each C kernel against a dense matmul of the same weights, and the packed student against the
training model's evaluation forward (chunked and recurrent, every spike variant), greedy tokens included."""

from __future__ import annotations

import pytest
import torch

from goose.errors import GooseError
from goose.pipeline.generate import generate
from goose.student.model import Student, preset
from goose.student.ternary import (PackedHead, PackedTernaryLinear, fired_rows_matmul, measured_ops, pack_codes,
                                   pack_int4, packed_bytes, ternary_student, unpack_codes, unpack_int4)

from test_student import random_student

ALL = ["tm_r", "tm_k", "tm_v", "tm_out", "cm_k", "cm_v", "head"]


def trained_like(seed=0, **overrides) -> Student:
    """A tiny ternary student with every spike site on (the head's too), random weights and data-initialised
    spikes, in eval mode (test_student.random_student)."""
    return random_student(seed, **{"ternary_weights": True, "spike_sites": ALL, **overrides})


@pytest.mark.parametrize("n_out", [1, 4, 7, 64, 513])
def test_packed_codes_round_trip_and_each_kernel_equals_a_dense_matmul(n_out):
    """pack_codes / pack_int4 -> unpack is the identity; each format's kernel equals x @ W^T (float64) for
    sparse, empty and dense inputs, reports as fired exactly the non-zero inputs and as additions the
    non-zero weights of their rows."""
    torch.manual_seed(n_out)
    n_in = 37
    x = torch.randn(5, n_in) * (torch.rand(5, n_in) < 0.4)
    x[2] = 0  # a token where nothing fired
    x[3] = torch.randn(n_in)  # and one that is dense
    fired_mask = (x != 0).double()
    ternary = torch.randint(-1, 2, (n_out, n_in)).float()
    int4 = torch.randint(-7, 8, (n_out, n_in)).float()
    fp = torch.randn(n_out, n_in)
    packed = pack_codes(ternary)
    assert packed.dtype == torch.uint8 and packed.shape == (n_in, -(-n_out // 4))
    assert torch.equal(unpack_codes(packed, n_out), ternary)
    nibbles = pack_int4(int4)
    assert nibbles.shape == (n_in, -(-n_out // 2)) and torch.equal(unpack_int4(nibbles, n_out), int4)
    cases = {"ternary2": (ternary, packed), "int8": (ternary, ternary.t().contiguous().to(torch.int8)),
             "int4": (int4, nibbles), "fp32": (fp, fp.t().contiguous())}
    for fmt, (dense, weights) in cases.items():
        nnz = (dense != 0).sum(0)
        out, fired, adds = fired_rows_matmul(x, weights, nnz, fmt)
        torch.testing.assert_close(out[:, :n_out].double(), x.double() @ dense.double().t(), rtol=1e-5, atol=1e-5)
        assert (out[:, n_out:] == 0).all()  # padding
        assert fired == int(fired_mask.sum()), fmt
        assert adds == int((fired_mask @ nnz.double()).sum()), fmt


def test_the_kernels_refuse_what_would_read_out_of_bounds():
    """The C kernels trust their pointers: a wrong dtype, a row count that is not the input's width, or a
    short row-count vector is refused before the call."""
    x = torch.randn(2, 8)
    codes = pack_codes(torch.ones(5, 8))
    nnz = torch.full((8,), 5)
    with pytest.raises(ValueError, match="weights must be"):
        fired_rows_matmul(x, codes.to(torch.int8), nnz, "ternary2")
    with pytest.raises(ValueError, match="weights must be"):
        fired_rows_matmul(x, codes[:7], nnz, "ternary2")
    with pytest.raises(ValueError, match="row_nnz"):
        fired_rows_matmul(x, codes, nnz[:7], "ternary2")
    with pytest.raises(ValueError, match="unknown packed format"):
        fired_rows_matmul(x, codes, nnz, "strlen")


VARIANTS = {
    "default": {},  # four token-gain groups, centred signed sites, unsigned cm_v, spiked tied head
    "row_scales": {"ternary_scale": "row"},
    "no_gain": {"spike": {"token_gain": 0}},
    "lif": {"spike": {"lif": True}},
    "residual_steps": {"site_steps": {"cm_k": 2, "head": 2}},
    "head_not_spiked": {"spike_sites": ALL[:-1]},
    "untied_head": {"tie_embeddings": False},
    "signed_cm_v": {"unsigned_sites": []},
    "embedding_int8": {"embedding_bits": 8},
    "embedding_int4": {"embedding_bits": 4},
    "embedding_int4_head_not_spiked": {"embedding_bits": 4, "spike_sites": ALL[:-1]},
    "untied_int8_row_scales": {"tie_embeddings": False, "embedding_bits": 8, "ternary_scale": "row"},
    "lif_micro_steps": {"spike": {"lif": True, "micro_steps": 2}},
    "binary_stats_thresholds": {"spike": {"binary": True, "threshold": "stats"}},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_ternary_path_equals_the_evaluation_forward(variant):
    """The packed student's logits equal Student.forward in eval to float tolerance, in the chunked form over
    a batch and step by step in the recurrent form with its state, and greedy generation picks the same
    tokens; the ternary matrices are packed and, with a spiked tied head, the head reads E^T rows."""
    model = trained_like(**VARIANTS[variant])
    packed = ternary_student(model)
    n_packed = sum(isinstance(m, PackedTernaryLinear) for m in packed.modules())
    assert n_packed == 6 * model.cfg.n_layer
    cfg = model.cfg
    spiked_head = "head" in cfg.spike_sites
    assert isinstance(packed.head, PackedHead) == (spiked_head or (cfg.tie_embeddings and bool(cfg.embedding_bits)))
    ids = torch.randint(0, 512, (3, 40))
    with torch.no_grad():
        ref, out = model(ids), packed(ids)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
        s_ref, s_out = model.init_state(1), packed.init_state(1)
        for t in range(12):
            a = model(ids[:1, t:t + 1], s_ref, mode="recurrent")
            b = packed(ids[:1, t:t + 1], s_out, mode="recurrent")
            torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-4)
            s_ref, s_out = a.state, b.state
    kw = dict(max_new_tokens=24, temperature=0.0)
    assert generate(packed, [1, 2, 3], **kw)["new_tokens"] == generate(model, [1, 2, 3], **kw)["new_tokens"]


def test_executed_rows_are_the_fired_spikes():
    """measured_ops: with one spike step per token, the ternary matrices read one weight row per non-zero
    spike, the count the spike sites' own statistics give (what energy_report's estimate uses), and skip the
    rest; the additions are the non-zero weights of those rows (residual steps read the union of their rows)."""
    model = trained_like(spike={"token_gain": 4})
    packed = ternary_student(model)
    ids = torch.randint(0, 512, (2, 50))
    with torch.no_grad():
        out = packed(ids, collect_stats=True)
    fired = {k: float(st.pos.sum() + st.neg.sum()) for k, st in out.spike_stats.items()}
    ops = measured_ops(packed)
    tokens = ids.numel()
    assert ops["projections"]["rows_read_per_token"] * tokens == pytest.approx(
        sum(v for k, v in fired.items() if not k.startswith("head")))
    assert ops["head"]["rows_read_per_token"] * tokens == pytest.approx(fired["head.head"])
    C, F = model.cfg.d_model, model.cfg.d_ffn
    assert ops["projections"]["rows_dense_per_token"] == model.cfg.n_layer * (5 * C + F)
    assert 0.3 < ops["projections"]["rows_skipped_fraction"] < 0.9
    layers = [m for m in packed.modules() if isinstance(m, PackedTernaryLinear)]
    nonzero = sum(int(m.row_nnz.sum()) for m in layers) / sum(m.n_in * m.out_features for m in layers)
    ratio = ops["projections"]["additions_per_token"] / ops["projections"]["updates_per_token"]
    assert ratio == pytest.approx(nonzero, abs=0.05) and ratio < 1


def test_packed_bytes_hold_two_bits_per_ternary_weight():
    model = trained_like()
    sizes = packed_bytes(ternary_student(model))
    C, F, L, V = model.cfg.d_model, model.cfg.d_ffn, model.cfg.n_layer, model.cfg.vocab_size
    weights = L * (4 * C * C + 2 * C * F)
    # 2 bits per weight; in fp32 each matrix's scale and, behind a centred site, its input offset and output
    # bias: r, k, v, out (C -> C) and cm_k (C -> F) are centred, cm_v (relu^2, unsigned) is not
    assert sizes["ternary_matrices"] == weights // 4 + 4 * L * (6 + 4 * (C + C) + (C + F))
    assert sizes["embedding"] == 4 * (V * C + V + C)  # E^T, the head site's offset mu and bias mu @ E^T
    int4 = packed_bytes(ternary_student(trained_like(embedding_bits=4)))
    assert int4["embedding"] == C * V // 2 + 4 * (V + V + C)  # nibbles, and in fp32 the token scales, bias, mu


def test_ternary_path_refuses_what_it_cannot_run():
    """fp32 weights, a model mid-anneal and an accelerator are one-line errors, not a silently different model."""
    torch.manual_seed(0)
    with pytest.raises(GooseError, match="ternary weights"):
        ternary_student(Student(preset("tiny")).eval())
    model = trained_like()
    model.set_spike_mix(0.5)
    with pytest.raises(GooseError, match="mix 1"):
        ternary_student(model)
    model.set_spike_mix(1.0)
    packed = ternary_student(model)
    with pytest.raises(GooseError, match="already"):
        ternary_student(packed)
    with pytest.raises(RuntimeError, match="fp32 on the CPU"):
        packed.blocks[0].att.key(torch.zeros(1, 64, dtype=torch.float64))


def test_no_c_compiler_is_a_one_line_error(monkeypatch):
    """The kernels are built when the path is made, so a machine without a compiler hears it then, in one line."""
    from goose import native

    monkeypatch.setattr(native, "_LIBRARIES", {})
    monkeypatch.setenv("CC", "/no/such/cc")
    with pytest.raises(GooseError, match="cannot be built here: the C compiler CC='/no/such/cc' is not found"):
        ternary_student(trained_like())
