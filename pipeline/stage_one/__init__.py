"""Stage one, `goose cache-teacher`: the teacher run once over a corpus, its targets written to a Zarr store.

The recipe is `cache_teacher.py`.

- `cache_teacher`: the recipe: windows -> teacher forward -> targets -> store, resumable and sharded.
- `teacher`: loading the teacher (hub name or local folder) and the per-token targets from its logits.
- `data`: corpus -> packed token windows (load, tokenise, join documents with EOS, pack, fingerprint).
"""
