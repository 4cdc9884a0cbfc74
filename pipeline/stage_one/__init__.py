"""Stage one, `goose cache-teacher`: the teacher run once over a corpus, its targets written to a Zarr store.

The recipe is `cache_teacher.py`.

- `cache_teacher`: the recipe: windows -> teacher forward -> targets -> store, resumable and sharded.
- `config`: `CacheTeacherConfig`, torch-free, with each option's help (the CLI is built from it).
- `targets`: the per-token targets from the teacher's logits: the eager reference and the compiled CPU
  kernels, finished by one set of formulas (`finish_rows`); `native_topk` is the C top-k they use.

Loading the teacher (`pipeline/teacher.py`), the devices (`pipeline/devices.py`) and the corpus -> windows code
(`pipeline/data.py`) are shared with `eval`, the harness and quickstart, so they live beside the stages.
"""
