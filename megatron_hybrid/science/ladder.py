"""The scaling ladder: transformer vs 3:1 hybrid at several sizes, loss vs training FLOPs.

Each rung is a normal training run of our trainer (``megatron_hybrid.train``'s command line,
recorded in its result) with ``--save``/``--load`` on its own directory, so a rung that was
stopped (time limit, SIGTERM, a killed job) resumes from its last checkpoint when the ladder is
run again, and a finished rung (``<out>/rungs/<rung>.json``) is skipped. Token counts follow
the compute-optimal rule of thumb: ``tokens_per_param`` x parameters (total, embeddings
included). Validation loss is measured once, at the end, on the same held-out sequences for
every rung; FLOPs are our model's (training/flops.py) times the tokens trained.

The report (science/ladder_report.py, fit in science/fit.py) gives L(C) = a C^-b + e per architecture and the compute multiplier:
how many times the transformer's compute the hybrid needs for the same loss, inverted so
that > 1 means the hybrid is cheaper, at the largest compute both ladders reach (no
extrapolation), with a residual-bootstrap interval.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Rung:
    arch: str
    """transformer | hybrid."""
    index: int
    hidden: int
    depth: int

    @property
    def name(self) -> str:
        return f"{self.arch}_r{self.index}"

    def pattern(self) -> str:
        if self.arch == "transformer":
            return "*-" * self.depth
        return "".join("*-" if i % 4 == 3 else "G-" for i in range(self.depth))


@dataclass
class LadderConfig:
    sizes: list[tuple[int, int]] = field(
        default_factory=lambda: [(256, 4), (384, 8), (512, 8), (768, 12), (1024, 12)]
    )
    """(width, blocks) per rung: ~5 M to ~160 M parameters at a 8k vocabulary."""
    archs: tuple[str, ...] = ("transformer", "hybrid")
    tokens_per_param: float = 20.0
    seq_length: int = 1024
    global_batch_size: int = 64
    micro_batch_size: int | None = None
    """None: per rung, the largest of 64, 32, 16, ... (dividing the global batch) whose memory
    estimate fits ``rung_memory_gib``; 16 when that is unknown. On an H100 a 50 M rung ran
    ~1.8x faster at 64 than at 16 (docs/science.md): these small widths starve the GPU."""
    rung_memory_gib: float | None = None
    """GPU memory one rung may use (the tool: the card's memory over the rungs sharing it)."""
    lr_base: float = 3e-3
    """Peak LR at width 256; scaled by (256 / width)^0.5."""
    eval_iters: int = 20
    """Validation batches at the end of every rung (the same sequences for all rungs)."""
    head_dim: int = 64
    gdn_head_k_dim: int = 64
    gdn_head_v_dim: int = 128
    rope_theta: float | None = 10_000.0
    seed: int = 1234
    saves_per_rung: int = 10
    """Checkpoints per rung (resume granularity)."""
    exit_interval: int | None = None
    """Stop every rung at a multiple of this many steps (saved; the next run resumes)."""

    def rungs(self) -> list[Rung]:
        return [Rung(a, i + 1, d, n) for a in self.archs for i, (d, n) in enumerate(self.sizes)]

    def lr(self, rung: Rung) -> float:
        return self.lr_base * (256 / rung.hidden) ** 0.5


def model_overrides(cfg: LadderConfig, rung: Rung) -> list[str]:
    d = rung.hidden
    heads = max(1, d // cfg.head_dim)
    gdn_heads = max(1, round(0.75 * d / cfg.gdn_head_k_dim))  # Olmo: key width 0.75 d
    mlp = 64 * math.ceil(8 * d / 3 / 64)
    return [
        f"model.hidden_size={d}",
        f"model.num_attention_heads={heads}",
        f"model.num_key_value_heads={heads}",
        f"model.gdn_num_heads={gdn_heads}",
        f"model.gdn_head_k_dim={cfg.gdn_head_k_dim}",
        f"model.gdn_head_v_dim={cfg.gdn_head_v_dim}",
        f"model.intermediate_size={mlp}",
        f"model.rope_theta={cfg.rope_theta}",
        f"model.max_position_embeddings={max(cfg.seq_length, 4096)}",
    ]


# Measured on the H100 (2026-12-06, mbs 64): processes held 1.23x the estimate plus ~1 GiB
# (CUDA context, allocator slack); the choice keeps that much room.
_ESTIMATE_SLACK, _CONTEXT_GIB = 1.25, 1.0


def micro_batch_for(cfg: LadderConfig, rung: Rung, data: dict) -> int:
    """The micro-batch a rung trains with (``LadderConfig.micro_batch_size``)."""
    if cfg.micro_batch_size:
        return min(cfg.micro_batch_size, cfg.global_batch_size)
    if not cfg.rung_memory_gib:
        return min(16, cfg.global_batch_size)
    from megatron_hybrid.training.memory import FIT_FRACTION

    tried = [m for m in (64, 32, 16, 8, 4, 2, 1) if cfg.global_batch_size % m == 0]
    for mbs in tried:
        if padded_need_gib(rung_estimate_gib(cfg, rung, data, mbs)) <= (
            FIT_FRACTION * cfg.rung_memory_gib
        ):
            return mbs
    return tried[-1]


def rung_estimate_gib(cfg: LadderConfig, rung: Rung, data: dict, micro_batch: int) -> float:
    """training/memory.py's estimate of the rung's max allocated memory at ``micro_batch``."""
    from megatron_hybrid.training.cli import parse
    from megatron_hybrid.training.loop import resolve_vocab
    from megatron_hybrid.training.memory import GIB, estimate

    run, _ = parse(rung_argv(cfg, rung, data, 1, "/nonexistent", micro_batch=micro_batch))
    _, vocab, _ = resolve_vocab(run, 1)
    return estimate(replace(run, model=run.model.replace(vocab_size=vocab)), 1).total / GIB


def padded_need_gib(estimate_gib: float) -> float:
    """What a rung process holds on the card for that estimate (measured pad, above)."""
    return estimate_gib * _ESTIMATE_SLACK + _CONTEXT_GIB


def rung_argv(
    cfg: LadderConfig, rung: Rung, data: dict, train_iters: int, save: str, micro_batch=None
) -> list[str]:
    lr = cfg.lr(rung)
    micro_batch = micro_batch or min(cfg.micro_batch_size or 16, cfg.global_batch_size)
    argv = [
        "--preset", "tiny",
        "--hybrid-layer-pattern", rung.pattern(),
        "--data-path", data["prefix"],
        "--split", data.get("split", "98,2,0"),
        "--tokenizer-type", data["tokenizer_type"],
        "--tokenizer-model", data["tokenizer_model"],
        "--seq-length", str(cfg.seq_length),
        "--global-batch-size", str(cfg.global_batch_size),
        "--micro-batch-size", str(micro_batch),
        "--train-iters", str(train_iters),
        "--lr", f"{lr:.6g}",
        "--min-lr", f"{lr / 10:.6g}",
        "--lr-warmup-iters", str(max(1, train_iters // 20)),
        "--eval-interval", str(train_iters),
        "--eval-iters", str(cfg.eval_iters),
        "--log-interval", str(max(1, train_iters // 20)),
        "--save", save,
        "--load", save,
        "--save-interval", str(max(1, train_iters // cfg.saves_per_rung)),
        "--keep-last-checkpoints", "1",  # a rung only ever resumes from its newest
        "--seed", str(cfg.seed),
        *model_overrides(cfg, rung),
    ]  # fmt: skip
    if data.get("cache_dir"):
        argv += ["--data-cache-path", data["cache_dir"]]
    if cfg.exit_interval:
        argv += ["--exit-interval", str(cfg.exit_interval)]
    return argv


def rung_plan(cfg: LadderConfig, rung: Rung, data: dict, out: str) -> dict:
    """Parameters, tokens, steps and FLOPs of one rung (no model is built)."""
    from megatron_hybrid.training.cli import parse
    from megatron_hybrid.training.flops import flops_per_token
    from megatron_hybrid.training.loop import resolve_vocab

    save = os.path.join(out, "rungs", rung.name)
    mbs = micro_batch_for(cfg, rung, data)
    run, _ = parse(rung_argv(cfg, rung, data, 1, save, micro_batch=mbs))
    _, vocab, _ = resolve_vocab(run, 1)
    model = run.model.replace(vocab_size=vocab)
    params = model.num_params()
    tokens_per_step = cfg.global_batch_size * cfg.seq_length
    iters = max(2, math.ceil(cfg.tokens_per_param * params / tokens_per_step))
    fpt = flops_per_token(model, cfg.seq_length)["total"]
    emb = model.num_params_by_type()
    return {
        "name": rung.name,
        "arch": rung.arch,
        "index": rung.index,
        "hidden": rung.hidden,
        "depth": rung.depth,
        "pattern": rung.pattern(),
        "params": params,
        "params_non_embedding": params - emb["embedding"] - emb["output_layer"],
        "train_iters": iters,
        "micro_batch": mbs,
        "tokens": iters * tokens_per_step,
        "flops_per_token": fpt,
        "flops": fpt * iters * tokens_per_step,
        "corpus": data.get("fingerprint"),
        "argv": rung_argv(cfg, rung, data, iters, save, micro_batch=mbs),
    }


def check_finished_rungs(plans: list[dict], out: str) -> None:
    """Refuse to mix corpora: a finished rung recorded with another corpus fingerprint than
    this run's data would be skipped and then fitted next to rungs it does not compare with."""
    wrong = []
    for p in plans:
        path = os.path.join(out, "rungs", p["name"] + ".json")
        if not (p.get("corpus") and os.path.isfile(path)):
            continue
        with open(path) as f:
            had = json.load(f).get("corpus")
        if had and had != p["corpus"]:
            wrong.append(f"{p['name']} ({had})")
    if wrong:
        raise RuntimeError(
            f"finished rungs in {out}/rungs were trained on another corpus than this run's "
            f"(fingerprint {plans[0]['corpus']}): {', '.join(wrong)}. Use their data again "
            "(--data-path/--tokenizer-model), or a new --out, or move those rungs aside"
        )


_VAL = " validation loss at iteration "


def _val_loss(lines, iteration: int) -> float | None:
    for line in reversed(lines):
        if line.startswith(_VAL + f"{iteration} |"):
            return float(line.split("lm loss value: ")[1].split(" ")[0])
    return None


def run_rung(plan: dict, out: str, deadline: float | None, log=print,
             stop_flag: list | None = None) -> dict | None:  # fmt: skip
    """Train (or resume) one rung in this process; its result, or None if it stopped early
    (``deadline`` passed, a SIGTERM/SIGUSR1 (the trainer saves first), or --exit-interval).
    A signal that came during setup (in ``stop_flag``) is handed on to the trainer."""
    from megatron_hybrid.parallel import state
    from megatron_hybrid.training.cli import parse
    from megatron_hybrid.training.loop import Trainer

    rdir = os.path.join(out, "rungs")
    log_path = os.path.join(rdir, plan["name"] + ".log")
    lines: list[str] = []
    if os.path.isfile(log_path):
        with open(log_path) as f:
            lines = f.read().splitlines()
    run, _ = parse(plan["argv"])
    t0 = time.time()
    timer = None
    with open(log_path, "a") as logf:

        def tlog(line: str) -> None:
            lines.append(line)
            logf.write(line + "\n")
            logf.flush()

        try:
            trainer = Trainer(run, log=tlog).setup()
            if stop_flag:
                trainer.stop_signal = stop_flag[0]
            if deadline is not None:
                # at the deadline the trainer saves at the next step boundary and returns
                timer = threading.Timer(
                    max(0.0, deadline - time.time()),
                    lambda: setattr(trainer, "stop_signal", "time limit"),
                )
                timer.daemon = True
                timer.start()
            trainer.train()
            done = trainer.iteration >= plan["train_iters"]
            val = _val_loss(lines, plan["train_iters"]) if done else None
            if done and val is None:  # finished earlier, result not recorded: measure now
                val = trainer.evaluate()
        finally:
            if timer is not None:
                timer.cancel()
            state.destroy()
    if not done:
        log(
            f"[ladder] {plan['name']}: stopped at iteration {trainer.iteration}/{plan['train_iters']} (saved; rerun resumes)"
        )
        return None
    result = {**plan, "val_loss": val, "seconds_last_sitting": round(time.time() - t0, 1)}
    path = os.path.join(rdir, plan["name"] + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


def corpus_fingerprint(data: dict) -> str:
    """A cheap identity of a tokenized corpus: sha256 of its .idx (every document's length and
    offset), its .bin size and the tokenizer file. Rungs compare only on the same corpus."""
    import hashlib

    h = hashlib.sha256()
    prefix = data["prefix"]
    with open(prefix + ".idx", "rb") as f:
        h.update(f.read())
    h.update(str(os.path.getsize(prefix + ".bin")).encode())
    tok = data.get("tokenizer_model")
    if tok and os.path.isfile(tok):
        with open(tok, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def prepare_demo_corpus(out: str, max_mb: float, vocab: int, site_packages: bool,
                        log=print) -> dict:  # fmt: skip
    """The demo corpus (python sources of this machine), its tokenizer and indexed dataset,
    built once under ``<out>/corpus`` (a lock keeps concurrent array tasks from racing).

    Another machine (a later GPU sitting) rebuilds it from its own files: carry
    ``corpus/corpus.json`` and ``corpus/tokenizer.model`` there with the finished rungs'
    JSON; the tokenizer is then reused, not retrained, and the rebuilt corpus must have the
    recorded fingerprint, else this stops (rungs on different data do not compare)."""
    import fcntl

    from megatron_hybrid.data.demo_corpus import build_stdlib_corpus, tokenize_corpus
    from megatron_hybrid.data.tokenizer_training import train_sentencepiece

    cdir = os.path.join(out, "corpus")
    os.makedirs(cdir, exist_ok=True)
    done = os.path.join(cdir, "corpus.json")
    with open(os.path.join(cdir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recorded = None
        if os.path.isfile(done):
            with open(done) as f:
                recorded = json.load(f)
            if os.path.isfile(recorded["prefix"] + ".bin"):
                if "fingerprint" not in recorded:  # built before fingerprints: record it now
                    recorded["fingerprint"] = corpus_fingerprint(recorded)
                    with open(done, "w") as f:
                        json.dump(recorded, f, indent=1)
                return recorded
        jsonl = os.path.join(cdir, "corpus.jsonl")
        info = build_stdlib_corpus(jsonl, max_bytes=int(max_mb * 1e6), site_packages=site_packages)
        log(f"[ladder] corpus: {info['documents']} files, {info['bytes'] / 1e6:.1f} MB")
        tok = os.path.join(cdir, "tokenizer.model")
        if os.path.isfile(tok):
            log(f"[ladder] tokenizer: {tok} (kept, not retrained)")
        else:
            tok = train_sentencepiece([jsonl], os.path.join(cdir, "tokenizer"), vocab_size=vocab)
        summary = tokenize_corpus(jsonl, os.path.join(cdir, "corpus"), tok, max_workers=16)
        log(f"[ladder] preprocessed: {summary.documents} documents, {summary.tokens:,} tokens")
        meta = {
            "prefix": summary.outputs[0],
            "tokenizer_type": "SentencePieceTokenizer",
            "tokenizer_model": tok,
            "tokens": summary.tokens,
            "documents": summary.documents,
            "cache_dir": os.path.join(cdir, "index_cache"),
        }
        meta["fingerprint"] = corpus_fingerprint(meta)
        if recorded and recorded.get("fingerprint") not in (None, meta["fingerprint"]):
            raise RuntimeError(
                f"the corpus built here ({meta['tokens']:,} tokens, fingerprint "
                f"{meta['fingerprint']}) differs from the one recorded in {done} "
                f"({recorded.get('tokens')} tokens, fingerprint {recorded['fingerprint']}), "
                "which the finished rungs were trained on: their losses would not compare. "
                "Build on a machine with the same Python files, pass --data-path/--tokenizer-model "
                "of the original corpus, or start a new --out"
            )
        with open(done, "w") as f:
            json.dump(meta, f, indent=1)
        return meta
