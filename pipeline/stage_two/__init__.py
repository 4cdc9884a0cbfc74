"""Stage two, `goose train-from-cache`: the spiking student trained by streaming a teacher cache.

The recipe is `train.py`; it only orchestrates the components below (docs/ARCHITECTURE.md says where each
kind of change goes).

- `config`: the run configuration: dataclasses loaded from YAML/JSON with `key.sub=value` overrides.
- `checks`: the store against the config before training; the training and held-out windows.
- `objective`: the loss terms of a run, their store fields, weights and logged metrics.
- `losses/`: one file per loss; KD losses registered by name (`loss.kd`), each with a brute-force test.
- `optim`: optimizer groups, the LR schedule and the guarded optimizer step.
- `checkpoint`: atomic checkpoints, loading without running code, the resume identity check.
- `run_folder`: the run lock, best/, --overwrite, the files a summary names.
- `validation`: store validation (perplexity, KL and top-1 agreement with the teacher, spike statistics).
- `temperature`: the KD temperature: fixed, scheduled, stage-driven (POCL) or learned (CTKD).
- `curriculum`: POCL, the progressive difficulty-ordered curriculum over the cached windows.
- `loader`: batches of cached windows: seeded shuffling, workers, a recorded position for exact resume.
- `distributed`: DDP/FSDP2 wrapping and full states (the ranks themselves: `ranks.py` at the top).
- `monitor`: training health checks, written as structured events plus a warning line.
- `loggers`: experiment trackers (jsonl, tensorboard, wandb, mlflow) picked by the run config; the profiler.
"""
