"""lm-eval glue for goose's local tasks (goose_text_ppl.yaml, goose_mc.yaml).

The documents are read by `goose.pipeline.harness`, in memory: no download and nothing written to the datasets
cache. lm-eval calls `custom_dataset` with the task's metadata, where `goose_data_files` maps a task name to its
local files (goose eval --harness-data-files TASK=FILE sets it).
"""

import re

from goose.pipeline.harness import mc_dataset as _mc_dataset
from goose.pipeline.harness import text_ppl_dataset as _text_ppl_dataset


def text_ppl_dataset(goose_data_files=None, goose_text_column="text", **_):
    return _text_ppl_dataset((goose_data_files or {}).get("goose_text_ppl"), text_column=goose_text_column)


def mc_dataset(goose_data_files=None, **_):
    return _mc_dataset((goose_data_files or {}).get("goose_mc"))


def text_target(doc):
    return doc["text"]


def text_ppl_results(doc, results):
    """As lm-eval's wikitext: the rolling log-likelihood with the words and UTF-8 bytes of the scored text."""
    (loglikelihood,) = results
    text = doc["text"]
    words = len(re.split(r"\s+", text))
    n_bytes = len(text.encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}


def mc_choices(doc):
    return list(doc["choices"])


def mc_target(doc):
    return int(doc["answer"])
