"""Training batches: megatron-core GPT datasets (or mock tokens) -> micro-batches with
document boundaries, in an order that depends only on the seed and the consumed-sample count.

A micro-batch of ``b`` sequences of length ``s`` is flattened to one packed row of ``b*s``
tokens (megatron's packed-sequence convention, sequence-first ``[b*s, 1, h]`` inside the model)
with ``cu_seqlens`` marking the sequence starts and, with document masking, every document start
(the token after each EOD). GDN state, convs and attention all reset there.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_hybrid import mcore


class _DatasetTokenizer:
    """The two attributes megatron's GPTDataset reads from a tokenizer."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod
        self.unique_identifiers = {"class": "megatron_hybrid", "vocab": vocab_size, "eod": eod}


class MockDataset:
    """Random tokens with EOD-separated documents of random length; sample i depends only on
    (seed, i)."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, eod: int, seed: int):
        self.n, self.s, self.vocab, self.eod, self.seed = (
            num_samples,
            seq_length,
            vocab_size,
            eod,
            seed,
        )

    def __len__(self):
        return self.n

    def __getitem__(self, idx: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        text = torch.randint(0, self.vocab - 1, (self.s + 1,), generator=g)
        text[text >= self.eod] += 1  # keep EOD out of the random tokens ...
        n_docs = int(torch.randint(1, 4, (1,), generator=g))
        ends = torch.randint(0, self.s, (n_docs - 1,), generator=g)
        text[ends] = self.eod  # ... then place a few document ends
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": torch.ones(self.s, dtype=torch.float),
        }


def build_datasets(
    data_cfg,
    seed: int,
    train_samples: int,
    eval_samples: int,
    vocab_size: int,
    eod: int,
    with_valid: bool = True,
    synthetic=None,
):
    """(train, valid) datasets. Mock data, a generated task (``synthetic``, a SyntheticConfig
    with a task set: data/synthetic.py), or megatron-core GPTDatasets over the blend.
    ``with_valid=False`` (no evaluation) builds no validation split (valid is then None)."""
    if synthetic is not None and synthetic.task:
        from megatron_hybrid.data.synthetic import build_task_datasets

        return build_task_datasets(
            synthetic, data_cfg.seq_length, seed, train_samples, eval_samples
        )
    if data_cfg.mock:
        train = MockDataset(train_samples, data_cfg.seq_length, vocab_size, eod, seed)
        valid = MockDataset(max(eval_samples, 1), data_cfg.seq_length, vocab_size, eod, seed + 1)
        return train, valid
    paths = list(data_cfg.data_path)
    if len(paths) > 1 and _is_number(paths[0]):
        weights, prefixes = [float(w) for w in paths[0::2]], paths[1::2]
    else:
        weights, prefixes = None, paths
    for prefix in prefixes:
        check_indexed_dataset(prefix, vocab_size)
    config = mcore.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data_cfg.seq_length,
        blend=(prefixes, weights),
        split=data_cfg.split,
        path_to_cache=data_cfg.cache_dir,
        tokenizer=_DatasetTokenizer(vocab_size, eod),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # Splits nobody reads are not built: megatron loops forever sizing an empty split
    # (GPTDataset._get_num_epochs), and the train split's documents do not depend on this.
    config.split_matrix[2] = None
    if not with_valid:
        config.split_matrix[1] = None
    sizes = [train_samples, max(eval_samples, 1), 0]
    for prefix, wanted in zip(prefixes, _samples_per_prefix(sizes, weights, len(prefixes))):
        check_split_sizes(prefix, data_cfg.split, config.split_matrix, data_cfg.seq_length, wanted)
    train, valid, _ = mcore.BlendedMegatronDatasetBuilder(
        mcore.GPTDataset, sizes, lambda: True, config
    ).build()
    return train, valid


def _samples_per_prefix(sizes: list[int], weights, n_prefixes: int) -> list[list]:
    """Per prefix, the samples megatron's builder asks of each of its splits: all of them for a
    single prefix, the weighted share (+1% for its surplus) in a weighted blend, one pass
    (None) in an unweighted blend."""
    if weights:
        total = sum(weights)
        return [[math.ceil(n * w / total * 1.01) for n in sizes] for w in weights]
    if n_prefixes > 1:
        return [[None] * len(sizes)] * n_prefixes
    return [list(sizes)]


MAX_EPOCHS = 10_000
"""More passes over one split than this are refused: megatron counts epochs in a Python loop
and builds an index entry per document per epoch, so a tiny split asked for many samples
stalls setup (and its memory) much like an empty one."""


def check_split_sizes(
    prefix: str, split: str, split_matrix, seq_length: int, samples=(None, None, None)
) -> None:
    """Every split that will be built holds at least one document and the seq_length + 1
    tokens one sample reads, and gives ``samples`` (per split; None = one pass) in at most
    MAX_EPOCHS passes; else a clear error with the numbers. (megatron-core would spin forever
    in GPTDataset._get_num_epochs adding empty epochs, deaf to SIGTERM.)"""
    lengths = np.asarray(_read_index(prefix).lengths)
    n_docs = len(lengths)
    for name, bounds in zip(("train", "valid", "test"), split_matrix):
        if bounds is None:
            continue
        # the document range megatron's builder gives this split
        beg, end = (int(round(b * float(n_docs))) for b in bounds)
        tokens = int(lengths[beg:end].sum())
        if end - beg < 1 or tokens < seq_length + 1:
            raise ValueError(
                f"--data-path {prefix}: --split {split} gives the {name} split {end - beg} of "
                f"{n_docs} documents ({tokens:,} tokens); one sample needs seq_length + 1 = "
                f"{seq_length + 1:,} tokens (more or smaller documents, another --split, or a "
                "shorter --seq-length)"
            )
        wanted = samples[("train", "valid", "test").index(name)]
        epochs = math.ceil((wanted * seq_length + 1) / tokens) if wanted else 1
        if epochs > MAX_EPOCHS:
            raise ValueError(
                f"--data-path {prefix}: the {name} split ({tokens:,} tokens in {end - beg} "
                f"documents) would be repeated {epochs:,} times for {wanted:,} samples of "
                f"{seq_length} tokens (at most {MAX_EPOCHS:,}): use more data or fewer samples"
            )


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


_IDX_MAGIC = b"MMIDIDX\x00\x00"
# megatron-core's DType codes (datasets/indexed_dataset.py)
_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


class _Index:
    """The parts of a megatron ``.idx`` file the checks need, read without megatron (whose
    reader asserts on bad headers and then warns from ``__del__``)."""

    def __init__(self, dtype, lengths, pointers, doc_idx):
        self.dtype, self.lengths, self.pointers, self.doc_idx = dtype, lengths, pointers, doc_idx


def _read_index(prefix: str) -> _Index:
    """Parse and check ``prefix.idx`` on its own (header, version, dtype code, exact size)."""
    import os

    idx = prefix + ".idx"
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _IDX_MAGIC:
        raise ValueError(f"--data-path {prefix}: {idx} is not a megatron index (bad header)")
    version = int.from_bytes(head[9:17], "little")
    code = head[17]
    n_seq = int.from_bytes(head[18:26], "little")
    n_doc = int.from_bytes(head[26:34], "little")
    if version != 1:
        raise ValueError(f"--data-path {prefix}: {idx} has index version {version} (expected 1)")
    if code not in _DTYPES:
        raise ValueError(
            f"--data-path {prefix}: {idx} has dtype code {code} (valid: 1-8, megatron's DType)"
        )
    expected = 34 + n_seq * (4 + 8) + n_doc * 8
    if size != expected:
        raise ValueError(
            f"--data-path {prefix}: {idx} is {size:,} bytes but its header ({n_seq:,} sequences, "
            f"{n_doc:,} document entries) needs exactly {expected:,} (truncated or corrupt index)"
        )
    raw = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = raw[34 : 34 + 4 * n_seq].view(np.int32)
    pointers = raw[34 + 4 * n_seq : 34 + 12 * n_seq].view(np.int64)
    doc_idx = raw[34 + 12 * n_seq : expected].view(np.int64)
    return _Index(np.dtype(_DTYPES[code]), lengths, pointers, doc_idx)


def check_indexed_dataset(prefix: str, vocab_size: int) -> None:
    """The ``.idx`` checked against its ``.bin`` exactly, then token ids against the
    vocabulary, with errors naming both files. An index from another corpus next to a larger
    .bin would otherwise train on whatever bytes the pointers hit."""
    import os

    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(f"--data-path {prefix}: {prefix + ext} not found")
    index = _read_index(prefix)
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    lengths, pointers, doc_idx = index.lengths, index.pointers.astype(np.int64), index.doc_idx
    itemsize = index.dtype.itemsize
    if len(lengths) == 0:
        raise ValueError(f"--data-path {prefix}: {idx_path} indexes no documents")
    if (lengths < 0).any() or (pointers < 0).any():
        raise ValueError(f"--data-path {prefix}: {idx_path} has negative lengths or pointers")
    if (
        len(doc_idx) < 2
        or doc_idx[0] != 0
        or doc_idx[-1] != len(lengths)
        or (np.diff(doc_idx) < 0).any()
    ):
        raise ValueError(
            f"--data-path {prefix}: {idx_path} has an inconsistent document index "
            f"({len(doc_idx)} entries for {len(lengths)} sequences)"
        )
    ends = pointers + lengths.astype(np.int64) * itemsize
    expected = int(ends.max())
    actual = os.path.getsize(bin_path)
    if actual < expected:
        raise ValueError(
            f"--data-path {prefix}: {bin_path} is truncated ({actual:,} bytes, {idx_path} "
            f"expects {expected:,})"
        )
    if actual != expected:
        raise ValueError(
            f"--data-path {prefix}: {bin_path} has {actual:,} bytes but {idx_path} ends its last "
            f"document at byte {expected:,} ({len(lengths):,} documents of {index.dtype}): the "
            "two files are not from the same preprocessing run"
        )
    tokens = np.memmap(bin_path, mode="r", dtype=index.dtype)
    top, low = (int(tokens.max()), int(tokens.min())) if len(tokens) else (0, 0)
    if top >= vocab_size:
        raise ValueError(
            f"--data-path {prefix}: token id {top} in {bin_path} >= model vocab_size {vocab_size} "
            "(wrong tokenizer, or set --vocab-size)"
        )
    if low < 0:
        raise ValueError(f"--data-path {prefix}: negative token id {low} in {bin_path}")


def global_batch_size_at(consumed: int, global_batch: int, rampup=None) -> int:
    """The global batch size of the step that starts after ``consumed`` samples. With
    ``rampup = (start, increment, samples)`` exactly Megatron-LM's RampupBatchsizeNumMicroBatches
    Calculator: start + increment * int(consumed / (samples / num_increments)) until more than
    ``samples`` samples are consumed, then ``global_batch``."""
    if not rampup:
        return global_batch
    start, increment, samples = rampup
    num_increments = (global_batch - start) // increment
    if num_increments == 0 or consumed > samples:
        return global_batch
    steps = int(consumed / (samples / num_increments))
    return min(start + steps * increment, global_batch)


def samples_after_steps(steps: int, global_batch: int, rampup=None, consumed: int = 0) -> int:
    """Consumed samples after ``steps`` more steps starting from ``consumed`` (sizes follow
    :func:`global_batch_size_at`, so the ramp is replayed step by step)."""
    if not rampup:
        return consumed + steps * global_batch  # (no loop: train_iters can be large)
    for _ in range(steps):
        if consumed > rampup[2]:  # past the ramp: constant from here on
            return consumed + (steps - _) * global_batch
        consumed += global_batch_size_at(consumed, global_batch, rampup)
    return consumed


def global_batch_indices(
    consumed: int, global_batch: int, dp_rank: int, dp_size: int, micro_batch: int
) -> list[list[int]]:
    """Sample indices of this DP rank's micro-batches for the step that starts after
    ``consumed`` samples (as Megatron-LM's samplers): the global batch is samples
    [consumed, consumed + G), split contiguously over DP ranks, then into micro-batches. Keyed
    by the consumed count, not the iteration, so a resume with another (or a ramping) batch size
    neither skips nor repeats samples."""
    per_rank = global_batch // dp_size
    start = consumed + dp_rank * per_rank
    return [
        list(range(start + m, start + m + micro_batch)) for m in range(0, per_rank, micro_batch)
    ]


def collate(samples: list[dict], eod: int, document_masking: bool) -> dict:
    """Flatten ``b`` samples into one packed row with cu_seqlens (see module docstring)."""
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
    loss_mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
    b, s = tokens.shape
    starts = {i * s for i in range(b)}
    if document_masking:
        flat = tokens.reshape(-1)
        ends = (flat == eod).nonzero().flatten() + 1
        starts.update(int(e) for e in ends if e < b * s)
    cu = torch.tensor(sorted(starts) + [b * s], dtype=torch.int32)
    return {
        "tokens": tokens.reshape(1, -1),
        "labels": labels.reshape(1, -1),
        "loss_mask": loss_mask.reshape(1, -1),
        "cu_seqlens": cu,
    }


def packed_seq_params(cu_seqlens: torch.Tensor, total: int):
    """megatron PackedSeqParams for a packed row. ``max_seqlen`` is the *row* length: megatron
    sizes the RoPE table from it (positions run over the row; RoPE is relative, so scores inside
    a document equal those of per-document positions)."""
    return mcore.PackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=total,
        max_seqlen_kv=total,
    )
