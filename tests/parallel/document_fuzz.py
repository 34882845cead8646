"""Seeded rows of packed documents that favour the layouts context parallelism finds hard.

A row of ``N + 1`` tokens (tokens = row[:-1], labels = row[1:]) has documents separated by EOD;
the trainer's ``collate`` starts a document after every EOD. Each row mixes a few of these
*features*, placed against the CP chunk grids of CP 2 and CP 4 (chunks of N/4 and N/8 tokens):

- ``eod_only``: every token is EOD (N one-token documents);
- ``single``: one document over the whole row (no boundary on any rank; every chunk continues);
- ``chunk_start``: a document starts exactly at a chunk start (its EOD is the chunk's last
  token before it);
- ``halo``: a document starts 1-3 tokens after a chunk start (inside the next chunk's conv halo);
- ``one_token``: a run of consecutive EODs (one-token documents), often at a chunk edge;
- ``random``: a few boundaries anywhere;
- ``empty_rank``: boundaries only in the first quarter, so CP ranks holding other chunks see none.

Rows depend only on (seed, index); about one row in five also masks the loss at EOD labels.
"""

from __future__ import annotations

import torch

FEATURES = ("eod_only", "single", "chunk_start", "halo", "one_token", "random", "empty_rank")


def _grid(n: int) -> list[int]:
    """Chunk starts of CP 2 and CP 4 (other than 0)."""
    return sorted({j * n // 8 for j in range(1, 8)})


def document_ends(features: list[str], n: int, g: torch.Generator) -> set[int]:
    """Positions of EOD tokens in a row of ``n + 1`` tokens for the given features."""

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    ends: set[int] = set()
    for f in features:
        if f == "eod_only":
            return set(range(n + 1))
        if f == "single":
            continue
        if f == "chunk_start":  # a document starts exactly at a chunk start
            ends.add(pick(_grid(n)) - 1)
        elif f == "halo":  # ... or 1..3 tokens into a chunk (inside the conv halo rows)
            ends.add(pick(_grid(n)) - 1 + int(torch.randint(1, 4, (1,), generator=g)))
        elif f == "one_token":  # a run of EODs = one-token documents, near a chunk edge
            start = pick(_grid(n)) - int(torch.randint(0, 3, (1,), generator=g))
            ends.update(range(start, start + int(torch.randint(2, 5, (1,), generator=g))))
        elif f == "random":
            k = int(torch.randint(1, 5, (1,), generator=g))
            ends.update(int(x) for x in torch.randint(0, n, (k,), generator=g))
        elif f == "empty_rank":
            ends.add(int(torch.randint(0, max(n // 4 - 1, 1), (1,), generator=g)))
    return {e for e in ends if 0 <= e <= n}


def row_features(idx: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed * 7919 + idx)
    if idx % 11 == 5:
        return ["eod_only"]
    if idx % 7 == 3:
        return ["single"]
    k = int(torch.randint(1, 4, (1,), generator=g))
    perm = torch.randperm(len(FEATURES) - 2, generator=g)[:k]  # not eod_only / single
    return [FEATURES[2 + int(i)] for i in perm]


class FuzzDocumentsDataset:
    """Drop-in for the trainer's ``MockDataset`` (same constructor) with fuzzed documents."""

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
        row = torch.randint(0, self.vocab - 1, (self.s + 1,), generator=g)
        row[row >= self.eod] += 1  # no EOD among the random tokens
        ends = document_ends(row_features(int(idx), self.seed), self.s, g)
        if ends:
            row[torch.tensor(sorted(ends))] = self.eod
        loss_mask = torch.ones(self.s, dtype=torch.float)
        if int(torch.randint(0, 5, (1,), generator=g)) == 0:
            loss_mask[row[1:] == self.eod] = 0.0  # megatron's eod_mask_loss on some rows
        if ends == set(range(self.s + 1)):
            loss_mask[:] = 1.0  # keep some loss in the EOD-only row
        return {"tokens": row[:-1], "labels": row[1:], "loss_mask": loss_mask}
