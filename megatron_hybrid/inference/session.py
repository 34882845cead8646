"""A model + tokenizer, with generation and perplexity evaluation on top of the recurrent-state
decoder (inference/decoder.py). Loading one from a checkpoint is conversion's
(``conversion.saved_checkpoints.load_session``: inference does not read training's files)."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_hybrid.inference.decoder import HybridDecoder
from megatron_hybrid.inference.sampling import SamplingConfig, next_tokens


class GenerateError(ValueError):
    pass


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    prefill_s: float
    decode_s: float
    state_bytes: int


@dataclass
class EvalResult:
    documents: int
    tokens: int
    """Predicted tokens (each document's tokens after its first, including the final EOD)."""
    nll_sum: float
    seconds: float

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


class GenerationSession:
    def __init__(self, model, cfg, tokenizer, where: str, trained_seq_length: int | None = None):
        self.model, self.cfg, self.tokenizer, self.where = model, cfg, tokenizer, where
        self.trained_seq_length = trained_seq_length
        """The checkpoint's training sequence length (run_config.json), if it records one."""
        self.decoder = HybridDecoder(model)
        self.device = next(model.parameters()).device
        self.vocab_size = cfg.vocab_size
        # Rows past the tokenizer's vocabulary are padding (Megatron pads to 128 x TP): never
        # generate them.
        self.usable_vocab = (
            min(tokenizer.vocab_size, cfg.vocab_size) if tokenizer else cfg.vocab_size
        )
        eos = tokenizer.eod if tokenizer is not None else cfg.eos_token_id
        self.eos = eos if eos is not None and 0 <= eos < self.usable_vocab else None

    # ---- text ------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise GenerateError(
                "--prompt needs a tokenizer: the checkpoint records none; give --tokenizer-model"
            )
        ids = self.tokenizer.encode(text)
        if not ids:
            raise GenerateError(f"prompt {text!r} encodes to no tokens")
        return ids

    def decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    # ---- generation ------------------------------------------------------------------------

    def length_warning(self, prompt_tokens: int, max_new_tokens: int) -> str | None:
        """A warning when prompt + new tokens run past what the model was built or trained for.
        Decoding stays exact there (RoPE tables are computed for any position, GDN state has no
        length), but the model never saw such positions/contexts: quality is not to be trusted."""
        total = prompt_tokens + max_new_tokens
        limits = []
        if self.cfg.rope_theta is not None and total > self.cfg.max_position_embeddings:
            limits.append(f"max_position_embeddings {self.cfg.max_position_embeddings}")
        if self.trained_seq_length and total > self.trained_seq_length:
            limits.append(f"the trained sequence length {self.trained_seq_length}")
        if not limits:
            return None
        return (
            f"warning: prompt of {prompt_tokens} tokens + up to {max_new_tokens} new tokens = "
            f"{total} positions, beyond {' and '.join(limits)}: the model was not trained on "
            "such lengths, expect degraded output"
        )

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingConfig, stop_at_eos=True
    ) -> Generation:
        """Prefill the prompt in one chunk, then one token per step from the recurrent state."""
        gen = torch.Generator().manual_seed(sampling.seed)
        state = self.decoder.new_state()
        ids = torch.tensor([prompt_ids], device=self.device)
        t0 = time.perf_counter()
        logits = self.decoder.forward(ids, state)[:, -1]
        self._sync()
        t1 = time.perf_counter()
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits[:, self.usable_vocab :] = float("-inf")
            tok = next_tokens(logits, sampling, gen)
            new.append(int(tok[0]))
            if stop_at_eos and new[-1] == self.eos:
                break
            if len(new) == max_new_tokens:
                break
            logits = self.decoder.forward(tok[:, None], state)[:, -1]
        self._sync()
        return Generation(prompt_ids, new, t1 - t0, time.perf_counter() - t1, state.memory_bytes())

    def generate_and_print(self, prompt_ids, text, max_new_tokens, sampling, stop_at_eos=True):
        g = self.generate(prompt_ids, max_new_tokens, sampling, stop_at_eos)
        shown = text if text is not None else self.decode(prompt_ids)
        print(f"prompt ({len(prompt_ids)} tokens): {shown!r}" if shown is not None else
              f"prompt ids: {','.join(map(str, prompt_ids))}")  # fmt: skip
        out = self.decode(g.new_ids)
        if out is not None:
            print(f"completion: {out}")
        rate = len(g.new_ids) / g.decode_s if g.decode_s > 0 else float("inf")
        print(
            f"prefill {len(prompt_ids)} tokens {g.prefill_s * 1e3:.1f} ms | decode "
            f"{len(g.new_ids)} tokens {rate:.1f} tokens/s | recurrent state + KV cache "
            f"{g.state_bytes / 2**20:.2f} MiB"
        )
        print(f"GENERATED ids={','.join(map(str, g.new_ids))}", flush=True)
        return g

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self, docs: list[list[int]], window: int, progress: bool = False) -> EvalResult:
        """Mean next-token NLL over documents, each read in ``window``-token chunks with the
        recurrent state and KV cache carried across chunks (full-document context)."""
        from tqdm import tqdm

        nll, count, t0 = 0.0, 0, time.perf_counter()
        for ids in tqdm(docs, desc="eval", unit="doc", disable=not progress):
            x = torch.tensor([ids[:-1]], device=self.device)
            y = torch.tensor(ids[1:], device=self.device)
            state = self.decoder.new_state()
            for s in range(0, x.shape[1], window):
                logits = self.decoder.forward(x[:, s : s + window], state)[0]
                nll += F.cross_entropy(logits, y[s : s + window], reduction="sum").item()
            count += y.numel()
        return EvalResult(len(docs), count, nll, time.perf_counter() - t0)

    def read_documents(self, path: str, key: str, max_docs: int | None) -> list[list[int]]:
        """Token ids per document of ``path``: a megatron indexed dataset (prefix, or its .bin/
        .idx; already tokenized), a .jsonl file (one document per line) or any text file."""
        prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
        if os.path.isfile(prefix + ".bin") or os.path.isfile(prefix + ".idx"):
            return self._indexed_documents(prefix, max_docs)
        if not os.path.isfile(path):
            raise GenerateError(f"--eval-file {path}: no such file")
        texts: list[str] = []
        with open(path, encoding="utf-8") as f:
            if path.endswith((".jsonl", ".json")):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        texts.append(json.loads(line)[key])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        what = "not JSON" if isinstance(e, json.JSONDecodeError) else f"no {key!r}"
                        raise GenerateError(f"{path}:{n}: {what} ({e})") from None
                    if max_docs is not None and len(texts) >= max_docs:
                        break
            else:
                texts.append(f.read())
        if self.tokenizer is None:
            raise GenerateError("--eval-file needs a tokenizer: give --tokenizer-model")
        docs = []
        eod = self.tokenizer.eod
        for text in texts:
            ids = self.tokenizer.encode(text) + ([eod] if eod is not None else [])
            if len(ids) >= 2:  # the trainer's documents end with EOD too (preprocess --append-eod)
                docs.append(ids)
        if not docs:
            raise GenerateError(f"--eval-file {path}: no document with at least two tokens")
        return docs

    def _indexed_documents(self, prefix: str, max_docs: int | None) -> list[list[int]]:
        """Sequences of a preprocess_data.py output (one per document, EOD included with
        --append-eod), checked like training data (truncation, ids < vocab)."""
        from megatron_hybrid import mcore
        from megatron_hybrid.data.batches import check_indexed_dataset

        try:
            check_indexed_dataset(prefix, self.vocab_size)
        except (FileNotFoundError, ValueError) as e:
            raise GenerateError(str(e).replace("--data-path", "--eval-file", 1)) from None
        ds = mcore.IndexedDataset(prefix, mmap=True)
        n = len(ds) if max_docs is None else min(len(ds), max_docs)
        docs = [ids for ids in (ds[i].tolist() for i in range(n)) if len(ids) >= 2]
        if not docs:
            raise GenerateError(f"--eval-file {prefix}: no document with at least two tokens")
        return docs

    def evaluate_and_print(self, path, key, window, max_docs, progress=True) -> EvalResult:
        docs = self.read_documents(path, key, max_docs)
        r = self.evaluate(docs, window, progress)
        print(
            f"EVAL documents={r.documents} tokens={r.tokens} loss={r.loss:.6f} "
            f"perplexity={r.perplexity:.4f} ({r.tokens / max(r.seconds, 1e-9):.0f} tokens/s, "
            f"{self.where})",
            flush=True,
        )
        return r

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
