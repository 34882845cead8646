"""The task generators against independent brute-force readings of their own token streams,
the dataset plumbing (padding, answer-only mask, determinism) and the model-free scorer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from megatron_hybrid.data.synthetic import SyntheticConfig, build_task_datasets
from megatron_hybrid.data.synthetic_tasks import (
    MQAR,
    Parity,
    StateRecall,
    WordProblem,
    example_rng,
)
from megatron_hybrid.errors import ConfigError
from megatron_hybrid.training.task_accuracy import score


def _examples(task, length, n=40, seed=3):
    return [task.example(example_rng(seed, 0, i, length), length) for i in range(n)]


def test_parity_is_the_running_xor():
    for ex in _examples(Parity(), 17):
        acc = 0
        for t, bit in enumerate(ex.tokens):
            acc ^= int(bit)
            assert ex.labels[t] == acc
        assert ex.loss_mask.all() and set(ex.tokens.tolist()) <= {0, 1}


@pytest.mark.parametrize("name", ["s5", "a5"])
def test_word_problem_is_the_running_permutation_product(name):
    # independent: decode ids with a fresh enumeration and compose tuples by hand
    perms = list(itertools.permutations(range(5)))
    if name == "a5":
        perms = [
            p for p in perms if sum(p[i] > p[j] for i in range(5) for j in range(i + 1, 5)) % 2 == 0
        ]
    task = WordProblem(alternating=name == "a5")
    assert task.vocab_size == len(perms) + 1 == (61 if name == "a5" else 121)
    for ex in _examples(task, 12, n=20):
        state = tuple(range(5))
        for t, g in enumerate(ex.tokens):
            g = perms[g]
            state = tuple(g[state[k]] for k in range(5))  # apply the older product first
            assert perms[ex.labels[t]] == state
    # the groups: A5 closed under products, S5 not commutative
    assert set(task.mul.reshape(-1).tolist()) == set(range(len(perms)))
    assert (task.mul != task.mul.T).any()


def test_mqar_answers_each_query_with_its_value():
    task = MQAR(num_keys=32, num_values=16)
    for ex in _examples(task, 9):
        pairs = ex.tokens[:18].reshape(9, 2)
        table = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))
        assert len(table) == 9 and all(k < 32 <= v < 48 for k, v in table.items())
        queries = ex.tokens[18:]
        assert sorted(queries.tolist()) == sorted(table)
        assert (ex.labels[18:] == [table[q] for q in queries]).all()
        assert ex.loss_mask[:18].sum() == 0 and ex.loss_mask[18:].all()
    with pytest.raises(ValueError, match="num_keys"):
        task.example(np.random.default_rng(0), 33)


def _replay_state_recall(task: StateRecall, tokens) -> list[tuple[int, bool]]:
    """Parse ``b.. INIT a p_a .. e p_e OPS (x y)* QUERY x..`` and execute it (addressed: the bits
    as ``pos_i b_i`` pairs, read by their address tokens): (answer, moved) per query."""
    if task.addressed:
        pairs = [(int(p) - task.pos0, int(b)) for p, b in zip(tokens[0:2 * task.m:2], tokens[1:2 * task.m:2])]  # fmt: skip
        assert sorted(p for p, _ in pairs) == list(range(task.m))
        memory = dict(pairs)
        bits = [memory[i] for i in range(task.m)]
    else:
        bits = [int(b) for b in tokens[: task.m]]
    assert set(bits) <= {0, 1}
    m = task.memory_len
    assert tokens[m] == task.INIT
    ptr = {}
    for i in range(5):
        name, pos = tokens[m + 1 + 2 * i], tokens[m + 2 + 2 * i]
        ptr[int(name) - task.name0] = int(pos) - task.pos0
    assert sorted(ptr) == [0, 1, 2, 3, 4] and len(set(ptr.values())) == 5
    start = dict(ptr)
    i = m + 11
    assert tokens[i] == task.OPS
    i += 1
    while tokens[i] != task.QUERY:
        x, y = int(tokens[i]) - task.name0, int(tokens[i + 1]) - task.name0
        assert x != y
        ptr[x], ptr[y] = ptr[y], ptr[x]
        i += 2
    asked = [int(t) - task.name0 for t in tokens[i + 1 :]]
    assert len(asked) == task.queries and len(set(asked)) == task.queries
    assert task.queries > 1 or asked == [0]  # the spec's single query is a
    return [(bits[ptr[x]], ptr[x] != start[x]) for x in asked]


@pytest.mark.parametrize("addressed, queries", [(False, 1), (True, 1), (True, 5)])
def test_state_recall_answers_the_pointer_after_the_swaps(addressed, queries):
    task = StateRecall(bits=8, addressed=addressed, queries=queries)
    moved = 0
    for n in (0, 1, 6):
        for ex in _examples(task, n, n=60):
            assert len(ex.tokens) == task.seq_len(n)
            answers = _replay_state_recall(task, ex.tokens)
            q = slice(len(ex.tokens) - queries, None)
            assert ex.loss_mask.sum() == queries and ex.loss_mask[q].all()
            assert ex.labels[q].tolist() == [a for a, _ in answers]
            flag = ex.flags["moved"]
            if queries == 1:
                assert flag == answers[0][1]
            else:  # per answer position
                assert flag.tolist() == [False] * (len(ex.tokens) - queries) + [
                    m for _, m in answers
                ]
            moved += sum(m for _, m in answers)
            assert n > 0 or not any(m for _, m in answers)
    assert 30 * queries < moved < 120 * queries  # both kinds occur
    assert max(t for ex in _examples(task, 6) for t in ex.tokens) < task.vocab_size - 1


def test_dataset_pads_masks_and_is_a_function_of_seed_and_index():
    cfg = SyntheticConfig(task="mqar", train_length=6, train_min_length=2, mqar_num_keys=8)
    train, valid = build_task_datasets(cfg, 18, seed=5, train_samples=50, eval_samples=4)
    again, _ = build_task_datasets(cfg, 18, seed=5, train_samples=10, eval_samples=4)
    other, _ = build_task_datasets(cfg, 18, seed=6, train_samples=10, eval_samples=4)
    pad = cfg.build().pad
    lengths = set()
    for i in range(50):
        s = train[i]
        n = int((s["tokens"] != pad).sum())
        lengths.add(n // 3)
        assert (s["tokens"][n:] == pad).all() and s["loss_mask"][n:].sum() == 0
        assert s["loss_mask"].sum() == n // 3
    assert lengths == {2, 3, 4, 5, 6}
    assert all((train[i]["tokens"] == again[i]["tokens"]).all() for i in range(10))
    assert any((train[i]["tokens"] != other[i]["tokens"]).any() for i in range(10))
    assert any((train[i]["tokens"] != valid[i]["tokens"]).any() for i in range(4))


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="use --seq-length 18"):
        SyntheticConfig(task="mqar", train_length=6).check(10)
    with pytest.raises(ConfigError, match="choose one of"):
        SyntheticConfig(task="sorting").check(100)
    with pytest.raises(ConfigError, match="num_keys"):
        SyntheticConfig(task="mqar", train_length=4, eval_lengths=[100]).check(100)


def test_score_on_known_answers():
    labels = np.array([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]])
    mask = np.array([[0, 0, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    preds = np.array([[9, 9, 1, 0], [9, 9, 9, 0], [1, 1, 1, 1]])
    moved = np.array([True, True, False])
    m = score(preds, labels, mask, {"moved": moved})
    # answers: ex0 1 of 2 right, ex1 1 of 1, ex2 4 of 4 -> 6 / 7; all right in ex1 and ex2
    assert m["accuracy"] == pytest.approx(6 / 7)
    assert m["seq_accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy_moved"] == pytest.approx(2 / 3) and m["examples_moved"] == 2
    assert m["answers"] == 7 and m["examples"] == 3
    assert score(preds, labels, mask, {"moved": np.zeros(3, bool)})["accuracy_moved"] is None
    # per answer position: ex0's second answer (wrong) and ex2's first (right) -> 1 of 2
    per_pos = np.zeros((3, 4), bool)
    per_pos[0, 3] = per_pos[2, 0] = per_pos[1, 0] = True  # ex1 pos 0 is no answer: ignored
    m = score(preds, labels, mask, {"moved": per_pos})
    assert m["accuracy_moved"] == pytest.approx(1 / 2) and m["examples_moved"] == 2


def test_cli_flags_reach_the_run_config():
    from megatron_hybrid.training.cli import parse
    from megatron_hybrid.training.loop import resolve_vocab

    run, _ = parse(
        [
            "--synthetic-task",
            "mqar",
            "--synthetic-train-length",
            "8",
            "--seq-length",
            "24",
            "--synthetic-eval-lengths",
            "4",
            "8",
            "--no-gdn-neg-eigval",
            "synthetic.mqar_num_keys=16",
            "--hybrid-layer-pattern",
            "G-*-",
        ]  # fmt: skip
    )
    s = run.synthetic
    assert (s.task, s.train_length, s.eval_lengths, s.mqar_num_keys) == ("mqar", 8, [4, 8], 16)
    assert run.model.gdn_allow_neg_eigval is False and run.model.num_layers == 2
    run.validate(1)  # a synthetic task is training data: no --data-path needed
    _, vocab, eod = resolve_vocab(run, 1)
    assert vocab == 128 and eod == 127 and eod >= s.build().vocab_size
    run.data.seq_length = 23
    with pytest.raises(ConfigError, match="use --seq-length 24"):
        run.validate(1)


def test_state_recall_shortcut_line_is_the_majority_bit_accuracy_of_the_generator():
    """The dashed line of the recall plot: answering the memory's majority bit (no lookup)."""
    from megatron_hybrid.science.expressivity import REAL_TASKS
    from megatron_hybrid.science.expressivity_report import shortcut_accuracy

    task, rng = StateRecall(bits=16), np.random.default_rng(0)
    hits = []
    for _ in range(4000):
        ex = task.example(rng, 6)
        ones = int(ex.tokens[:16].sum())
        guess = int(rng.integers(0, 2)) if ones == 8 else int(ones > 8)
        hits.append(guess == ex.labels[-1])
    assert np.mean(hits) == pytest.approx(shortcut_accuracy(REAL_TASKS["state_recall"]), abs=0.02)
    assert shortcut_accuracy(REAL_TASKS["parity"]) is None
