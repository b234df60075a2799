"""RACNet: routing + feature alignment over a variable number of CT slices, one label per scan.

Only the abstract of Kollias et al. (COV19-CT-DB / RACNet, seed 000) is public. It says the
network (a) is a CNN over slices, (b) has "routing and feature alignment steps" that
"handle different input lengths and single annotations of the 3-D image inputs", and (c)
yields latent variables from which "anchors" are built. Its published baseline is a CNN-RNN
(per-slice CNN → GRU → FC). Everything below is **our reading**; each block says why.

Pipeline for a batch of B scans padded to T slices (``lengths`` gives each scan's count)::

    slices (B,T,1,H,W) ──per-slice CNN (valid slices only)──► f (B,T,D)
        ──bidirectional GRU over slices ordered inferior→superior (packed)──► h (B,T,2G)
        ──dynamic routing-by-agreement to K capsules (padded slices masked)──► v (B,K,C)
        ──feature alignment: Linear + LayerNorm (no affine)──► z (B,L)   "latent" / anchors
        ──► covid head (2 logits), severity head (4 logits: mild/moderate/severe/critical)

Design decisions (our reading of the abstract):

1. **Per-slice CNN** (``slice2d``): the baseline's CNN; ResNet-50 for the paper setting,
   a small CNN for CPU. Only *valid* slices are encoded (padding never enters the CNN), so a
   slice's feature cannot depend on which scans share its batch.
2. **GRU over ordered slices**: the baseline's RNN. Slices are ordered inferior → superior
   in patient coordinates (``racnet/slice_selection.py``) so "position along the GRU" means the same
   anatomy for every scan. Bidirectional so that both ends of the lung inform every slice
   state. Packed sequences make padded steps invisible to both directions.
3. **Routing** ("routing step … handles different input lengths"): each slice state is a
   primary capsule u_i; dynamic routing-by-agreement (Sabour et al. 2017) sends it to K
   fixed output capsules through shared transforms û_{j|i} = W_j u_i, coupling
   c_ij = softmax_j(b_ij), b_ij += û_{j|i}·v_j for ``routing_iters`` rounds. The K capsules
   are a fixed-size representation whatever the slice count. Padded slices get c_ij = 0.
   Deviation from Sabour: s_j is the coupling-weighted **mean** of the predictions
   (Σ_i c_ij û_{j|i} / Σ_i c_ij), not the sum, so a 300-slice scan and a 30-slice scan of
   the same lungs give comparable capsule lengths instead of saturating the squash (first
   half of the length alignment). (A plain mean over slices would shrink every capsule by
   ~1/K and the squash, ~|s|² for short vectors, would then erase the signal.)
4. **Feature alignment** ("feature alignment … unifying the decision making over
   different input datasets"): two parts. (a) In the model, the flattened capsules are
   projected to an L-dim latent and standardised by a parameter-free LayerNorm, i.e.
   every scan's latent lies in the same normalised space (zero mean, unit variance over
   features, norm √L) regardless of intensity scale, length or source; anchors and their
   distances live there. (b) In training (``training/train_racnet.py``), a CORAL loss
   (Sun & Saenko 2016) aligns the second-order statistics of the latents of scans from
   different domains — source dataset when several are mixed, else short vs long scans —
   so that domain or length is not encoded in the latent.
5. **Heads**: linear COVID / non-COVID and severity heads on the aligned latent, so the
   classes are linearly separable in the space where the anchors are computed. The
   severity loss is applied only to scans with a severity label (COV19-CT-DB labels
   severity for a subset of COVID scans).

Padding invariance: with ``model.eval()``, a scan's outputs are the same (to float
round-off) whether it is run alone or padded in a batch; ``Testing/test_racnet.py`` checks it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .slice2d import build_slice_encoder

ARCHITECTURE = "racnet"
ARCHITECTURE_VERSION = "1"
COVID_KEYS = ("non_covid", "covid")


@dataclass
class RACNetConfig:
    """Hyper-parameters that define the network (stored in the model card)."""

    backbone: str = "small"
    encoder_widths: Tuple[int, ...] = (16, 32, 64, 96)
    slice_size: int = 128
    feature_dim: int = 128
    gru_hidden: int = 64
    capsules: int = 8
    capsule_dim: int = 16
    routing_iters: int = 3
    latent_dim: int = 64
    severity_classes: int = 4

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RACNetConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "encoder_widths" in known:
            known["encoder_widths"] = tuple(int(w) for w in known["encoder_widths"])
        return cls(**known)


def squash(s: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Capsule non-linearity: keeps direction, maps length to ||s||² / (1 + ||s||²)."""
    n2 = (s * s).sum(dim=dim, keepdim=True)
    return s * (n2 / (1.0 + n2)) / torch.sqrt(n2 + eps)


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) slice counts → (B, T) bool mask of valid slices."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class DynamicRouting(nn.Module):
    """Routing-by-agreement from a variable number of input capsules to K output capsules."""

    def __init__(self, in_dim: int, capsules: int, capsule_dim: int, iters: int = 3) -> None:
        super().__init__()
        self.capsules, self.capsule_dim, self.iters = capsules, capsule_dim, iters
        # One transform per output capsule, shared by all slices: the slice count is free.
        self.W = nn.Parameter(torch.randn(capsules, capsule_dim, in_dim) * (1.0 / in_dim) ** 0.5)

    def forward(self, u: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """u: (B, T, in_dim); mask: (B, T) bool. Returns capsules v (B,K,C) and coupling c (B,T,K)."""
        u_hat = torch.einsum("kci,bti->btkc", self.W, u)  # (B, T, K, C)
        m = mask.to(u.dtype)[..., None]  # (B, T, 1)
        b = torch.zeros(u.shape[0], u.shape[1], self.capsules, dtype=u.dtype, device=u.device)
        v = c = None
        for it in range(self.iters):
            c = torch.softmax(b, dim=2) * m  # padded slices vote for nobody
            # coupling-weighted mean of the predictions (not Sabour's sum): length-invariant
            s = (c[..., None] * u_hat).sum(dim=1) / c.sum(dim=1).clamp_min(1e-6)[..., None]
            v = squash(s)
            if it < self.iters - 1:
                b = b + (u_hat * v[:, None]).sum(dim=-1)
        return {"capsules": v, "coupling": c}


class RACNet(nn.Module):
    """Per-slice CNN → GRU → routing → feature alignment → COVID and severity heads."""

    def __init__(self, config: Optional[RACNetConfig] = None) -> None:
        super().__init__()
        self.config = cfg = config or RACNetConfig()
        self.encoder = build_slice_encoder(cfg.backbone, in_channels=1, out_dim=cfg.feature_dim, widths=cfg.encoder_widths)
        self.gru = nn.GRU(cfg.feature_dim, cfg.gru_hidden, batch_first=True, bidirectional=True)
        self.routing = DynamicRouting(2 * cfg.gru_hidden, cfg.capsules, cfg.capsule_dim, cfg.routing_iters)
        # no bias: a constant offset would dominate the LayerNorm when capsules are short
        self.align = nn.Linear(cfg.capsules * cfg.capsule_dim, cfg.latent_dim, bias=False)
        self.align_norm = nn.LayerNorm(cfg.latent_dim, elementwise_affine=False)
        self.covid_head = nn.Linear(cfg.latent_dim, len(COVID_KEYS))
        self.severity_head = nn.Linear(cfg.latent_dim, cfg.severity_classes)

    def encode_slices(self, slices: torch.Tensor, mask: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """CNN features of valid slices scattered back to (B, T, D); zeros at padding.

        ``chunk`` > 0 runs the CNN on at most that many slices at a time (bounds memory on
        long scans; results do not depend on it).
        """
        x = slices[mask]  # (N, 1, H, W) valid slices only
        if chunk and x.shape[0] > chunk:
            feats = torch.cat([self.encoder(x[i : i + chunk]) for i in range(0, x.shape[0], chunk)])
        else:
            feats = self.encoder(x)
        out = feats.new_zeros(mask.shape[0], mask.shape[1], feats.shape[1])
        out[mask] = feats
        return out

    def forward(self, slices: torch.Tensor, lengths: Optional[torch.Tensor] = None, chunk: int = 0) -> Dict[str, torch.Tensor]:
        """slices: (B, T, 1, H, W) ordered inferior→superior, zero-padded after ``lengths``.

        Returns ``covid_logits`` (B,2), ``severity_logits`` (B,4), ``latent`` (B,L),
        ``slice_feature_mean`` (B,D) (input-level statistics for out-of-distribution checks),
        ``capsules`` (B,K,C) and ``coupling`` (B,T,K).
        """
        if slices.dim() != 5:
            raise ValueError(f"expected slices of shape (B, T, 1, H, W), got {tuple(slices.shape)}")
        b, t = slices.shape[:2]
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=slices.device)
        lengths = lengths.to(torch.long)
        if int(lengths.min()) < 1 or int(lengths.max()) > t:
            raise ValueError("every scan needs between 1 and T slices")
        mask = lengths_to_mask(lengths, t)
        f = self.encode_slices(slices, mask, chunk)
        packed = pack_padded_sequence(f, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.gru(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=t)
        routed = self.routing(h, mask)
        v = routed["capsules"]
        z = self.align_norm(self.align(v.flatten(1)))
        n = lengths.to(f.dtype)[:, None]
        return {
            "slice_feature_mean": f.sum(dim=1) / n,  # (B, D) CNN features averaged over valid slices
            "covid_logits": self.covid_head(z),
            "severity_logits": self.severity_head(z),
            "latent": z,
            "capsules": v,
            "coupling": routed["coupling"],
        }


def coral_loss(latent: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
    """CORAL alignment loss between the latents of every pair of domains in the batch.

    ``||Cov_a − Cov_b||_F² / (4 L²)`` averaged over domain pairs that have ≥ 2 scans each;
    zero when fewer than two such domains are present (nothing to align).
    """
    groups = [latent[domain == d] for d in torch.unique(domain)]
    groups = [g for g in groups if g.shape[0] >= 2]
    if len(groups) < 2:
        return latent.sum() * 0.0
    L = latent.shape[1]
    covs = []
    for g in groups:
        gc = g - g.mean(dim=0, keepdim=True)
        covs.append(gc.T @ gc / (g.shape[0] - 1))
    losses = [((covs[i] - covs[j]) ** 2).sum() / (4.0 * L * L) for i in range(len(covs)) for j in range(i + 1, len(covs))]
    return torch.stack(losses).mean()


def racnet_losses(
    out: Mapping[str, torch.Tensor],
    covid: torch.Tensor,
    severity: torch.Tensor,
    domain: Optional[torch.Tensor] = None,
    coral_weight: float = 0.1,
    severity_weight: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """Cross-entropy for COVID (all scans) + severity (scans with label ≥ 0) + CORAL.

    ``severity`` uses −1 for "no severity label" (non-COVID scans, unlabelled COVID scans).
    """
    l_covid = F.cross_entropy(out["covid_logits"], covid)
    has = severity >= 0
    l_sev = F.cross_entropy(out["severity_logits"][has], severity[has]) if bool(has.any()) else out["severity_logits"].sum() * 0.0
    l_coral = coral_loss(out["latent"], domain) if domain is not None and coral_weight > 0 else out["latent"].sum() * 0.0
    total = l_covid + severity_weight * l_sev + coral_weight * l_coral
    return {"total": total, "covid": l_covid, "severity": l_sev, "coral": l_coral}
