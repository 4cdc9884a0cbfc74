"""Every registered KD loss through the real trainer: the config's valid names are the registry's, each loss
reads only its fields, trains, and logs its divergence as loss / scale(T); masked stores too."""

from __future__ import annotations

import math

import pytest

from goose.errors import GooseError
from goose.pipeline.stage_two.config import load_config
from goose.pipeline.stage_two.losses import KD_LOSSES, kd_loss_names
from goose.pipeline.stage_two.train import Trainer


def _cfg(store, out, *overrides):
    base = ["model.preset=tiny", "batch_size=4", "steps=4", "val_every=4", "log_every=1", "ckpt_every=4",
            "val_windows=4", "tensorboard=false", "optim.warmup_steps=1"]
    return load_config(None, base + list(overrides), cache=store, out=str(out))


def _per_loss_overrides(name: str) -> list[str]:
    loss = KD_LOSSES[name]
    # the T = 1 losses (the RS-KD draws) take a fixed T = 1; the others are tried at T = 1.5 (CTKD-free)
    return [f"loss.kd={name}"] + ([] if not loss.temperature else ["temperature.mode=fixed", "temperature.value=1.5"])


@pytest.mark.parametrize("name", sorted(KD_LOSSES))
def test_every_registered_loss_trains_and_logs_its_divergence(tmp_path, store, name):
    trainer = Trainer(_cfg(store, tmp_path / name, *_per_loss_overrides(name)), progress=False)
    loss = trainer.objective.kd
    assert set(trainer.fields) == {"input_ids", *loss.fields}  # the store has no loss mask
    rows = [trainer.train_step() for _ in range(3)]
    for m in rows:
        T = m.get("temperature", 1.0)
        assert (T == 1.5) == loss.temperature
        assert math.isfinite(m["kd"]) and m["kd"] > 0
        assert m[loss.metric] == pytest.approx(m["kd"] / loss.scale(T), rel=1e-12)
    assert rows[-1]["kd"] < rows[0]["kd"] * 1.5  # no blow-up


def test_the_config_names_come_from_the_registry(tmp_path, store):
    with pytest.raises(GooseError, match=", ".join(kd_loss_names()[:-1]) + " or none"):
        Trainer(_cfg(store, tmp_path / "x", "loss.kd=hellinger"), progress=False)
    with pytest.raises(GooseError, match="not options of loss.kd=topk"):
        Trainer(_cfg(store, tmp_path / "y", "loss.kd=topk", "loss.kd_options={alpha: 0.1}"), progress=False)
    with pytest.raises(GooseError, match="reverse_kl applies to loss.kd=topk only"):
        Trainer(_cfg(store, tmp_path / "z", "loss.kd=js", "loss.reverse_kl=true"), progress=False)


@pytest.fixture(scope="module")
def masked_store(tmp_path_factory, tiny_teacher):
    from test_masked import _cache, _texts, _write_jsonl

    texts = _texts(40)
    rows = [{"prompt": f"Q{i}: " + a[:80], "response": b} for i, (a, b) in enumerate(zip(texts[::2], texts[1::2]))]
    files = _write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)
    return _cache(tmp_path_factory.mktemp("ms") / "m.zarr", tiny_teacher, files, text_column="prompt",
                  response_column="response")


@pytest.mark.parametrize("name", ["js", "tv", "skew_kl"])
def test_new_losses_on_a_masked_store(tmp_path, name, masked_store):
    masked = masked_store
    trainer = Trainer(_cfg(masked, tmp_path / name, f"loss.kd={name}", "model.overrides={n_layer: 2}"),
                      progress=False)
    assert "loss_mask" in trainer.fields
    m = trainer.train_step()
    assert math.isfinite(m["kd"]) and math.isfinite(m["loss"])
