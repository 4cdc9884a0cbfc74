"""goose: distil a transformer teacher into a ternary-spiking RWKV-7-style student via an offline cache."""

__version__ = "0.1.0"

import sys as _sys

# AutoConfig / AutoModelForCausalLM learn the goose model type (student/hf.py) when transformers is already in
# use; importing transformers here would add seconds to every goose command. `import goose.student.hf` always
# registers.
# Only as the installed package: pytest may import this file on its own (as the rootdir's __init__), where a
# relative import has no parent package.
if "transformers" in _sys.modules and __package__ == "goose":
    from .student import hf as _hf  # noqa: F401,E402
