"""Preference losses (DPO, ORPO) on pair batches, keeping the loss contract of `train.losses`.

A pair batch (`data.packing.collate_pairs`) holds 2P sequences in one forward; the loss
returns the SUM over its P pairs and `count = P`, and every metric as a sum over pairs,
so the loop's normalisation, accumulation and logging are the ones SFT uses.

DPO (Rafailov et al. 2023), sigmoid loss:
    r_c = beta * (log pi(y_c|x) - log ref(y_c|x)),  r_r likewise,  loss = -log sigmoid(r_c - r_r)
with log pi(y|x) the SUM of the reply's token log-probs (end-of-turn token included).
ORPO (Hong et al. 2024), with mean token log-probs a_c, a_r of each reply:
    log odds(y) = a - log(1 - exp(a)),  loss = -a_c + lambda * -log sigmoid(log odds(y_c) - log odds(y_r))
Rewards reported for ORPO are lambda * a (what TRL logs), so both objectives log the same names.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.packing import Batch
from tunesmith.data.tokenize import IGNORE_INDEX
from tunesmith.train.losses import LossFn, LossSum, forward_logits


def sequence_logps(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each reply and its trained-token count, both `(P, 2)` (chosen, rejected), fp32."""
    logits = forward_logits(model, batch)  # (B, T, V)
    targets = batch.targets.flatten()  # (B*T,)
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX,
                                   reduction="none")  # (B*T,), 0 where not trained
    seq = batch.sequence_ids.flatten()  # (B*T,)  type: ignore[union-attr]
    n = 2 * batch.num_pairs  # not num_targets: a placeholder batch (0 targets) still runs its pairs
    sums = torch.zeros(n, device=logits.device).index_add(0, seq, token_logps)  # (2P,)
    counts = torch.zeros(n, device=logits.device).index_add(0, seq, (targets != IGNORE_INDEX).float())
    return sums.view(-1, 2), counts.view(-1, 2)


LOGP_CHUNK = 2048  # tokens per (chunk, V) fp32 logits block on the fast path: 1 GiB at a 128k vocabulary


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 softcap: float | None) -> torch.Tensor:
    """Token log-probs of one chunk `(C,)`; its (C, V) logits live only inside this call."""
    logits = (hidden @ weight.t()).float()  # (C, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return -F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")


def fused_sequence_logps(model: Any, batch: Batch, budget: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps` for the fast path: decoder only, token log-probs chunked and recomputed
    in backward (the full (T, V) logits are never built). Padded batches take the plain path.

    The row is padded to the token budget (longer rows to a multiple of PAD_MULTIPLE), as the
    SFT loss pads it: the compiled layers and flex attention then see one shape. Padded only
    to multiples, every pair batch had its own length and the layers recompiled step after
    step, until dynamo's recompile limit sent them back to eager flex attention, which
    materialises (T, T) scores (the out-of-memory of the first GPU run of the DPO rows)."""
    from torch.utils.checkpoint import checkpoint

    from tunesmith.model.fast import causal_lm, decoder_hidden, pad_packed, padded_length

    if batch.input_ids.shape[0] != 1:
        return sequence_logps(model, batch)
    lm = causal_lm(model)
    length = padded_length(batch.input_ids.shape[1], budget)
    ids, pos, tgt = pad_packed(batch.input_ids, batch.position_ids, batch.targets, length)  # (1, L)
    hidden = decoder_hidden(lm, ids, pos)  # (1, L, H)
    hidden, tgt = hidden.reshape(-1, hidden.shape[-1]), tgt.reshape(-1)  # (L, H), (L,)
    weight, softcap = lm.get_output_embeddings().weight, getattr(lm.config, "final_logit_softcapping", None)
    parts = []
    for start in range(0, hidden.shape[0], LOGP_CHUNK):
        args = (hidden[start:start + LOGP_CHUNK], weight, tgt[start:start + LOGP_CHUNK], softcap)
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_logps(*args))
    token_logps = torch.cat(parts)[: batch.input_ids.shape[1]]  # (T,) the padding tail dropped
    targets, seq = batch.targets.flatten(), batch.sequence_ids.flatten()  # type: ignore[union-attr]
    n = 2 * batch.num_pairs  # not num_targets: a placeholder batch (0 targets) still runs its pairs
    sums = torch.zeros(n, device=hidden.device).index_add(0, seq, token_logps)
    counts = torch.zeros(n, device=hidden.device).index_add(0, seq, (targets != IGNORE_INDEX).float())
    return sums.view(-1, 2), counts.view(-1, 2)


LogpsFn = Callable[[Any, Batch], tuple[torch.Tensor, torch.Tensor]]


def logps_for(fast: Any) -> LogpsFn:
    """The fused log-probs at the run's token budget when the fast path built a fused loss (CUDA), else the plain ones."""
    if getattr(fast, "loss_sum", None) is None:
        return sequence_logps
    return functools.partial(fused_sequence_logps, budget=int(getattr(fast, "batch_tokens", 0) or 0))


@torch.no_grad()
def reference_logps(model: Any, batch: Batch, logps: LogpsFn = sequence_logps,
                    reference: Any = None) -> torch.Tensor:
    """The reference's summed log-probs `(P, 2)`: cached on the batch, else the live `reference` model
    (a frozen copy of the starting weights), else this model with its adapter off."""
    if batch.reference_logps is not None:
        return batch.reference_logps
    if reference is not None:
        return logps(reference, batch)[0]
    if not hasattr(model, "disable_adapter"):
        raise RuntimeError("DPO without an adapter needs reference log-probs from the reference pass")
    with model.disable_adapter():
        return logps(model, batch)[0]


def pair_metrics(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor,
                 logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over pairs of what a preference step logs (the loop divides by the pair count)."""
    margin = (chosen_reward - rejected_reward).detach()
    return {"reward_accuracy": (margin > 0).float().sum(), "chosen_reward": chosen_reward.detach().sum(),
            "rejected_reward": rejected_reward.detach().sum(), "margin": margin.sum(),
            "chosen_logp": logps[:, 0].detach().sum(), "rejected_logp": logps[:, 1].detach().sum()}


def make_dpo_loss(beta: float, logps_fn: LogpsFn = sequence_logps) -> LossFn:
    """The DPO sigmoid loss at `beta`, summed over the batch's pairs.

    Its `reference_model` attribute (None: cached log-probs or the adapter off) is where the
    reference hook puts a live frozen copy (`train.reference.keep_live_reference`).
    """
    def dpo_loss_sum(model: Any, batch: Batch) -> LossSum:
        logps, _counts = logps_fn(model, batch)  # (P, 2)
        ref = reference_logps(model, batch, logps_fn, dpo_loss_sum.reference_model).to(logps.device)  # (P, 2)
        rewards = beta * (logps - ref)  # (P, 2)
        losses = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])  # (P,)
        return LossSum(losses.sum(), batch.num_targets, pair_metrics(rewards[:, 0], rewards[:, 1], logps))

    dpo_loss_sum.logps = logps_fn  # type: ignore[attr-defined]  # the reference pass scores the same way
    dpo_loss_sum.reference_model = None  # type: ignore[attr-defined]
    return dpo_loss_sum


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of a mean token probability p = exp(mean_logp) < 1."""
    mean_logp = mean_logp.clamp(max=-1e-6)  # p == 1 exactly has infinite odds
    return mean_logp - torch.log(-torch.expm1(mean_logp))


def make_orpo_loss(lam: float, logps_fn: LogpsFn = sequence_logps) -> LossFn:
    """ORPO at `lam`: per pair, the chosen reply's mean NLL plus lam x the odds-ratio loss, summed over pairs."""
    def orpo_loss_sum(model: Any, batch: Batch) -> LossSum:
        logps, counts = logps_fn(model, batch)  # (P, 2)
        mean = logps / counts.clamp(min=1)  # (P, 2) mean token log-prob of each reply
        ratio = log_odds(mean[:, 0]) - log_odds(mean[:, 1])  # (P,)
        nll = -mean[:, 0]
        losses = nll - lam * F.logsigmoid(ratio)  # (P,)
        metrics = pair_metrics(lam * mean[:, 0], lam * mean[:, 1], logps)
        metrics.update(chosen_nll=nll.detach().sum(), log_odds=ratio.detach().sum())
        return LossSum(losses.sum(), batch.num_targets, metrics)

    return orpo_loss_sum
