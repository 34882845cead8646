"""Where a training step's kernel time goes, by model module *and* kernel kind.

The kernel-name categories of ``train_step.py --profile`` say "53 ms of elementwise work" but
not whose. This module labels the model's modules and charges every kernel to the module that
launched it, in the forward and in the backward:

- forward: a ``record_function("mod::<label>")`` range is opened by a forward pre-hook and closed
  by a forward hook on each labelled module, so forward ops nest inside their module's range;
- backward: autograd gives every forward op a sequence number and records the backward op that
  differentiates it (``autograd::engine::evaluate_function: ...``) with the same number and the
  forward thread. So a backward op belongs to the module whose range held the forward op with
  that number; no backward hooks are needed, which keeps megatron's in-place ops and activation
  recompute untouched (a recomputed forward inside the backward is charged to its module's
  forward).

Kernels launched outside any labelled module (the loss, the optimizer, DDP's buffers, residual
adds between sub-layers) are charged to "other". On CPU (tests) there are no kernels: each op's
self CPU time stands in for them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable

PREFIX = "mod::"
BACKWARD_OP = "autograd::engine::evaluate_function: "
# autograd functions that do a module's work outside its forward: the fused LM head + loss
# (layers/output_loss.py) runs in the loss function, after the output layer handed back its
# input. Its forward op holds the head's forward *and* its dgrad / wgrad GEMMs (computed there);
# its backward op only scales the input gradient.
OPS_AS_MODULES = {"_ChunkedHeadLoss": "LM head"}
# standalone norm modules (ours, TE's); TE's LayerNormLinear (norm fused into a projection) is
# deliberately not one: its time belongs to the mixer or MLP it feeds
NORMS = {"RMSNorm", "TPFullWidthRMSNorm", "LayerNorm", "FusedLayerNorm", "WrappedTorchNorm"}


def _label(name: str, module) -> str | None:
    """The label of a module, or None for modules that are only containers. Innermost wins, so
    a norm inside a GDN layer is a norm, the projections inside the GDN mixer are the mixer."""
    cls = type(module).__name__
    if cls == "OlmoGatedDeltaNet":
        return "GDN mixer"
    if cls == "OlmoSelfAttention" or cls == "SelfAttention":
        return "attention mixer"
    if cls == "MLP":
        return "MLP"
    if cls in NORMS:
        return "block norms"
    if cls == "LanguageModelEmbedding":
        return "embedding"
    if name.endswith("output_layer"):
        return "LM head"
    return None


def label_modules(models: Iterable) -> Callable[[], None]:
    """Open a profiler range around every labelled module's forward; returns the undo."""
    from torch.autograd.profiler import record_function

    handles, stack = [], []

    def enter(label):
        def pre(_module, _args):
            rf = record_function(PREFIX + label)
            rf.__enter__()
            stack.append(rf)

        return pre

    def leave(_module, _args, _out):
        stack.pop().__exit__(None, None, None)

    for model in models:
        for name, module in model.named_modules():
            label = _label(name, module)
            if label:
                handles.append(module.register_forward_pre_hook(enter(label)))
                handles.append(module.register_forward_hook(leave))

    def remove():
        for h in handles:
            h.remove()

    return remove


def _owner(event) -> str | None:
    """The innermost labelled range holding a forward op."""
    while event is not None:
        if event.name.startswith(PREFIX):
            return event.name[len(PREFIX) :]
        event = event.cpu_parent
    return None


def attribute(events, categorize: Callable[[str], str], *, cpu: bool = False) -> dict:
    """``{"fwd <label>" | "bwd <label>" | "other": {category: microseconds}}``.

    ``events``: ``profiler.events()`` (the function-event tree with kernels attached);
    ``categorize``: kernel (or, with ``cpu``, op) name -> category.
    """
    # forward ops' sequence numbers -> owning module
    seq_owner: dict[tuple[int, int], str] = {}
    for ev in events:
        if ev.sequence_nr >= 0 and not ev.name.startswith(BACKWARD_OP):
            owner = _owner(ev)
            if owner:
                seq_owner.setdefault((ev.thread, ev.sequence_nr), owner)

    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def visit(ev, label: str) -> None:
        op_module = OPS_AS_MODULES.get(ev.name.removeprefix(BACKWARD_OP).removesuffix("Backward"))
        if ev.name.startswith(PREFIX):
            label = "fwd " + ev.name[len(PREFIX) :]
        elif op_module:
            label = ("bwd " if ev.name.endswith("Backward") else "fwd ") + op_module
        elif ev.name.startswith(BACKWARD_OP) and ev.sequence_nr >= 0:
            owner = seq_owner.get((ev.fwd_thread, ev.sequence_nr))
            label = "bwd " + owner if owner else label
        if cpu:
            if not ev.name.startswith((PREFIX, BACKWARD_OP)):
                out[label][categorize(ev.name)] += ev.self_cpu_time_total
        else:
            for k in ev.kernels:
                out[label][categorize(k.name)] += k.duration
        for child in ev.cpu_children:
            visit(child, label)

    for ev in events:
        if ev.cpu_parent is None:
            visit(ev, "other")
    return {k: dict(v) for k, v in out.items()}


def table(by_module: dict, steps: int = 1) -> str:
    """Markdown: one row per module and direction, one column per kernel category, ms/step."""
    cats = sorted({c for row in by_module.values() for c in row})
    total = {m: sum(row.values()) for m, row in by_module.items()}
    lines = ["| module | total ms | " + " | ".join(cats) + " |"]
    lines.append("|---|---|" + "---|" * len(cats))
    order = sorted(by_module, key=lambda m: (m == "other", re.sub(r"^(fwd|bwd) ", "", m), m))
    for m in order:
        row = by_module[m]
        cells = [f"{row.get(c, 0.0) / 1e3 / steps:.1f}" if row.get(c) else "" for c in cats]
        lines.append(f"| {m} | {total[m] / 1e3 / steps:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
