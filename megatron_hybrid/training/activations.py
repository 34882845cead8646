"""What autograd keeps per token of a micro-batch, item by item, for each sub-layer: the
activation half of the memory estimate (training/memory.py).

Read off the layer code (layers/, kernels/) and checked on CPU by
tests/training/test_memory_estimate.py (saved-tensor hooks on the tiny model). Every item is the
bytes of one saved tensor per token on one rank, after tensor (TP), sequence (SP) and context
(CP) parallel splitting, and names the selective-recompute modules that free it. Tensors several
ops save (a view kept alive by another op) are listed once, under the op that keeps the storage.

Spec ``te`` (the GPU default): Transformer Engine norms save their input and an fp32 rstd, TE
linears their input, TE's fused attention q, k, v, output and the fp32 softmax statistics.
Spec ``local`` (megatron linears, our torch RMSNorm, torch SDPA): the norms keep an fp32 copy of
the input and the fp32 normalised value instead of the input; SDPA keeps K/V repeated to every
query head under GQA and, with packed documents, the mask as an [s, S] tensor of the activation
dtype (S keys: the row).
"""

from __future__ import annotations

from dataclasses import dataclass

# Tokens per chunk of our Triton GDN kernels (kernels/gdn/triton_chunk.py CHUNK): the kernel keeps
# one [C, C] fp32 matrix per chunk and head (Tinv).
GDN_CHUNK = 64


@dataclass(frozen=True)
class Item:
    """One saved tensor of a sub-layer, in bytes per token of the micro-batch on this rank."""

    name: str
    bytes: float
    dropped_by: frozenset = frozenset()
    """Selective-recompute modules (core_attn, gdn, mlp, layernorm) that free it."""
    only_with: frozenset = frozenset()
    """Kept only when one of these modules is recomputed (a checkpoint's saved input that no op
    keeps otherwise); empty = kept unless ``dropped_by`` applies."""
    fp8: str = ""
    """Input of an FP8 GEMM (te spec, --fp8-format): 'own' = only that GEMM keeps it, which then
    keeps 1 byte per element (TE's FP8 copy) instead; 'shared' = another op keeps the 16-bit
    tensor too, so the FP8 copy comes on top."""

    def kept(self, modules: frozenset) -> bool:
        """Whether autograd keeps it with these selective-recompute modules."""
        if self.only_with:
            return bool(self.only_with & modules)
        return not (self.dropped_by & modules)


@dataclass(frozen=True)
class Shape:
    """The widths the items depend on, on one TP rank (see :func:`shape_of`)."""

    D: int
    F: int  # MLP width per rank
    H: int  # GDN heads per rank
    K: int
    V: int
    n: int  # attention query heads per rank
    g: int  # KV heads per rank
    d: int  # head dim
    a: int  # bytes of one activation element (2 bf16, 4 fp32)
    sp: int = 1  # divisor of the norm/residual parts (TP with --sequence-parallel)
    cp: int = 1
    row: int = 1  # tokens of the whole packed row (local-spec mask, CP gathered keys)
    spec: str = "te"
    rope: bool = False
    documents: bool = True  # packed documents (masks, conv document starts)
    neg_eigval: bool = True
    save_intermediates: bool = False


def shape_of(run, spec: str) -> Shape:
    """The run's :class:`Shape`: TP splits heads and the MLP, SP the norm/residual tensors."""
    m, p = run.model, run.parallel
    tp = p.tensor
    return Shape(
        D=m.hidden_size, F=m.intermediate_size // tp, H=m.gdn_num_heads // tp,
        K=m.gdn_head_k_dim, V=m.gdn_head_v_dim, n=m.num_attention_heads // tp,
        g=m.num_key_value_heads // tp, d=m.head_dim,
        a=4 if run.train.precision == "fp32" else 2,
        sp=tp if p.sequence_parallel else 1, cp=p.context, row=run.data.seq_length,
        spec=spec, rope=m.rope_theta is not None, documents=run.data.document_masking,
        neg_eigval=m.gdn_allow_neg_eigval, save_intermediates=m.gdn_save_intermediates,
    )  # fmt: skip


def _norm(prefix: str, s: Shape, recomputed: bool) -> list[Item]:
    """A block RMSNorm on a [s/sp, D] tensor; ``recomputed``: the layernorm module reruns it
    (its checkpoint keeps the input, nothing else of the norm)."""
    res, ln = s.a * s.D / s.sp, frozenset({"layernorm"}) if recomputed else frozenset()
    stats = Item(f"{prefix}_stats", 4 / s.sp, ln)  # fp32 rstd per row
    if s.spec == "te":  # TE's norm keeps its input and the rstd
        return [Item(f"{prefix}_input", res), stats]
    # torch RMSNorm: x.float() (kept by x^2 and x * rstd) and the normalised fp32 value (kept by
    # weight * y); the 16-bit input itself only by a layernorm checkpoint
    out = [Item(f"{prefix}_normalised_fp32", 4 * s.D / s.sp, ln), stats]
    if s.a == 4:  # x.float() is the input itself
        return [Item(f"{prefix}_input", res)] + out
    out.append(Item(f"{prefix}_fp32_copy", 4 * s.D / s.sp, ln))
    if recomputed:
        out.append(Item(f"{prefix}_input", res, only_with=ln))
    return out


def gdn_items(s: Shape) -> list[Item]:
    """The ``G`` sub-layer: pre-norm, in_proj/ab_proj, conv, chunked delta rule (our Triton
    kernel), gated RMSNorm, out_proj (layers/gdn.py)."""
    a, H, K, V, res = s.a, s.H, s.K, s.V, s.a * s.D / s.sp
    gdn, ln = frozenset({"gdn"}), frozenset({"layernorm"})
    items = _norm("gdn.norm", s, True) + [
        # the norm's output, kept by in_proj and by the bf16 ab_proj (FP8: in_proj's copy on top)
        Item("gdn.in_proj_input", res, ln, fp8="shared"),
        # the in_proj output [q|k|v|gate] is split into two copies and freed: the gate (kept by
        # the gated norm) and the pre-conv q|k|v (kept by the conv, or as the gdn checkpoint's
        # input)
        Item("gdn.gate", a * H * V),
        Item("gdn.conv_input", a * H * (2 * K + V)),
        # softplus in/out and g (fp32), sigmoid output and beta
        Item("gdn.decay_beta", 12 * H + (2 if s.neg_eigval else 1) * a * H),
        Item("gdn.kernel_qkv", a * H * (2 * K + V), gdn),  # L2-normalised q, k; contiguous v
        Item("gdn.kernel_chunks", 4 * H * (GDN_CHUNK + 3), gdn),  # Tinv, G, q/k rstd (fp32)
        Item("gdn.core_output", a * H * V),  # the gated norm's input
        Item("gdn.gated_norm_stats", 4 * H),
        Item("gdn.out_proj_input", a * H * V, fp8="own"),
    ]
    if s.documents:
        items.append(Item("gdn.conv_doc_starts", 4, gdn))  # int32 document start per token
    if s.save_intermediates:  # W, u and the per-chunk states, in the kernel's buffer dtype
        items.append(Item("gdn.kernel_intermediates", a * H * (K + V + K * V / GDN_CHUNK), gdn))
    if s.cp > 1:
        # parallel/gdn_cp.py records both kernel passes: the conv output, the zero-state pass's
        # output and, at worst (each local chunk continues one document), a second kernel's items
        items.append(Item("gdn.cp_passes", a * H * (2 * (2 * K + V) + V) + 4 * H * GDN_CHUNK, gdn))
    return items


def attention_items(s: Shape) -> list[Item]:
    """The ``*`` sub-layer: fused qkv, full-width QK RMSNorm (our kernel), RoPE, core attention,
    o_proj, Olmo 3 post-norm (layers/attention.py). No pre-norm: the layer input goes to qkv."""
    a, n, g, d, res = s.a, s.n, s.g, s.d, s.a * s.D / s.sp
    ca = frozenset({"core_attn"})
    # K/V rows kept per local query row under CP (all-gather-KV): te selects the keys of each
    # query segment, c + 1/2 local rows' worth at worst (one document per row, zigzag chunks),
    # fewer with shorter documents; local SDPA keeps the whole gathered row (c)
    kv = (s.cp + 0.5 if s.spec == "te" else s.cp) if s.cp > 1 else 1.0
    items = [
        Item("attn.qkv_input", res, fp8="own"),
        # TPFullWidthRMSNorm (kernels/rmsnorm.py, Triton on the GPU) keeps its input and an fp32
        # rstd per row, for q and for k: the contiguous q and k that layers/column_split.py cuts
        # out of the qkv output (before it, with one KV group per rank they were views that kept
        # the whole qkv output, v's columns too)
        Item("attn.qk_norm_input", a * (n + g) * d),
        Item("attn.qk_norm_rstd", 8),
    ]
    if s.rope:
        items.append(Item("attn.rope_cos_sin", 4 * a * d))
    if s.spec == "te":
        items += [
            Item("attn.core_qkv", a * (n + 2 * g * kv) * d),
            Item("attn.core_output", a * n * d, fp8="shared"),  # = o_proj's input
            Item("attn.softmax_stats", 4 * n, ca),
        ]
    else:  # torch SDPA: repeat_interleave'd K/V under GQA, the mask; its output (laid out
        # [b, s, heads, d]) reaches o_proj as a view
        items += [
            Item("attn.core_q", a * n * d),
            Item("attn.core_kv", a * 2 * g * d * kv, only_with=ca if g != n else frozenset()),
            Item("attn.core_output", a * n * d),
            Item("attn.softmax_stats", 4 * n, ca),
        ]
        if g != n:
            items.append(Item("attn.core_kv_repeated", a * 2 * n * d * kv, ca))
        if s.documents:
            items.append(Item("attn.sdpa_mask", a * s.row, ca))
    return items + _norm("attn.post_norm", s, True)


def mlp_items(s: Shape, post_norm: bool) -> list[Item]:
    """The ``-`` sub-layer: SwiGLU MLP (our kernel keeps only the fc1 output), pre-norm after
    GDN, post-norm after attention (layers/mlp_layer.py)."""
    a, F, res = s.a, s.F, s.a * s.D / s.sp
    mlp, ln = frozenset({"mlp"}), frozenset({"layernorm"})
    body = [
        Item("mlp.fc1_output", a * 2 * F, mlp),
        Item("mlp.fc2_input", a * F, mlp, fp8="own"),  # the SwiGLU output
    ]
    if post_norm:
        # fc1 reads the residual stream (the mlp checkpoint's input); the norm follows fc2
        return [Item("mlp.fc1_input", res, fp8="own")] + body + _norm("mlp.post_norm", s, True)
    # the norm's output: fc1's input and the mlp checkpoint's, freed by layernorm recompute
    return _norm("mlp.norm", s, True) + [Item("mlp.fc1_input", res, ln, fp8="own")] + body


def head_items(s: Shape, fused: bool = False) -> list[Item]:
    """Final norm and the output layer's input (the last pipeline stage); not recomputed. The
    fused head + loss (layers/output_loss.py) keeps instead the input's gradient, computed in
    the forward, for the whole (sequence-gathered) row."""
    if fused:
        return _norm("final_norm", s, False) + [Item("output_layer.input_grad (fused)", s.a * s.D)]
    return _norm("final_norm", s, False) + [Item("output_layer.input", s.a * s.D / s.sp)]


def backward_transient(kind: str, s: Shape) -> float:
    """Bytes per token allocated while one sub-layer's backward runs (gradients of its big
    intermediates, kernel buffers), beyond what the forward kept; plus the incoming and outgoing
    residual-stream gradients."""
    a, H, K, V, F = s.a, s.H, s.K, s.V, s.F
    grads = 2 * a * s.D
    if kind == "mlp":  # d(SwiGLU out) [F] and d(fc1 out) [2F]
        return grads + a * 3 * F
    if kind == "attention":  # dq, dk, dv, fp32 dq accumulator, d(out)
        return grads + a * (2 * s.n + 2 * s.g) * s.d + 4 * s.n * s.d
    # GDN kernel backward (kernels/gdn/triton_chunk.py): W, u, du, per-chunk states and their
    # gradients, dP/dB, fp32 dq/dk, dv, the L2 norm's dq/dk, and d(o), d(gate)
    chunk_states = 2 * a * H * K * V / GDN_CHUNK
    return (
        grads
        + a * H * (K + 2 * V)
        + chunk_states
        + 2 * a * H * GDN_CHUNK
        + 8 * H * K
        + a * H * (V + 2 * K + 2 * V)
    )


def sublayer_items(kind: str, s: Shape) -> list[Item]:
    """Items of a sub-layer kind: gdn | attention | mlp_pre | mlp_post."""
    if kind == "gdn":
        return gdn_items(s)
    if kind == "attention":
        return attention_items(s)
    return mlp_items(s, post_norm=kind == "mlp_post")


def resolve(items: list[Item], modules: frozenset, fp8: bool) -> list[Item]:
    """The items kept after the forward with these selective-recompute modules (empty set: all
    of them), with FP8 inputs resized: 'own' 16-bit inputs become TE's 1-byte copy, 'shared'
    ones get the copy on top. layernorm recompute frees the 16-bit norm output, not TE's copy."""
    out = []
    for it in items:
        if fp8 and it.fp8:
            # FP8 runs keep bf16 activations (fp32 is refused): 1 byte per 2
            copy = Item(it.name + "_fp8", it.bytes / 2, it.dropped_by - {"layernorm"}, it.only_with)
            if copy.kept(modules):
                out.append(copy)
            if it.fp8 == "own":
                continue
        if it.kept(modules):
            out.append(it)
    return out
