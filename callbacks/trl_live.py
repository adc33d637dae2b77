"""The live entropy probe on TRL's ``GRPOTrainer``: a thin adapter of :class:`probe.live.LiveProbe`.

Attach it to a trainer before ``train()``::

    from callbacks.trl_live import TRLEntropyProbe
    TRLEntropyProbe.attach(trainer, LiveProbeSettings(every_n_steps=10))
    trainer.train()

At every probed optimizer step (docs/DESIGN.md section 6, "A live step"):

* while the step's micro-batches are computed, the probe keeps each one as TRL built it (the ``inputs`` of
  ``compute_loss``: prompt and completion ids and masks, advantages, old log-probs, ``num_items_in_batch``), and
  after the window's last backward the pre-clip gradient norm (the one ``clip_grad_norm_`` is about to compute);
* in ``on_pre_optimizer_step`` (gradients all-reduced and clipped), it gathers the step's U from every process,
  gives it TRL's loss as probe's (:class:`probe.trl_loss.TRLLoss`, with the normalisers of the whole step across
  micro-batches and processes), reconstructs the step from the real gradients and predicts its entropy change on a
  fresh evaluation batch, with the attribution to U's sequences;
* in ``on_step_end`` it verifies that the parameters moved as reconstructed and measures the realised change on
  fresh samples; rank 0 writes ``records.jsonl`` (the records of ``callbacks.live.LiveEntropyProbe``) into
  ``<output_dir>/live_probe`` and logs the metrics through the trainer's ``report_to`` (W&B when enabled) under
  ``probe/...``.

Probing does not change training: the probe samples with its own generators, never writes ``.grad`` or the
parameters, and restores the policy's mode (``tests/test_trl_live.py`` trains with and without it and compares the
parameters bitwise). What it does not reproduce is refused by name: when it is attached, the loss options
:class:`probe.trl_loss.TRLLoss` refuses, DeepSpeed and FSDP; at the first probed step, optimizers other than torch's
Adam/AdamW, per-token advantages and multimodal inputs.

U's ``index`` orders the step's sequences by process, then micro-batch, then row; ``group`` is the prompt text
(TRL shuffles a generation batch, so a group is its prompt).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from probe.batch import SequenceBatch
from probe.live import GradientHandling, LiveProbe, LiveProbeSettings, Processes
from probe.live_contract import ProbedStep
from probe.trl_loss import TRLLoss, trl_sequence_batch

KEPT = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "tool_mask",
    "advantages",
    "old_per_token_logps",
)
KNOWN = (*KEPT, "num_items_in_batch", "sampling_per_token_logps", "importance_sampling_ratio")


class TRLEntropyProbe(TrainerCallback):
    """The live probe of a TRL ``GRPOTrainer`` run (module docstring); made by :meth:`attach`."""

    def __init__(self, trainer: Any, settings: LiveProbeSettings, run_dir: str | Path = ""):
        """
        Args:
            trainer: the ``GRPOTrainer`` (not trained yet).
            settings: what to probe and how (:class:`probe.live.LiveProbeSettings`).
            run_dir: where rank 0 writes; empty: ``<output_dir>/live_probe``.
        """
        if not (hasattr(trainer, "_compute_loss") and hasattr(trainer.args, "loss_type")):
            raise TypeError(
                f"TRLEntropyProbe attaches to TRL's GRPOTrainer, got {type(trainer).__name__}. Fix: attach it to a "
                "GRPOTrainer (a Lightning fit takes callbacks.live.LiveEntropyProbe)"
            )
        accelerator = trainer.accelerator
        kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
        if kind.upper() in ("DEEPSPEED", "FSDP"):
            raise ValueError(
                f"TRLEntropyProbe does not follow a {kind} run's sharded optimizer state. Fix: probe a DDP or "
                "single-process run, or probe its saved checkpoints offline (python -m probe predict)"
            )
        self.trainer = trainer
        self.loss = TRLLoss.from_trainer_args(trainer.args, num_processes=accelerator.num_processes)
        self.loss.loss_config()  # refuses, by name, what is not reproduced
        processes = Processes(rank=accelerator.process_index, world_size=accelerator.num_processes)
        directory = Path(run_dir).expanduser() if run_dir else Path(trainer.args.output_dir) / "live_probe"
        self.probe = LiveProbe(settings, processes, directory, "TRLEntropyProbe's settings.eval")
        self.settings = settings
        # the probed step's micro-batches as TRL built them (on CPU), each with its num_items_in_batch
        self._micro_batches: list[tuple[SequenceBatch, int]] = []
        self._accumulation = 0
        self._grad_norm: torch.Tensor | None = None
        self._capture()

    @classmethod
    def attach(
        cls, trainer: Any, settings: LiveProbeSettings | None = None, run_dir: str | Path = ""
    ) -> "TRLEntropyProbe":
        """Attach the probe to ``trainer`` (a ``GRPOTrainer``, before ``train()``); returns it."""
        probe = cls(trainer, settings or LiveProbeSettings(), run_dir)
        trainer.add_callback(probe)
        return probe

    @property
    def records(self) -> list[dict]:
        """The probed steps' records (rank 0: full records; other ranks: their verification only)."""
        return self.probe.records

    # ---- capture: the step's micro-batches and its pre-clip gradient norm ----------------------
    def _probing(self) -> bool:
        return self.trainer.model.training and self.settings.is_probed(int(self.trainer.state.global_step))

    def _capture(self) -> None:
        """Wrap the trainer's ``compute_loss`` (keeps each micro-batch of a probed step) and ``training_step``
        (after a probed window's last backward: the pre-clip norm), on this trainer instance only."""
        trainer = self.trainer
        compute_loss, training_step = trainer.compute_loss, trainer.training_step

        def capturing_compute_loss(model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
            if self._probing():
                self._keep(inputs)
            return compute_loss(model, inputs, *args, **kwargs)

        def capturing_training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = training_step(model, inputs, *args, **kwargs)
            if self._probing() and trainer.accelerator.sync_gradients and (trainer.args.max_grad_norm or 0) > 0:
                # the norm clip_grad_norm_ computes next, over the same gradients, by the same function
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                self._grad_norm = torch.nn.utils.get_total_norm(grads, 2.0)
            return loss

        trainer.compute_loss, trainer.training_step = capturing_compute_loss, capturing_training_step

    def _keep(self, inputs: dict[str, Any]) -> None:
        unknown = sorted(k for k in inputs if k not in KNOWN)
        if unknown:
            raise ValueError(
                f"TRLEntropyProbe: the micro-batch carries {', '.join(unknown)}, which probe's loss does not "
                "reproduce (multimodal or custom inputs). Fix: detach the probe from this run"
            )
        if torch.as_tensor(inputs["advantages"]).dim() != 1:
            raise ValueError("TRLEntropyProbe: per-token advantages are not reproduced; detach the probe")
        kept = {k: inputs[k].detach().to("cpu") for k in KEPT if inputs.get(k) is not None}
        prompts = zip(kept["prompt_ids"], kept["prompt_mask"])
        groups = [self.trainer.processing_class.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in prompts]
        batch = trl_sequence_batch(kept, groups)
        start = sum(len(b) for b, _ in self._micro_batches)  # this process's rows so far: micro-batch, then row
        batch = replace(batch, index=torch.arange(start, start + len(batch)))
        self._micro_batches.append((batch, int(inputs["num_items_in_batch"])))
        self._accumulation = int(getattr(self.trainer, "current_gradient_accumulation_steps", 0) or 0)

    # ---- the step ------------------------------------------------------------------------------
    def probed_step(self) -> ProbedStep | None:
        """The step about to happen as TRL computed it: this process's U (its micro-batches of the step), TRL's loss
        as probe's, and the normalisers of the whole step (every process); None where some process kept no
        micro-batch. A collective: every process calls it."""
        processes = self.probe.processes
        mine = (
            len(self._micro_batches),
            sum(len(b) for b, _ in self._micro_batches),
            sum(int(b.target_mask.sum()) for b, _ in self._micro_batches),
            sorted({items for _, items in self._micro_batches}),
            sorted({b.old_logprobs is not None for b, _ in self._micro_batches}),
        )
        everyone = processes.gather(mine)
        if not all(e[0] for e in everyone):
            return None
        items = sorted({n for e in everyone for n in e[3]})
        has_old = sorted({h for e in everyone for h in e[4]})
        if len(has_old) != 1:
            raise ValueError(
                "TRLEntropyProbe: some micro-batches of the step carry old log-probs and others do not; probe "
                "cannot give them one loss. Fix: detach the probe from this run (and tell us how it was configured)"
            )
        if len(items) != 1 and self.loss.loss_type in ("dapo", "cispo"):
            raise ValueError(
                "TRLEntropyProbe: the step's micro-batches come from different generation batches "
                f"(num_items_in_batch {items}), which TRL's {self.loss.loss_type} loss normalises separately. Fix: set "
                "steps_per_generation to a multiple of gradient_accumulation_steps (its default is equal)"
            )
        n_sequences = sum(e[1] for e in everyone)
        n_tokens = sum(e[2] for e in everyone)
        offset = sum(e[1] for e in everyone[: processes.rank])
        loss = replace(self.loss.loss_config(), use_old_logprobs=has_old[0])
        norm = self.loss.normalisers(n_sequences, n_tokens, items[0], self._accumulation or None)
        pad = int(self.trainer.processing_class.pad_token_id or 0)
        U = SequenceBatch.concat([b for b, _ in self._micro_batches], pad)
        U = replace(U, index=U.index + offset)  # positions in the step's global U: process, micro-batch, row
        return ProbedStep(batch=U, loss=loss, normalisers=norm)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = int(state.global_step)
        if not self.settings.is_probed(step):
            return
        probed = self.probed_step()
        max_norm = float(args.max_grad_norm) if args.max_grad_norm and args.max_grad_norm > 0 else None
        gradients = GradientHandling(max_norm=max_norm, clipped=max_norm is not None, grad_norm=self._grad_norm)
        self._micro_batches, self._grad_norm = [], None
        optimizer = kwargs.get("optimizer") or self.trainer.optimizer
        self.probe.before_step(step, self.policy, optimizer, probed, gradients, type(self.trainer).__name__)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        probed = self.probe.after_step(self.policy)
        if probed is None:
            return
        from transformers import Trainer

        # the base Trainer.log: into the log history and every report_to callback (W&B included), without
        # GRPOTrainer.log, which would flush TRL's own running metrics early; logging clears control.should_log,
        # which the trainer's own log of this step needs: kept as it was
        should_log = control.should_log
        Trainer.log(self.trainer, {f"probe/{k}": v for k, v in probed.metrics.items()})
        control.should_log = self.trainer.control.should_log = should_log

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.probe.setup(self.policy, self.trainer.processing_class, {"trainer": type(self.trainer).__name__})
        self.probe.hold_eval(self.policy)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = self.probe.finish()
        if path is None or "wandb" not in (args.report_to or []):
            return
        import wandb

        if wandb.run is not None:
            wandb.log({"probe/live_entropy": wandb.Image(str(path))})

    @property
    def policy(self) -> torch.nn.Module:
        """The trained model itself (no DDP wrapper: the probe's passes are its own)."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model)
