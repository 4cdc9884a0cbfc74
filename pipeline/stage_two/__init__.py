"""Stage two, `goose train-from-cache`: the spiking student trained by streaming a teacher cache.

The recipe is `train.py`.

- `train`: the recipe: the trainer, checkpoints and resume, validation; the teacher is never loaded.
- `losses`: the distillation losses (CE, KD variants, alignment), each with a brute-force reference in the tests.
- `temperature`: the KD temperature: fixed, scheduled, stage-driven (POCL) or learned (CTKD).
- `curriculum`: POCL, the progressive difficulty-ordered curriculum over the cached windows.
- `loader`: batches of cached windows: seeded shuffling, workers, a recorded position for exact resume.
- `distributed`: torchrun: the process group from the environment and the collectives the trainer needs.
- `monitor`: training health checks, written as structured events plus a warning line.
- `loggers`: experiment trackers (jsonl, tensorboard, wandb, mlflow) picked by the run config.
- `config`: the run configuration: dataclasses loaded from YAML/JSON with `key.sub=value` overrides.
"""
