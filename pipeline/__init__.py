"""The stages and the tools around them.

- `stage_one/`: stage one, `goose cache-teacher` (the teacher run once over a corpus into a Zarr store).
- `stage_two/`: stage two, `goose train-from-cache` (the student trained by streaming that store).
- top level: tools that act on a trained student or drive the stages: `evaluate`, `harness`, `generate`,
  `export`, `report`, `validate`, `ablate`, `quickstart`.
"""
