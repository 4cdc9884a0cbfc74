"""Stage two under torchrun beyond what `ranks.py` (the one rank helper) gives: DDP or FSDP2 wrapping of the
student, full (unsharded) model and optimizer states for checkpoints, and one gradient norm over sharded and
replicated parameters. Every rank reads the store and its own share of every global batch."""

from __future__ import annotations


import torch

from ...errors import GooseError
from ...ranks import Ranks


# ---- FSDP2 (`parallel: fsdp`) ------------------------------------------------------------------
# The student's parameters become DTensors sharded over the ranks, one FSDP unit per block (its weights
# are gathered for that block's forward and backward only). Checkpoints and best/ hold the full,
# unsharded state in the same layout as a one-process run, so they load anywhere; the optimizer state is
# keyed by parameter name (torch.distributed.checkpoint.state_dict), so a resume may change world size.


def shard_student(model: torch.nn.Module, device_type: str, world: int) -> list[torch.nn.Parameter]:
    """fully_shard each block, then the root (embedding, output norm, head). The spike sites' parameters
    (a few vectors per site) stay replicated and are returned: their data-dependent initialisation writes
    them in place during the first forward, which FSDP would drop with the gathered copy. Their gradients
    are all-reduced by the caller (`sync_grads`), as the distiller's are."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise GooseError(f"parallel: fsdp needs torch >= 2.7 (FSDP2's fully_shard), this is {torch.__version__}") from None

    # the mesh on the training device (fully_shard's default follows the machine's accelerator, which on a
    # CUDA host with device cpu would move the weights to cuda:0)
    mesh = init_device_mesh(device_type, (world,))
    replicated = [p for name, p in model.named_parameters() if ".spikes." in name]
    for block in model.blocks:
        fully_shard(block, mesh=mesh, ignored_params=set(replicated))
    fully_shard(model, mesh=mesh, ignored_params=set(replicated))
    return replicated


def _full(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict:
    """The unsharded state dict on rank 0 (CPU), {} on the other ranks. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full(cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, state: dict) -> None:
    """Every rank passes the full state dict (read from the shared checkpoint) and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full())


def full_optimizer_state(modules: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name over `modules`, unsharded on rank 0. Collective. None
    before the first step: torch would fill the empty state by an optimizer step at learning rate 0, which
    leaves the weights alone but counts a step in Adam's bias correction (the first real update then came
    out 0.75x as large)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not opt.state:
        return None
    return get_optimizer_state_dict(modules, opt, options=_full(cpu_offload=True))


def load_full_optimizer_state(modules: torch.nn.Module, opt: torch.optim.Optimizer, state: dict | None) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if state is None:  # the step-0 checkpoint: a rollback to it starts Adam afresh, as a plain load would
        opt.state.clear()
        return
    set_optimizer_state_dict(modules, opt, state, options=_full())  # its step counts replace torch's placeholder


def clip_grad_norm(param_lists: list[list[torch.nn.Parameter]], max_norm: float) -> float:
    """clip_grad_norm_ over sharded (DTensor) and replicated parameters together: torch's own refuses a
    mix. The norm of each list is global (a DTensor norm reduces over its shards), then one clip factor."""
    from torch.distributed.tensor import DTensor

    norms = []
    for params in param_lists:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            n = torch.nn.utils.get_total_norm(grads)
            norms.append((n.full_tensor() if isinstance(n, DTensor) else n).float().cpu())
    if not norms:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack(norms))
    for params in param_lists:
        torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return float(total)


def parallelize(model: torch.nn.Module, cfg, ranks: Ranks, device: torch.device):
    """(the module the step calls, the parameters left replicated, fsdp?) for a run's `parallel` and world.
    FSDP shards before compile and before the optimizer (both must see the sharded parameters); its
    optimizer state is kept by parameter name with the spike parameters in a group of their own, in one
    process too (parallel: fsdp), so its checkpoints resume under any world size. DDP: running spike
    statistics are all-reduced inside the model (global-batch statistics), so the buffers agree on every rank
    without DDP broadcasting them."""
    fsdp = ranks.active and cfg.parallel == "fsdp"
    replicated: list = []
    if fsdp:
        replicated = shard_student(model, device.type, ranks.world)
    elif cfg.parallel == "fsdp":
        replicated = [p for name, p in model.named_parameters() if ".spikes." in name]
    forward = torch.compile(model) if cfg.compile else model
    if ranks.active and not fsdp:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    return forward, replicated, fsdp
