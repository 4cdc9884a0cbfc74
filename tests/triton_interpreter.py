"""Run flash-linear-attention's real Triton kernels on CPU tensors, under Triton's interpreter.

`TRITON_INTERPRET=1` makes `@triton.jit` kernels plain Python over numpy, so a GPU kernel's own code can be
checked on a machine without one (slowly: keep shapes small). It must be set before triton and fla are
imported (`triton.jit` decides at decoration time), so the tests that use this run under their own command:

    TRITON_INTERPRET=1 python -m pytest tests/test_fla_kernels.py

Three gaps between the interpreter (triton 3.x) and compiled Triton stop fla 0.6's RWKV-7 kernels there.
`enable()` closes them for this process only; nothing changes in what runs on a GPU:

1. **Autotuning.** `@triton.autotune` times every config, and the interpreter has no driver to time them
   with. Each autotuner keeps only the first config its own pruning leaves (the kernel still runs once,
   with a config it ships).
2. **Loop induction variables.** Compiled Triton makes `i` in `for i in range(...)` (and `tl.range`) an
   int32 tensor; the interpreter leaves it a Python int. fla's `chunk_dplr_fwd_kernel_h` calls
   `i_t.to(tl.int64)`, which fails with "'int' object has no attribute 'to'". The interpreter's source
   rewriter gets one more rule: the loop variable is re-bound as a tensor at the top of the body
   (`tl.static_range` loops keep constexpr ints, as compiled).
3. **Builtins bound to another name at import.** The interpreter swaps the builtins of `triton.language`
   (it sets attributes on that module while a kernel runs). `fla.ops.utils.op` binds `gather = tl.gather`
   when imported, and kernels that import that name (`chunk_dplr_fwd_A_kernel_intra_func`, the DPLR
   backward and WY kernels) keep the unpatched builtin, which raises "Did you forget to add @triton.jit ?
   (`_semantic` argument must be provided outside of JIT functions.)". Each such alias in fla's modules is
   replaced by a function that looks the builtin up in `triton.language` when called.
"""

from __future__ import annotations

import ast
import os
import sys

_enabled = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class _LoopVariablesAsTensors:
    """Mixin for the interpreter's ASTTransformer: `for i in range(...)` binds i as a tensor, as compiled."""

    @staticmethod
    def _is_dynamic_range(it) -> bool:
        if not isinstance(it, ast.Call):
            return False
        f = it.func
        return (isinstance(f, ast.Name) and f.id == "range") or (isinstance(f, ast.Attribute) and f.attr == "range")

    def visit_For(self, node):
        if self._is_dynamic_range(node.iter) and isinstance(node.target, ast.Name):
            name = node.target.id  # `i = i`: the transformer's own visit_Assign turns the value into a tensor
            node.body.insert(0, ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())],
                                           value=ast.Name(id=name, ctx=ast.Load())))
        return self.generic_visit(node)


def _late_builtin(name: str):
    import triton.language as tl

    def call(*args, **kwargs):
        return getattr(tl, name)(*args, **kwargs)  # patched by the interpreter while a kernel runs

    call.__name__ = name
    return call


def rebind_builtin_aliases(prefix: str = "fla.") -> list[str]:
    """Replace module-level aliases of `triton.language` builtins in already-imported modules under prefix."""
    import triton.language as tl

    rebound = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(prefix):
            continue
        for attr, value in list(vars(module).items()):
            if tl.core.is_builtin(value) and getattr(tl, getattr(value, "__name__", ""), None) is value:
                setattr(module, attr, _late_builtin(value.__name__))
                rebound.append(f"{module_name}.{attr}")
    return rebound


def enable() -> list[str]:
    """Apply the three fixes above (idempotent) after importing fla's RWKV-7 ops; returns the rebound aliases."""
    global _enabled
    if not interpreting():
        raise RuntimeError("TRITON_INTERPRET=1 must be set before Python starts (triton reads it at import)")
    from triton.runtime import autotuner, interpreter

    if not _enabled:
        first_config = autotuner.Autotuner.prune_configs
        autotuner.Autotuner.prune_configs = lambda self, kwargs: first_config(self, kwargs)[:1]
        transformer = type("LoopTensorASTTransformer", (_LoopVariablesAsTensors, interpreter.ASTTransformer), {})
        interpreter.FunctionRewriter.ast_transformer = transformer()
        _enabled = True
    import fla.ops.rwkv7  # noqa: F401 - imports the kernels' modules whose aliases need rebinding

    return rebind_builtin_aliases()
