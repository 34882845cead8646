"""Training batches: megatron-core GPT datasets (or mock tokens) -> micro-batches with
document boundaries, in an order that depends only on the seed and the global batch size.

A micro-batch of ``b`` sequences of length ``s`` is flattened to one packed row of ``b*s``
tokens (megatron's packed-sequence convention, sequence-first ``[b*s, 1, h]`` inside the model)
with ``cu_seqlens`` marking the sequence starts and, with document masking, every document start
(the token after each EOD). GDN state, convs and attention all reset there.
"""

from __future__ import annotations

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
    data_cfg, seed: int, train_samples: int, eval_samples: int, vocab_size: int, eod: int
):
    """(train, valid) datasets. Mock data, or megatron-core GPTDatasets over the blend."""
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
    train, valid, _ = mcore.BlendedMegatronDatasetBuilder(
        mcore.GPTDataset, [train_samples, max(eval_samples, 1), 0], lambda: True, config
    ).build()
    return train, valid


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def check_indexed_dataset(prefix: str, vocab_size: int) -> None:
    """Clear errors for a missing/truncated .bin/.idx or token ids outside the vocabulary."""
    import os

    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise FileNotFoundError(f"--data-path {prefix}: {prefix + ext} not found")
    try:
        ds = mcore.IndexedDataset(prefix, mmap=True)
    except Exception as e:  # megatron raises bare asserts/ValueErrors on bad headers
        raise ValueError(f"--data-path {prefix}: cannot read index ({e})") from None
    itemsize = np.dtype(ds.index.dtype).itemsize
    expected = int(ds.index.sequence_lengths.sum()) * itemsize
    actual = os.path.getsize(prefix + ".bin")
    if actual < expected:
        raise ValueError(
            f"--data-path {prefix}: {prefix}.bin is truncated ({actual:,} bytes, "
            f"index expects {expected:,})"
        )
    top = int(np.max(ds.bin_reader.read(ds.index.dtype, expected // itemsize, 0)))
    if top >= vocab_size:
        raise ValueError(
            f"--data-path {prefix}: token id {top} >= model vocab_size {vocab_size} "
            "(wrong tokenizer, or set --vocab-size)"
        )


def global_batch_indices(
    step: int, global_batch: int, dp_rank: int, dp_size: int, micro_batch: int
) -> list[list[int]]:
    """Sample indices of this DP rank's micro-batches at ``step`` (0-based): the global batch is
    samples [step*G, (step+1)*G), split contiguously over DP ranks, then into micro-batches."""
    per_rank = global_batch // dp_size
    start = step * global_batch + dp_rank * per_rank
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
