"""Preference training (DPO, Rafailov et al. 2023) for any trainable adapter on the resident base.

For a pair (prompt x, chosen y_w, rejected y_l), with log pi(y | x) summed over the answer tokens
(the tokens the answer turn adds, as supervised training labels them):

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

averaged over the pairs of a batch: TRL's ``DPOTrainer`` with ``loss_type="sigmoid"`` and no label
smoothing, which the tests hold this module to. The implicit rewards are
``beta * (log pi - log ref)`` of each answer; a pair counts as preferred when the chosen answer's
reward is higher (TRL's ``rewards/accuracies``).

With ``sft_weight`` w > 0, w times the batch's mean negative log-likelihood of the chosen answers'
tokens is added (RPO, Pang et al. 2024; TRL's ``loss_type=["sigmoid", "sft"]`` with
``loss_weights=[1, w]``): pure DPO may widen the margin by making both answers unlikely, and from
the bare base its greedy answers then degenerate.

The reference policy is the frozen base (an adapter that changes nothing: the trainer's forward
with no adapter) or, when the run starts from a registered adapter, a frozen copy of that adapter,
so SFT then DPO measures the move away from the SFT result. Reference log-probabilities are
computed per batch without gradients, in eval mode (no dropout), like TRL's default.

Nothing here branches on the adapter's kind: the policy and the reference are ``TrainableAdapter``s
and the forward that applies them is given by the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapters.kinds.base import AdapterWeights
from adapters.preference_data import PreferenceExample
from adapters.training.trainable import TrainableAdapter, trainable_from_weights
from adapters.training_data import IGNORE_INDEX, TrainingExample

# metric names (job events, progress): means over the pairs of an optimizer step or an eval pass
METRICS = ("chosen_reward", "rejected_reward", "reward_margin", "preference_accuracy")


@dataclass
class BatchLoss:
    """One micro-batch of an objective: ``total`` summed over ``units`` (the mean is what trains)."""

    total: torch.Tensor  # scalar, with gradients when training
    units: int  # what the loss is a mean over: labelled tokens (supervised) or pairs (DPO)
    tokens: int  # tokens forwarded, for throughput
    metric_sums: dict[str, float]  # summed over the units; divided by them when reported

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(1, self.units)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, T-1], [B, T-1])``: the log-probability of each next token and whether it is labelled.

    ``logits`` ``[B, T, vocab]``, ``labels`` ``[B, T]`` with ``IGNORE_INDEX`` where nothing is scored."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * scored, scored


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B]``: the summed log-probability of each row's labelled tokens (next-token aligned)."""
    return token_logps(logits, labels)[0].sum(dim=-1)


@dataclass
class DpoTerms:
    losses: torch.Tensor  # [pairs]
    chosen_rewards: torch.Tensor  # [pairs], no gradient
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DpoTerms:
    """Per-pair sigmoid DPO losses and implicit rewards from summed answer log-probabilities ``[pairs]``."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return DpoTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def pair_sequences(examples: list[PreferenceExample]) -> list[TrainingExample]:
    """The chosen sequences of every pair, then the rejected ones; only the answers are labelled."""
    def sequence(ex: PreferenceExample, answer: list[int]) -> TrainingExample:
        return TrainingExample(ex.prompt_ids + answer, [IGNORE_INDEX] * len(ex.prompt_ids) + answer, ex.line)

    return [sequence(ex, ex.chosen_ids) for ex in examples] + [sequence(ex, ex.rejected_ids) for ex in examples]


def frozen_reference(initial: AdapterWeights | None, device: torch.device) -> TrainableAdapter:
    """The reference policy: a frozen copy of the adapter training starts from, else one that
    changes nothing (the bare base)."""
    reference = TrainableAdapter(0, device) if initial is None else trainable_from_weights(initial, device)
    reference.requires_grad_(False)
    return reference.eval()


# forward(adapter, ids, mask, labels) -> (logits, labels aligned to them); collate(examples) -> (ids, labels, mask)
Forward = Callable[[TrainableAdapter, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Collate = Callable[[list[TrainingExample]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class DpoObjective:
    """The DPO loss of a batch of ``PreferenceExample`` for the policy adapter the trainer passes."""

    metrics = METRICS

    def __init__(self, beta: float, reference: TrainableAdapter, forward: Forward, collate: Collate,
                 sft_weight: float = 0.0):
        self.beta = beta
        self.reference = reference
        self._forward = forward
        self._collate = collate
        self.sft_weight = sft_weight

    def batch_loss(self, policy: TrainableAdapter, examples: list[PreferenceExample]) -> BatchLoss:
        """Chosen and rejected sequences go through one forward (``[2 * pairs, T]``), as TRL does."""
        ids, labels, mask = self._collate(pair_sequences(examples))
        with torch.no_grad():
            ref_logits, ref_labels = self._forward(self.reference, ids, mask, labels)
            ref_chosen, ref_rejected = sequence_logps(ref_logits, ref_labels).chunk(2)
            del ref_logits
        logits, policy_labels = self._forward(policy, ids, mask, labels)
        picked, scored = token_logps(logits, policy_labels)
        chosen, rejected = picked.sum(dim=-1).chunk(2)
        terms = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta)
        total = terms.losses.sum()
        if self.sft_weight:  # the mean over the batch's chosen tokens, as a per-pair mean: times pairs
            pairs = len(examples)
            chosen_nll = -picked[:pairs].sum() / scored[:pairs].sum().clamp(min=1)
            total = total + self.sft_weight * chosen_nll * pairs
        margins = terms.chosen_rewards - terms.rejected_rewards
        sums = {"chosen_reward": float(terms.chosen_rewards.sum()),
                "rejected_reward": float(terms.rejected_rewards.sum()),
                "reward_margin": float(margins.sum()),
                "preference_accuracy": float((margins > 0).float().sum())}
        return BatchLoss(total, len(examples), int(mask.sum()), sums)
