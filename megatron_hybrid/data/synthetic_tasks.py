"""Synthetic expressivity tasks as seeded, streaming token generators (no files).

Every task turns a *length* (its size parameter: bits of parity, group elements of a word
problem, key-value pairs of MQAR, swap statements of state-based recall) into one example:
``tokens`` (the model's input), ``labels`` (the target at each position: not the shifted
input, the answer the model must emit *at* that position) and ``loss_mask`` (1 on answer
positions only). Example ``i`` of a stream depends only on ``(seed, i)``, so a training run
reads the same examples whatever its batch size, and test sets of other lengths are drawn from
independent streams. Training and test lengths are set separately (length generalisation).

Tasks (the Olmo Hybrid paper's probes, ../shared/docs/olmo-hybrid.md):

- ``parity``: bits ``x_1..x_L``; label at every position t = x_1 xor .. xor x_t.
- ``s5`` / ``a5``: word problem of the symmetric group S5 (120 elements) / alternating group
  A5 (60): elements ``g_1..g_L``; label at every t = the running product
  ``g_t o .. o g_1`` (apply g_1 first). Elements are numbered in the lexicographic order of
  ``itertools.permutations(range(5))`` (A5: the even ones, same order); ``(g o h)[i] = g[h[i]]``.
- ``mqar``: multi-query associative recall: ``k_1 v_1 .. k_L v_L`` (distinct keys) then every
  key once more in random order; label at each query = its value.
- ``state_recall``: ``b_0..b_{m-1} INIT a p_a b p_b c p_c d p_d e p_e OPS (x y)*n QUERY a``:
  m random bits, five distinct pointers into them, n swaps of two pointers' values; the single
  label (at the final ``a``) is ``bits[a]`` after the swaps. The length is n; m is fixed per
  task (pointer tokens the model never saw would make longer tests fail for another reason).
  Examples record whether ``a`` ended elsewhere than it started (``moved``): accuracy is
  reported on those too, where recall alone cannot answer. ``addressed=True`` writes the bits
  as ``0 b_0 1 b_1 .. m-1 b_{m-1}`` (each bit after its address, the pointer values' tokens):
  the final lookup is then by content, as in MQAR, instead of by absolute position, which
  neither attention with RoPE nor a recurrence reads off directly (docs/science.md, why).
  ``queries=q > 1`` ends with ``QUERY x_1..x_q`` (q distinct names in random order), each
  answered with its bit: q labels per example instead of one; ``moved`` is then per answer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Example:
    """One task instance; arrays of equal length ``L_seq``."""

    tokens: np.ndarray
    """int64 [L_seq] model input."""
    labels: np.ndarray
    """int64 [L_seq] target at each position (PAD where loss_mask is 0)."""
    loss_mask: np.ndarray
    """float32 [L_seq]: 1 at answer positions."""
    flags: dict[str, bool] = field(default_factory=dict)
    """Per-example subsets accuracy is also reported on (state_recall: ``moved``)."""


class Task:
    """A task's vocabulary and its example generator. Subclasses set ``name``, ``vocab_size``
    (every input and label token is below it), ``pad`` and implement ``seq_len``/``example``."""

    name = "task"
    vocab_size = 0
    pad = 0
    subsets: tuple[str, ...] = ()
    """Names of the ``Example.flags`` that get an accuracy of their own."""

    def seq_len(self, length: int) -> int:
        raise NotImplementedError

    def example(self, rng: np.random.Generator, length: int) -> Example:
        raise NotImplementedError

    def check_length(self, length: int) -> None:
        if length < 1:
            raise ValueError(f"{self.name}: length {length} must be >= 1")


class Parity(Task):
    name = "parity"
    vocab_size, pad = 3, 2

    def seq_len(self, length):
        return length

    def example(self, rng, length):
        self.check_length(length)
        bits = rng.integers(0, 2, length)
        return Example(bits, np.cumsum(bits) % 2, np.ones(length, np.float32))


def permutation_group(alternating: bool) -> tuple[np.ndarray, np.ndarray]:
    """(elements [n, 5], multiplication table [n, n] with mul[g, h] = index of g o h)."""
    perms = list(itertools.permutations(range(5)))
    if alternating:
        perms = [p for p in perms if _sign(p) == 1]
    elements = np.array(perms, dtype=np.int64)
    index = {p: i for i, p in enumerate(perms)}
    mul = np.empty((len(perms), len(perms)), dtype=np.int64)
    for gi, g in enumerate(perms):
        for hi, h in enumerate(perms):
            mul[gi, hi] = index[tuple(g[h[k]] for k in range(5))]
    return elements, mul


def _sign(p) -> int:
    inversions = sum(1 for i in range(len(p)) for j in range(i + 1, len(p)) if p[i] > p[j])
    return -1 if inversions % 2 else 1


class WordProblem(Task):
    """S5 (``alternating=False``) or A5 word problem, labelled at every position."""

    def __init__(self, alternating: bool):
        self.name = "a5" if alternating else "s5"
        self.elements, self.mul = permutation_group(alternating)
        n = len(self.elements)
        self.vocab_size, self.pad = n + 1, n

    def seq_len(self, length):
        return length

    def example(self, rng, length):
        self.check_length(length)
        g = rng.integers(0, len(self.elements), length)
        out = np.empty(length, dtype=np.int64)
        state = g[0]
        out[0] = state
        for t in range(1, length):
            state = self.mul[g[t], state]
            out[t] = state
        return Example(g, out, np.ones(length, np.float32))


class MQAR(Task):
    """Keys are tokens [0, num_keys), values [num_keys, num_keys + num_values)."""

    name = "mqar"

    def __init__(self, num_keys: int = 64, num_values: int = 64):
        self.num_keys, self.num_values = num_keys, num_values
        self.vocab_size = num_keys + num_values + 1
        self.pad = num_keys + num_values

    def seq_len(self, length):
        return 3 * length

    def check_length(self, length):
        super().check_length(length)
        if length > self.num_keys:
            raise ValueError(
                f"mqar: {length} key-value pairs need at least as many keys (num_keys "
                f"{self.num_keys}; raise synthetic.mqar_num_keys)"
            )

    def example(self, rng, length):
        self.check_length(length)
        keys = rng.choice(self.num_keys, length, replace=False)
        values = self.num_keys + rng.integers(0, self.num_values, length)
        order = rng.permutation(length)
        tokens = np.concatenate([np.stack([keys, values], 1).reshape(-1), keys[order]])
        labels = np.full(3 * length, self.pad, dtype=np.int64)
        labels[2 * length :] = values[order]
        mask = np.zeros(3 * length, np.float32)
        mask[2 * length :] = 1
        return Example(tokens, labels, mask)


class StateRecall(Task):
    """Token ids: bits 0/1, pointer values 2..2+m-1, names a..e, INIT, OPS, QUERY, PAD."""

    name = "state_recall"
    subsets = ("moved",)
    NAMES = 5

    def __init__(self, bits: int = 16, addressed: bool = False, queries: int = 1):
        if bits < self.NAMES:
            raise ValueError(f"state_recall: bits={bits} must be >= {self.NAMES} (one per pointer)")
        if not 1 <= queries <= self.NAMES:
            raise ValueError(f"state_recall: queries={queries} must be in 1..{self.NAMES}")
        self.queries = queries
        self.m = bits
        self.addressed = addressed
        self.memory_len = 2 * bits if addressed else bits
        self.pos0 = 2
        self.name0 = 2 + bits
        self.INIT, self.OPS, self.QUERY = (self.name0 + self.NAMES + i for i in range(3))
        self.pad = self.QUERY + 1
        self.vocab_size = self.pad + 1

    def seq_len(self, length):
        return self.memory_len + 1 + 2 * self.NAMES + 1 + 2 * length + 1 + self.queries

    def check_length(self, length):
        if length < 0:
            raise ValueError(f"state_recall: {length} swaps must be >= 0")

    def example(self, rng, length):
        self.check_length(length)
        bits = rng.integers(0, 2, self.m)
        pointers = rng.choice(self.m, self.NAMES, replace=False)
        start = pointers.copy()
        if self.addressed:
            toks = [t for i, b in enumerate(bits) for t in (self.pos0 + i, b)]
        else:
            toks = [*bits]
        toks.append(self.INIT)
        for name in range(self.NAMES):
            toks += [self.name0 + name, self.pos0 + int(pointers[name])]
        toks.append(self.OPS)
        for _ in range(length):
            x, y = rng.choice(self.NAMES, 2, replace=False)
            pointers[[x, y]] = pointers[[y, x]]
            toks += [self.name0 + int(x), self.name0 + int(y)]
        # the spec's single query is always a; several are distinct names in random order
        asked = [0] if self.queries == 1 else rng.permutation(self.NAMES)[: self.queries]
        toks += [self.QUERY, *(self.name0 + int(x) for x in asked)]
        tokens = np.array(toks, dtype=np.int64)
        labels = np.full(len(tokens), self.pad, dtype=np.int64)
        mask = np.zeros(len(tokens), np.float32)
        moved = np.zeros(len(tokens), bool)
        for i, x in enumerate(asked, start=len(tokens) - len(asked)):
            labels[i], mask[i], moved[i] = bits[pointers[x]], 1, pointers[x] != start[x]
        flag = bool(moved[-1]) if self.queries == 1 else moved
        return Example(tokens, labels, mask, {"moved": flag})


TASK_NAMES = ("parity", "s5", "a5", "mqar", "state_recall")


def build_task(name: str, *, state_recall_bits: int = 16, state_recall_addressed: bool = False,
               state_recall_queries: int = 1, mqar_num_keys: int = 64,
               mqar_num_values: int = 64) -> Task:  # fmt: skip
    if name == "parity":
        return Parity()
    if name in ("s5", "a5"):
        return WordProblem(alternating=name == "a5")
    if name == "mqar":
        return MQAR(mqar_num_keys, mqar_num_values)
    if name == "state_recall":
        return StateRecall(state_recall_bits, state_recall_addressed, state_recall_queries)
    raise ValueError(f"unknown synthetic task {name!r}; choose one of {', '.join(TASK_NAMES)}")


# Streams: independent generators per purpose, so training never sees a test example's RNG.
TRAIN_STREAM, VALID_STREAM, TEST_STREAM = 0, 1, 2


def example_rng(seed: int, stream: int, index: int, length: int = 0) -> np.random.Generator:
    """The generator of example ``index`` of a stream: depends only on these numbers."""
    return np.random.default_rng([seed, stream, length, index])


def padded(ex: Example, seq_length: int, pad: int) -> dict:
    """``ex`` right-padded to ``seq_length`` (PAD tokens, mask 0), as the trainer's sample dict."""
    n = len(ex.tokens)
    if n > seq_length:
        raise ValueError(
            f"a synthetic example of {n} tokens does not fit --seq-length {seq_length}"
        )
    tokens = np.full(seq_length, pad, dtype=np.int64)
    labels = np.full(seq_length, pad, dtype=np.int64)
    mask = np.zeros(seq_length, dtype=np.float32)
    tokens[:n], labels[:n], mask[:n] = ex.tokens, ex.labels, ex.loss_mask
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}
