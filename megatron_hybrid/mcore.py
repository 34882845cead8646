# ruff: noqa: E402, F401
"""The one place that imports megatron-core internals.

Everything else in megatron_hybrid imports megatron-core names from here, so a megatron-core
upgrade (symbols move between minor releases: GPTModel -> HybridModel, parallel_state ->
ProcessGroupCollection, ...) is fixed in this file. Pinned: megatron-core 0.19.2.
"""

import warnings

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
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue  # noqa: F401
from megatron.core.distributed import (  # noqa: F401
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add  # noqa: F401
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb  # noqa: F401
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules  # noqa: F401
from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols as LayerSymbols  # noqa: F401
from megatron.core.models.hybrid.hybrid_model import HybridModel  # noqa: F401
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: F401
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate  # noqa: F401
from megatron.core.optimizer_param_scheduler import (  # noqa: F401
    OptimizerParamScheduler,
    ParamGroupOverride,
)
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: F401
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: F401
from megatron.core.tensor_parallel import (  # noqa: F401
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
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
