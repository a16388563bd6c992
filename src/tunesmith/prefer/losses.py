"""The preference losses, per pair (or per answer for KTO), from sequence log-probabilities.

Every function takes summed log-probabilities of whole answers (`*_logps`, one float per answer, the sum of
the answer's token log-probs given the prompt) and returns the loss of each pair, unreduced: the training
loop sums them and divides by the number of pairs in the optimiser step, so every pair weighs the same
however pairs fall across micro-batches and processes.  The implicit reward of an answer is
beta * (log pi(answer) - log pi_ref(answer)) (Rafailov et al., 2023, section 5).

- DPO: Rafailov et al., "Direct Preference Optimization" (2023), eq. 7:
  -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))); with label smoothing eps (conservative DPO,
  Mitchell, "A note on DPO with noisy preferences", 2023) -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z).
  Defaults as TRL's DPOConfig: beta 0.1, no smoothing.
- IPO: Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences" (2023),
  eq. 17: (z - 1 / (2 beta))^2, with z from log-probs averaged per answer token (as TRL computes it: the
  paper's h is a per-token quantity in its implementation).
- SimPO: Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward" (2024), eq. 6:
  -log sigmoid(beta / |y_c| * pi_c - beta / |y_r| * pi_r - gamma); the paper's recipes use beta 2.0-2.5 and
  gamma / beta about 0.5 (section 4, Table 7): beta 2.0, gamma 1.0 here (TRL's CPO default ratio 0.5).
- ORPO: Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model" (2024), eqs. 4-7:
  L_SFT(chosen) + lambda * -log sigmoid(log odds(y_c) - log odds(y_r)), odds(y) = P(y) / (1 - P(y)) with
  P(y) = exp(mean token log-prob of y); lambda 0.1 (TRL's ORPOConfig beta).  Reference-free.
- KTO: Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization" (2024), eq. 8:
  desirable lambda_D (1 - sigmoid(beta (r - z0))), undesirable lambda_U (1 - sigmoid(beta (z0 - r))), with
  r = pi - ref and z0 = max(0, mean KL estimate over mismatched prompt/answer pairs), not back-propagated;
  beta 0.1, lambda_D = lambda_U = 1 (TRL's KTOConfig).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_losses(pi_c, pi_r, ref_c, ref_r, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    z = (pi_c - pi_r) - (ref_c - ref_r)
    return -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)


def ipo_losses(pi_c, pi_r, ref_c, ref_r, len_c, len_r, beta: float) -> torch.Tensor:
    z = (pi_c / len_c - pi_r / len_r) - (ref_c / len_c - ref_r / len_r)
    return (z - 1 / (2 * beta)) ** 2


def simpo_losses(pi_c, pi_r, len_c, len_r, beta: float, gamma: float) -> torch.Tensor:
    return -F.logsigmoid(beta * pi_c / len_c - beta * pi_r / len_r - gamma)


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) for P = exp(mean_logp) < 1, computed as mean_logp - log(1 - exp(mean_logp))."""
    return mean_logp - torch.log1p(-torch.exp(mean_logp).clamp(max=1 - 1e-7))


def orpo_odds_losses(pi_c, pi_r, len_c, len_r, lam: float) -> torch.Tensor:
    """ORPO's odds-ratio term per pair (its SFT term, the chosen answer's NLL, is added by the caller, who
    knows how the step weighs tokens)."""
    return -lam * F.logsigmoid(log_odds(pi_c / len_c) - log_odds(pi_r / len_r))


def kto_losses(pi, ref, desirable: torch.Tensor, kl: torch.Tensor, beta: float, weight_desirable: float,
               weight_undesirable: float) -> torch.Tensor:
    """Per answer; `desirable` is a bool tensor, `kl` the batch's KL estimate (clamped at 0, no gradient)."""
    r = pi - ref
    z0 = kl.detach().clamp(min=0)
    good = weight_desirable * (1 - torch.sigmoid(beta * (r - z0)))
    bad = weight_undesirable * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(desirable, good, bad)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each answer: its reward minus its group's mean, over the group's standard deviation
    (Shao et al., "DeepSeekMath", 2024, section 4.1.2, outcome supervision; eps 1e-4 as TRL's GRPO keeps a group
    whose answers all score the same at advantage 0 instead of dividing by 0).  `rewards` [groups x group_size]."""
    g = rewards.view(-1, group_size)
    return ((g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True) + eps)).view(-1)


def grpo_token_losses(logp, old_logp, ref_logp, advantages, epsilon: float, beta: float) -> torch.Tensor:
    """Per answer token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL, with ratio =
    pi / pi_old and KL the unbiased estimator exp(ref - pi) - (ref - pi) - 1 (DeepSeekMath eqs. 3-4; Schulman,
    "Approximating KL divergence", 2020).  `advantages` is already per token."""
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - epsilon, 1 + epsilon) * advantages)
    loss = -surrogate
    if ref_logp is not None and beta:
        delta = ref_logp - logp
        loss = loss + beta * (torch.exp(delta) - delta - 1)
    return loss
