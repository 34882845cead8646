"""Accuracy of a model on a synthetic task at several test lengths.

``score`` is model-free (predictions in, accuracies out) so it can be checked on cases with a
known answer; ``accuracy_by_length`` draws fresh test examples (a stream training never reads)
and runs any ``forward(tokens_bs) -> logits_bsV``; ``trainer_report`` wires it to a Trainer's
model (one model-parallel rank: TP = PP = CP = 1) and logs one line per length.

Metrics per length: ``accuracy`` = fraction of answer positions predicted exactly (argmax over
the whole vocabulary), ``seq_accuracy`` = fraction of examples with every answer right, and
``accuracy_<flag>`` on the examples carrying a task flag (state_recall: ``moved``).
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_hybrid.data.synthetic_tasks import TEST_STREAM, Task, example_rng, padded


def score(preds, labels, mask, flags: dict[str, np.ndarray] | None = None) -> dict:
    """preds, labels [N, L] ints, mask [N, L] (answer positions nonzero), flags name -> bool [N]
    (examples in the subset) or bool [N, L] (answer positions in it: tasks with several answers
    of different kinds per example). Examples without any answer position count as right in
    seq_accuracy."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    mask = np.asarray(mask) != 0
    right = (preds == labels) & mask
    per_example_answers = mask.sum(1)
    per_example_right = right.sum(1)
    out = {
        "accuracy": float(per_example_right.sum() / max(per_example_answers.sum(), 1)),
        "seq_accuracy": float((per_example_right == per_example_answers).mean()),
        "examples": int(len(preds)),
        "answers": int(per_example_answers.sum()),
    }
    for name, sel in (flags or {}).items():
        sel = np.asarray(sel, dtype=bool)
        if sel.ndim == 2:  # per answer position
            n, hits, examples = (
                int((mask & sel).sum()),
                int((right & sel).sum()),
                (mask & sel).any(1),
            )
        else:
            n, hits, examples = (
                int(per_example_answers[sel].sum()),
                per_example_right[sel].sum(),
                sel,
            )
        out[f"accuracy_{name}"] = float(hits / n) if n else None
        out[f"examples_{name}"] = int(examples.sum())
    return out


def draw_test_set(task: Task, length: int, n: int, seed: int) -> list:
    """The ``n`` test examples of one length (stream TEST_STREAM, keyed by the length too)."""
    return [task.example(example_rng(seed, TEST_STREAM, i, length), length) for i in range(n)]


@torch.no_grad()
def accuracy_by_length(forward, task: Task, lengths, n_examples: int, batch_size: int,
                       seed: int) -> dict[int, dict]:  # fmt: skip
    """length -> score(...) for ``n_examples`` fresh examples at each length."""
    out = {}
    for length in lengths:
        exs = draw_test_set(task, length, n_examples, seed)
        seq = task.seq_len(length)
        preds = []
        for b in range(0, len(exs), batch_size):
            chunk = [padded(e, seq, task.pad)["tokens"] for e in exs[b : b + batch_size]]
            logits_bsV = forward(torch.as_tensor(np.stack(chunk)))
            preds.append(logits_bsV.argmax(-1).cpu().numpy())
        labels = np.stack([e.labels for e in exs])
        mask = np.stack([e.loss_mask for e in exs])
        flags = {k: np.array([e.flags[k] for e in exs]) for k in task.subsets}
        out[int(length)] = score(np.concatenate(preds), labels, mask, flags)
    return out


def packed_forward(model, device):
    """``forward(tokens_bs) -> logits_bsV`` for our model: the batch packed into one row with a
    document start per example (the trainer's layout, so attention and GDN state never cross
    examples)."""
    from megatron_hybrid.data.batches import packed_seq_params

    def forward(tokens_bs):
        b, s = tokens_bs.shape
        row = tokens_bs.reshape(1, -1).to(device)
        cu = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=device)
        pos = torch.arange(b * s, device=device).unsqueeze(0)
        logits_1nV = model(row, pos, None, packed_seq_params=packed_seq_params(cu, b * s))
        return logits_1nV.reshape(b, s, -1).float()

    return forward


def trainer_report(trainer) -> dict[int, dict]:
    """Accuracy of the trainer's model at every ``synthetic.eval_lengths`` entry; logs a line
    per length on rank 0 and returns {length: metrics}."""
    run = trainer.run
    cfg, p = run.synthetic, run.parallel
    if (p.tensor, p.pipeline, p.context) != (1, 1, 1):
        trainer.log("task accuracy: skipped (evaluated only at TP = PP = CP = 1)")
        return {}
    task = cfg.build()
    model = trainer.chunks[0]
    model.eval()
    try:
        result = accuracy_by_length(
            packed_forward(model, trainer.device),
            task,
            cfg.lengths(),
            cfg.eval_examples,
            cfg.eval_batch_size,
            run.train.seed,
        )
    finally:
        model.train()
    if trainer.rank == 0:
        for length, m in result.items():
            extra = "".join(
                f" {k.replace('_', ' ')}: {v:.4f} |"
                for k, v in m.items()
                if k.startswith("accuracy_") and v is not None
            )
            trainer.log(
                f" task accuracy at iteration {trainer.iteration} | task {task.name} | length "
                f"{length} | accuracy: {m['accuracy']:.4f} | sequence accuracy: "
                f"{m['seq_accuracy']:.4f} |{extra}"
            )
    return result
