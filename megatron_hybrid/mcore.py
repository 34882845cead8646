# ruff: noqa: E402, F401
"""The one place that imports megatron-core internals.

Everything else in megatron_hybrid imports megatron-core names from here, so a megatron-core
upgrade (symbols move between minor releases: GPTModel -> HybridModel, parallel_state ->
ProcessGroupCollection, ...) is fixed in this file. Pinned: megatron-core 0.19.2.
"""

import contextlib
import warnings

import torch

# megatron-core announces every optional accelerator it does not find (apex, TE on CPU, absl) at
# import time; those fallbacks are expected here, so keep the logs readable.
for _msg in (".*Apex.*", ".*Transformer Engine.*", ".*absl.*", ".*apex.*"):
    warnings.filterwarnings("ignore", message=_msg, category=UserWarning)

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: F401
from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: F401
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: F401
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder  # noqa: F401
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async as _fs_async
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue  # noqa: F401
from megatron.core.distributed import (  # noqa: F401
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.enums import Fp8Recipe  # noqa: F401
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add  # noqa: F401
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb  # noqa: F401
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules  # noqa: F401
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols as LayerSymbols  # noqa: F401
from megatron.core.models.hybrid.hybrid_model import HybridModel  # noqa: F401
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: F401
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32  # noqa: F401
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate  # noqa: F401
from megatron.core.optimizer_param_scheduler import (  # noqa: F401
    OptimizerParamScheduler,
    ParamGroupOverride,
)
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: F401
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: F401
from megatron.core.safe_globals import SafeUnpickler  # noqa: F401  (FP8 extra state)
from megatron.core.tensor_parallel import (  # noqa: F401
    CheckpointWithoutOutput,
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from megatron.core.tensor_parallel.layers import (  # noqa: F401
    _initialize_affine_weight_cpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.enums import AttnMaskType  # noqa: F401
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp  # noqa: F401
from megatron.core.transformer.mlp import MLP, MLPSubmodules  # noqa: F401
from megatron.core.transformer.module import Float16Module, MegatronModule  # noqa: F401
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: F401
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: F401
from megatron.core.transformer.transformer_layer import (  # noqa: F401
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint  # noqa: F401


def te_modules():
    """Transformer Engine wrappers from megatron-core; imported lazily (GPU environments only)."""
    from megatron.core.extensions import transformer_engine as te_ext

    if not getattr(te_ext, "HAVE_TE", False):
        raise RuntimeError(
            "the 'te' layer spec needs Transformer Engine (pip install -e '.[gpu]'); "
            "use the 'local' spec on CPU"
        )
    return te_ext


# ---- FP8 (Transformer Engine) ----------------------------------------------------------------
# TE recipe classes behind megatron's --fp8-recipe names (megatron.core.fp8_utils.get_fp8_recipe).
FP8_RECIPE_CLASSES = {
    "delayed": "DelayedScaling",
    "tensorwise": "Float8CurrentScaling",
    "blockwise": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
}


def fp8_recipe_support(recipe: str) -> tuple[bool, str]:
    """Whether this GPU and Transformer Engine run the FP8 recipe ``recipe`` (megatron's name):
    TE's own checks (``check_fp8_support``, ``check_fp8_block_scaling_support``,
    ``check_mxfp8_support``), i.e. what ``te.pytorch.autocast`` would assert at the first
    forward. Returns ``(ok, reason)``; never raises for a missing TE or GPU (ok False)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        from transformer_engine.pytorch import quantization as q
    except ImportError as e:  # pragma: no cover - GPU environments
        return False, f"Transformer Engine is not importable ({e})"
    check = {
        "delayed": q.check_fp8_support,
        "tensorwise": q.check_fp8_support,
        "blockwise": q.check_fp8_block_scaling_support,
        "mxfp8": q.check_mxfp8_support,
    }[recipe]
    ok, reason = check()
    if ok and recipe != "delayed" and recipe != "tensorwise":
        ok, reason = q.check_fp8_support()  # the per-tensor check TE also asserts on entry
    return bool(ok), reason


_TE_QUANTIZATION = []  # [module or None], resolved once (a failed import is not cached by Python)


def _te_quantization():
    if not _TE_QUANTIZATION:
        try:
            from transformer_engine.pytorch import quantization
        except ImportError:
            quantization = None
        _TE_QUANTIZATION.append(quantization)
    return _TE_QUANTIZATION[0]


def fp8_disabled():
    """A context in which Transformer Engine modules run in their high precision even inside an
    enclosing FP8 autocast (``te.pytorch.autocast(enabled=False)``: it saves and restores TE's
    autocast state and, being disabled, triggers no amax reduction on exit). A null context
    when FP8 is not active, so bf16 and CPU runs pay nothing and need no TE."""
    q = _te_quantization()
    if q is None or not q.FP8GlobalStateManager.is_fp8_enabled():
        return contextlib.nullcontext()
    # same recipe object and amax group as the enclosing autocast: same autocast key, so TE's
    # bookkeeping of the enclosing region is untouched
    return q.autocast(
        enabled=False,
        recipe=q.FP8GlobalStateManager.get_fp8_recipe(),
        amax_reduction_group=q.FP8GlobalStateManager.get_fp8_group(),
    )


def fp8_params_disabled():
    """A context in which TE modules are built with high-precision weights even inside
    megatron's ``quantized_model_init`` (``--fp8-param-gather``); null when TE is absent or
    FP8 parameters are not being created."""
    q = _te_quantization()
    if q is None or not q.FP8GlobalStateManager.with_fp8_parameters():
        return contextlib.nullcontext()
    return q.quantized_model_init(enabled=False, recipe=q.FP8GlobalStateManager.get_fp8_recipe())


_TE_GEMM = []  # [general_gemm or None], resolved once


def te_accumulating_gemm():
    """Transformer Engine's ``general_gemm``, used as ``gemm(x, dy, layout="NT",
    out=main_grad, out_dtype=main_grad.dtype, accumulate=True, grad=True)``: ``main_grad +=
    dy^T x`` with bf16 inputs and fp32 accumulation in one GEMM (what TE linears do for
    gradient-accumulation fusion). None without TE."""
    if not _TE_GEMM:
        try:
            from transformer_engine.pytorch.cpp_extensions import general_gemm
        except ImportError:
            general_gemm = None
        _TE_GEMM.append(general_gemm)
    return _TE_GEMM[0]


_TORCH_ADAM_FIXED = False


def fix_torch_adam_distributed_optimizer() -> None:
    """Make megatron-core 0.19.2's DistributedOptimizer checkpoint with torch's AdamW.

    Without apex or Transformer Engine (CPU runs; GPU without TE) megatron's distributed
    optimizer wraps ``torch.optim.AdamW``, whose per-parameter state carries a ``step`` tensor,
    and three places of that path are broken upstream:
    1. ``state_dict()`` (called to build the sharded state dict a load fills) asserts that the
       state holds exactly one step value, so a fresh optimizer cannot load: give every empty
       state AdamW's own zero state first (not a dummy step, which would move the weights);
    2. ``_set_main_param_and_optimizer_states`` copies every tensor of the state, ``step``
       included, from the loaded shard, which has no ``step`` (KeyError): skip what is absent;
    3. ``load_state_dict`` gives every parameter the *same* step tensor, which AdamW then
       increments once per parameter per step (wrong bias correction): give each its own.
    No-op with apex/TE (their fused Adam keeps ``step`` in the param groups)."""
    global _TORCH_ADAM_FIXED
    from megatron.core.optimizer import distrib_optimizer as dopt

    if _TORCH_ADAM_FIXED or dopt.HAVE_APEX_OR_TE:
        return
    cls = dopt.DistributedOptimizer
    orig_state_dict = cls.state_dict
    orig_set_states = cls._set_main_param_and_optimizer_states
    orig_load_state_dict = cls.load_state_dict

    def state_dict(self):
        inner = self.optimizer
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                for p in group["params"]:
                    if not inner.state[p]:
                        inner.state[p] = {
                            "step": torch.tensor(0.0),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                        }
        return orig_state_dict(self)

    class _SkipAbsent(dict):
        def __missing__(self, key):
            return None  # the caller skips non-tensors

    def set_states(self, model_param, tensors):
        return orig_set_states(self, model_param, _SkipAbsent(tensors))

    def load_state_dict(self, state_dict):
        out = orig_load_state_dict(self, state_dict)
        for s in self.optimizer.state.values():
            if isinstance(s.get("step"), torch.Tensor):
                s["step"] = s["step"].clone()
        return out

    cls.state_dict = state_dict
    cls._set_main_param_and_optimizer_states = set_states
    cls.load_state_dict = load_state_dict
    _TORCH_ADAM_FIXED = True


def start_write_results_queue(initializer, initargs=()) -> None:
    """Create the results queue of megatron's checkpoint writer (what ``get_write_results_queue``
    would lazily create at the first save) through a Manager process started with
    ``initializer(*initargs)``, so the caller controls how that helper process lives and dies.
    No-op if the queue exists. Touches the module global ``_results_queue`` of
    ``dist_checkpointing.strategies.filesystem_async`` (megatron-core 0.19)."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    global _write_results_manager
    if _fs_async._results_queue is not None:
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=initializer, initargs=initargs)
    _write_results_manager = manager  # the queue's server lives as long as this object
    _fs_async._results_queue = manager.Queue()


_write_results_manager = None
