"""probe's loss for a TRL run is TRL's own: for every loss type probe reproduces, the loss value and its gradient
on one TRL micro-batch equal ``GRPOTrainer._compute_loss``'s (float64, to 1e-10), on-policy (``num_iterations``
1: the ratio against the current log-probs) and against old log-probs (``num_iterations`` 2, ratios away from 1,
some clipped). What probe does not reproduce is refused by name.

The batch is built as TRL builds one (left-padded prompts, right-padded completions, a completion ending early,
advantages of both signs). TRL's forward takes no position ids, probe's counts them from the first real token:
with rotary embeddings both give the same attention up to rounding (1e-11 of the logits here). TRL's fused head
kernel accumulates log-probs and their gradients in float32 whatever the policy's dtype (~1e-6 relative on the
gradient, measured): the comparison gives TRL float64 log-probs (the fixture), so that it checks the loss TRL
builds from them, to float64 rounding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("trl", reason="TRL is probe's optional dependency (pip install 'probe[trl]')")

from probe.losses import normalisers  # noqa: E402
from probe.trl_loss import AGGREGATION, TRLLoss, trl_sequence_batch  # noqa: E402
from probe.update import sequence_losses  # noqa: E402

from support import use_exact_trl_logprobs  # noqa: E402

PROMPT, COMPLETION = 4, 6


@pytest.fixture(scope="module")
def trainer(tiny_llama, toy_world_dir, tmp_path_factory):
    """A TRL GRPOTrainer over a float64 tiny Llama (constructed only: its _compute_loss is what is compared)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from probe.loading import load_policy

    _, tokenizer = load_policy(toy_world_dir)
    model = tiny_llama(3, dtype=torch.float64, vocab_size=len(tokenizer), num_hidden_layers=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=COMPLETION,
        report_to=[],
        epsilon=0.2,
        epsilon_high=0.28,
    )
    data = Dataset.from_dict({"prompt": ["1+1=", "2+3="] * 4})
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1  # (set by the training loop; one micro-batch here)
    trainer.model.train()

    use_exact_trl_logprobs(trainer)  # what is compared is what TRL does with the log-probs, the loss
    return trainer


def trl_batch(vocab: int, old: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    B = 4
    prompt_ids = torch.randint(3, vocab, (B, PROMPT), generator=gen)
    prompt_mask = torch.ones(B, PROMPT, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(3, vocab, (B, COMPLETION), generator=gen)
    completion_mask = torch.ones(B, COMPLETION, dtype=torch.long)
    completion_mask[1, 3:] = 0  # a completion that ended early
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.3, -0.7, 0.4, -1.0], dtype=torch.float64),
        "num_items_in_batch": completion_mask.sum(),
    }
    if old:  # log-probs of a slightly different policy: ratios away from 1, some outside the clip range
        batch["old_per_token_logps"] = -2.0 + 0.3 * torch.randn(B, COMPLETION, generator=gen, dtype=torch.float64)
    return batch


def gradient(loss: torch.Tensor, model: torch.nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad]))


@pytest.mark.parametrize("old", [False, True], ids=["on_policy", "old_logprobs"])
@pytest.mark.parametrize("loss_type", sorted(AGGREGATION))
def test_probes_loss_and_gradient_are_trls(trainer, loss_type, old):
    settings = TRLLoss.from_trainer_args(trainer.args)
    settings = dataclasses.replace(settings, loss_type=loss_type, num_iterations=2 if old else 1)
    if loss_type == "cispo":  # cispo's cap on the ratio itself
        settings = dataclasses.replace(settings, epsilon_high=1.1)
    trainer.loss_type, trainer.epsilon_high = loss_type, settings.epsilon_high or settings.epsilon
    model = trainer.model
    batch = trl_batch(model.config.vocab_size, old)

    theirs = trainer._compute_loss(model, batch)
    their_grad = gradient(theirs, model)

    cfg = settings.loss_config()
    U = trl_sequence_batch(batch)  # the conversion the live probe applies to each micro-batch
    with torch.enable_grad():
        ours = sequence_losses(model, U, cfg, normalisers(U.target_mask, cfg)).sum()
    our_grad = gradient(ours, model)

    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-10, abs=1e-12)
    scale = max(float(g.abs().max()) for g in their_grad)
    assert scale > 0
    for a, b in zip(our_grad, their_grad):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * scale)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"beta": 0.04}, "beta 0.04"),
        ({"delta": 1.5}, "delta 1.5"),
        ({"importance_sampling_level": "sequence"}, "GSPO"),
        ({"loss_type": "vespo"}, "loss_type 'vespo'"),
        ({"loss_type": "bnpo", "gradient_accumulation_steps": 2}, "bnpo over 2 micro-batches"),
    ],
)
def test_what_probe_does_not_reproduce_is_refused_by_name(change, named):
    with pytest.raises(ValueError, match="probe does not reproduce this TRL loss") as refused:
        dataclasses.replace(TRLLoss(), **change).loss_config()
    assert named in str(refused.value) and "Fix:" in str(refused.value)
