"""The pretraining loop on megatron-core: schedules, DDP, optimizer, checkpoints, logs.

Everything a step does, in order: every rank takes its micro-batches of the global batch (the
sample order depends only on seed and global batch size), megatron's forward-backward schedule
runs them (pipeline-aware), ``finalize_model_grads`` reduces gradients, non-finite
loss/gradients skip the update, the division by the global token count and the clip scale the
gradients in one pass (training/optimizer_step.py), the optimizer steps, the LR schedule
advances, and one Megatron iteration line is printed.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from megatron_hybrid import mcore
from megatron_hybrid.data import batches
from megatron_hybrid.data.tokenizers import build_tokenizer, padded_vocab_size
from megatron_hybrid.layers.output_loss import deferred_logits, output_layer_of
from megatron_hybrid.models.olmo_hybrid.config import ConfigError
from megatron_hybrid.parallel import context as cpctx
from megatron_hybrid.parallel import state as pstate
from megatron_hybrid.training import checkpoint as ckpt
from megatron_hybrid.training.faults import fault_iterations as _fault_iterations
from megatron_hybrid.training.flops import device_peak_tflops, flops_per_token
from megatron_hybrid.training.helper_processes import checkpoint_writer_helper_init
from megatron_hybrid.training.loss import masked_lm_head_loss, masked_lm_loss
from megatron_hybrid.training.metrics import IntervalMeter, Sinks, iteration_line, memory_line
from megatron_hybrid.training.model_setup import (
    build_model_chunks,
    build_optimizer,
    transformer_config,
)
from megatron_hybrid.training.optimizer_step import finalize_grads_unscaled, step_if_finite
from megatron_hybrid.training.preflight import check_context_parallel, check_fp8_environment


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many consecutive NaN steps); message says why."""


def resolve_vocab(run, world_tp: int):
    """Tokenizer (or None) and the model's vocabulary size, following Megatron's padding rule."""
    d = run.data
    tok = build_tokenizer(d.tokenizer_type, d.tokenizer_model) if d.tokenizer_type else None
    if d.vocab_size:
        vocab = d.vocab_size
    elif run.synthetic.task:  # the generated task's own small vocabulary (+ an unused EOD)
        from megatron_hybrid.data.synthetic import task_vocab_size

        vocab = padded_vocab_size(
            task_vocab_size(run.synthetic), d.make_vocab_size_divisible_by, world_tp
        )
    elif tok is not None:
        vocab = padded_vocab_size(tok.vocab_size, d.make_vocab_size_divisible_by, world_tp)
    else:
        vocab = run.model.vocab_size
    if tok is not None and vocab < tok.vocab_size:
        raise ConfigError(f"vocab_size={vocab} is smaller than the tokenizer's {tok.vocab_size}")
    eod = tok.eod if tok is not None else vocab - 1
    return tok, vocab, eod


class Trainer:
    def __init__(self, run, log=print):
        self.run, self.log = run, log
        self.stop_signal = None
        self.stop_agreed = False
        self._nan_faults = _fault_iterations("nan_loss")
        self._kill_faults = _fault_iterations("sigkill_at")

    # ---- setup -------------------------------------------------------------------------------
    def setup(self):
        run = self.run
        p = run.parallel
        self._install_signal_handlers()
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        run.validate(world)
        check_context_parallel(run)
        check_fp8_environment(run)
        ckpt.check_save_target(run.train.save)  # not after the first interval
        tok, vocab, self.eod = resolve_vocab(run, p.tensor)
        self.tokenizer = tok
        if vocab != run.model.vocab_size:
            run.model = run.model.replace(vocab_size=vocab)
        if run.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # TE's fused attention picks deterministic kernels only when told, and megatron's
            # deterministic_mode refuses to build TE attention without it (found on the H100)
            os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
        pstate.initialize(
            pstate.ParallelLayout(
                p.tensor, p.pipeline, p.virtual_pipeline, p.context, p.sequence_parallel
            ),
            seed=run.train.seed,
        )
        ps = mcore.parallel_state
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.cp_group = ps.get_context_parallel_group()
        self.cp_rank, self.cp_size = ps.get_context_parallel_rank(), p.context
        self.tcfg = transformer_config(run)
        self.chunks, self.flavour = build_model_chunks(run, self.tcfg)
        self.optimizer, self.scheduler = build_optimizer(run, self.tcfg, self.chunks)
        c = self.tcfg
        c.finalize_model_grads_func = finalize_grads_unscaled  # 1/tokens: in the step
        c.grad_scale_func = self.optimizer.scale_loss
        no_sync = [m.no_sync for m in self.chunks]
        c.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        self.forward_backward = mcore.get_forward_backward_func()
        t = run.train
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.iteration, self.consumed = 0, 0
        self.skipped = self.nan_total = self.nan_consecutive = 0
        st = None
        if t.load:
            log = self.log if self.rank == 0 else (lambda _s: None)
            st = ckpt.load_for_training(run, self.chunks, self.optimizer, self.scheduler, log)
        if st is not None:
            self.iteration = st["iteration"]
            self.consumed = st["consumed_samples"]
            self.skipped, self.nan_total = st.get("skipped", 0), st.get("nan_iterations", 0)
        self.num_microbatches = self._current_batch()[1]  # of the first step (banner)
        eval_steps = (t.train_iters // t.eval_interval + 1) if t.eval_interval else 0
        # sized by what the rest of the run reads from the consumed count on (a resume with
        # another batch size or a ramp reads exactly that many more samples)
        train_samples = batches.samples_after_steps(
            t.train_iters - self.iteration, t.global_batch_size, t.rampup_batch_size, self.consumed
        )
        self.train_ds, self.valid_ds = batches.build_datasets(
            run.data,
            t.seed,
            train_samples,
            max(eval_steps, 1) * t.eval_iters * t.global_batch_size,
            vocab,
            self.eod,
            with_valid=bool(t.eval_interval),
            synthetic=run.synthetic,
        )
        self.task_metrics = {}  # --synthetic-task: {length: accuracies} of the last evaluation
        self.flops = flops_per_token(run.model, run.data.seq_length)
        self.peak = device_peak_tflops()
        self.sinks = Sinks(
            t.tensorboard_dir, t.wandb_project, run.to_dict(), enabled=self.rank == self.world - 1
        )
        return self

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGUSR1 -> save at the next step boundary and exit (Slurm time limits,
        preemption, requeue). Installed first thing, so a signal during setup is not lost.

        megatron's checkpoint writer keeps a helper process (a multiprocessing Manager) that
        would die from the same SIGTERM and break the very save the signal asks for. It is
        started here, ignoring both signals and dying with this rank whatever ends the rank
        (training/helper_processes.py), also when signals are left alone."""
        mcore.start_write_results_queue(checkpoint_writer_helper_init, (os.getpid(),))
        if not self.run.train.exit_on_signal:
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        self.stop_signal = signum

    # ---- one step ----------------------------------------------------------------------------
    def _current_batch(self) -> tuple[int, int]:
        """(global batch size, micro-batches per DP rank) of the next step (--rampup-batch-size)."""
        t = self.run.train
        gbs = batches.global_batch_size_at(self.consumed, t.global_batch_size, t.rampup_batch_size)
        return gbs, gbs // (t.micro_batch_size * self.dp_size)

    def _microbatches(self, dataset, consumed: int, global_batch: int):
        t = self.run.train
        idx = batches.global_batch_indices(
            consumed, global_batch, self.dp_rank, self.dp_size, t.micro_batch_size
        )
        return [
            batches.collate([dataset[i] for i in mb], self.eod, self.run.data.document_masking)
            for mb in idx
        ]

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        dev = self.device
        tokens = batch["tokens"].to(dev)
        labels = batch["labels"].to(dev)
        loss_mask = batch["loss_mask"].to(dev)
        n = tokens.shape[1]
        cu_seqlens = batch["cu_seqlens"].to(dev)
        if self.cp_size > 1:
            # this CP rank's zigzag share (chunks r and 2c-1-r of 2c); document starts stay global
            # (the layers pass GDN state / gather KV across ranks); the loss is this rank's
            # token sum, and megatron sums gradients and token counts over DP x CP.
            tokens, labels, loss_mask = (
                cpctx.split_for_rank(x, self.cp_rank, self.cp_size)
                for x in (tokens, labels, loss_mask)
            )
            psp = cpctx.context_parallel_params(cu_seqlens, n, self.cp_group)
            pos = psp.positions.unsqueeze(0)
        else:
            pos = torch.arange(n, device=dev).unsqueeze(0)
            psp = batches.packed_seq_params(cu_seqlens, n)
        # bf16 logits go to the loss as they are: megatron's Float16Module would otherwise
        # upcast the [tokens, vocab] output to fp32 (a copy the loss kernel does not need)
        extra = {"fp32_output": False} if self.tcfg.bf16 else {}
        output = model(tokens, pos, None, packed_seq_params=psp, **extra)
        z_coeff = self.run.optim.z_loss
        tp_group = mcore.parallel_state.get_tensor_model_parallel_group()

        nan = self.iteration + 1 in self._nan_faults
        chunk = self.run.train.lm_head_loss_chunk_tokens
        if chunk:
            # the output layer handed back the final hidden states (deferred_logits): the head
            # and the loss run fused, chunked over tokens (layers/output_loss.py)
            def loss_func(hidden_bsD):  # last pipeline stage only: it has the output layer
                return masked_lm_head_loss(
                    hidden_bsD,
                    output_layer_of(model).weight,
                    labels,
                    loss_mask,
                    z_coeff,
                    tp_group,
                    sequence_parallel=self.tcfg.sequence_parallel,
                    chunk_tokens=chunk,
                    nan=nan,
                )
        else:

            def loss_func(logits_bsV):
                return masked_lm_loss(logits_bsV, labels, loss_mask, z_coeff, tp_group, nan=nan)

        return output, loss_func

    def _run_schedule(self, microbatches, forward_only: bool):
        iters = [iter(microbatches) for _ in self.chunks]
        t = self.run.train
        fused_head = deferred_logits(self.chunks) if t.lm_head_loss_chunk_tokens else nullcontext()
        with fused_head:
            return self.forward_backward(
                forward_step_func=self._forward_step,
                data_iterator=iters if len(iters) > 1 else iters[0],
                model=self.chunks,
                num_microbatches=len(microbatches),
                seq_length=t.micro_batch_size * self.run.data.seq_length,
                micro_batch_size=1,
                forward_only=forward_only,
            )

    def _reduce_report(self, store, stop_flag: bool = False) -> torch.Tensor:
        """``[ce_sum, z_sum, tokens, stop]`` over the global batch, on the device, the same on
        every rank (no host sync: the optimizer step brings it over with the grad norm). Every
        CP rank holds different tokens, so all of them report (one TP rank, the last PP stage);
        ``stop`` counts ranks that received a stop signal."""
        ps = mcore.parallel_state
        total = torch.zeros(4, dtype=torch.float64, device=self.device)
        is_reporter = (
            ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0
        )
        if is_reporter and store:
            total[:3] = torch.stack([item["sums"].detach() for item in store]).double().sum(0)
        if stop_flag:
            total[3] = 1.0
        dist.all_reduce(total)
        return total

    def train_step(self):
        for m in self.chunks:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        gbs, self.num_microbatches = self._current_batch()
        mbs = self._microbatches(self.train_ds, self.consumed, gbs)
        if os.environ.get("MEGATRON_HYBRID_TRACE_SAMPLES"):  # test hook: which samples a step reads
            mine = batches.global_batch_indices(
                self.consumed, gbs, self.dp_rank, self.dp_size, self.run.train.micro_batch_size
            )
            self.log(
                f"samples of iteration {self.iteration + 1} on DP rank {self.dp_rank}: "
                f"{','.join(str(i) for mb in mine for i in mb)}"
            )
        store = self._run_schedule(mbs, forward_only=False)
        report = self._reduce_report(store, stop_flag=self.stop_signal is not None)
        # one host sync per step: grad norm + loss report; NaN/inf in either skips the update
        ok, grad_norm, sums = step_if_finite(self.optimizer, report, self.run.optim.clip_grad)
        # stop only on what every rank saw in the same report (a signal that lands on one rank
        # after its report went out is shared in the next step's report)
        if sums[3].item():
            self.stop_agreed = True
            self.stop_signal = self.stop_signal or "peer"
        self.scheduler.step(increment=gbs)  # the schedule counts samples
        return sums, ok, grad_norm, gbs

    def evaluate(self):
        t = self.run.train
        for m in self.chunks:
            m.eval()
        total = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for step in range(t.eval_iters):
                # eval always reads the same validation samples: step s = [sG, (s+1)G)
                gbs = t.global_batch_size
                store = self._run_schedule(self._microbatches(self.valid_ds, step * gbs, gbs), True)
                total += self._reduce_report(store)[:3].cpu()
        for m in self.chunks:
            m.train()
        return total[0].item() / max(total[2].item(), 1.0)

    # ---- the loop ----------------------------------------------------------------------------
    def train(self):
        run, t = self.run, self.run.train
        if self.rank == 0:
            self.log(banner(self))
        meter = IntervalMeter(self.iteration)
        memory_reported = False
        for m in self.chunks:
            m.train()
        while self.iteration < t.train_iters:
            lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses
            sums, ok, grad_norm, gbs = self.train_step()
            self.iteration += 1
            self.consumed += gbs
            if ok:
                self.nan_consecutive = 0
            else:
                self.skipped += 1
                self.nan_total += 1
                self.nan_consecutive += 1
            n_tokens = max(sums[2].item(), 1.0)
            step_losses = {
                "lm loss": sums[0].item() / n_tokens,
                "z loss": sums[1].item() / n_tokens,
            }
            meter.add(step_losses, applied=ok)
            if self.iteration % t.log_interval == 0 or self.iteration == t.train_iters:
                dt, losses = meter.take(self.iteration, step_losses)
                lm_loss = losses["lm loss"]
                tok_s_gpu = gbs * run.data.seq_length / dt / self.world
                tflops = self.flops["total"] * tok_s_gpu / 1e12
                mfu = 100.0 * tflops / self.peak if self.peak else None
                line = iteration_line(
                    iteration=self.iteration,
                    train_iters=t.train_iters,
                    consumed=self.consumed,
                    elapsed_ms=dt * 1000.0,
                    tflops=tflops,
                    lr=lr,
                    global_batch=gbs,
                    losses=losses,
                    loss_scale=1.0,
                    grad_norm=grad_norm,
                    skipped=self.skipped,
                    nan_iters=self.nan_total,
                    tokens_per_gpu_s=tok_s_gpu,
                    mfu=mfu,
                )
                if self.rank == 0:
                    self.log(line)
                    if not memory_reported:  # once: the peak after the first full steps
                        memory_reported = True
                        mem = memory_line(self.iteration)  # None without CUDA
                        if mem:
                            self.log(mem)
                self.sinks.log(
                    self.iteration,
                    {
                        "lm loss": lm_loss,
                        "learning-rate": lr,
                        "grad-norm": grad_norm,
                        "throughput": tflops,
                        "tokens-per-sec-per-gpu": tok_s_gpu,
                        **({"mfu": mfu} if mfu is not None else {}),
                    },
                )
            if self.iteration in self._kill_faults and self.rank == 0:
                os.killpg(os.getpgid(0), signal.SIGKILL)  # test hook: hard crash, no cleanup
            if self.nan_consecutive >= t.max_consecutive_nan:
                raise TrainingStopped(
                    f"stopping: {self.nan_consecutive} consecutive iterations with NaN/inf loss or "
                    f"gradients (last at iteration {self.iteration}); lower the LR or check data"
                )
            paused = time.monotonic()  # eval and saves are left out of the next line's timing
            if t.eval_interval and self.iteration % t.eval_interval == 0:
                val = self.evaluate()
                if self.rank == 0:
                    self.log(
                        f" validation loss at iteration {self.iteration} | lm loss value: "
                        f"{val:.6E} | lm loss PPL: {math.exp(min(val, 50)):.6E} |"
                    )
                self.sinks.log(self.iteration, {"lm loss validation": val})
                if run.synthetic.task:
                    from megatron_hybrid.training.task_accuracy import trainer_report

                    self.task_metrics = trainer_report(self)
            if t.save and t.save_interval and self.iteration % t.save_interval == 0:
                self.save()
            meter.pause(time.monotonic() - paused)
            if t.exit_interval and self.iteration % t.exit_interval == 0:
                if t.save and not (t.save_interval and self.iteration % t.save_interval == 0):
                    self.save()
                self.log(
                    f"exiting at iteration {self.iteration} (--exit-interval {t.exit_interval})"
                )
                self.sinks.close()
                return self.iteration
            if self.stop_agreed:
                if t.save:
                    self.save()
                self.log(
                    f"rank {self.rank}: stopped by signal {self.stop_signal} at iteration "
                    f"{self.iteration}"
                )
                return self.iteration
        if t.save and not (t.save_interval and self.iteration % t.save_interval == 0):
            self.save()
        self.sinks.close()
        return self.iteration

    def save(self):
        t = self.run.train
        path = ckpt.save_checkpoint(
            t.save,
            self.iteration,
            self.chunks,
            self.optimizer,
            self.scheduler,
            self.run.to_dict(),
            {
                "consumed_samples": self.consumed,
                "skipped": self.skipped,
                "nan_iterations": self.nan_total,
            },
        )
        if self.rank == 0:
            self.log(f"saved checkpoint at iteration {self.iteration} to {path}")
        if t.keep_last_checkpoints:
            ckpt.prune_checkpoints(t.save, t.keep_last_checkpoints)


def banner(tr: Trainer) -> str:
    from megatron_hybrid.training.report import describe

    return describe(tr.run, tr.world, flavour=tr.flavour, num_microbatches=tr.num_microbatches)
