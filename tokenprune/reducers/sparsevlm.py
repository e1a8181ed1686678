"""`sparsevlm`: SparseVLM (Zhang et al., ICML 2025; Gumpest/SparseVLMs) inside the LLM.

Text raters (the text tokens most relevant to the visual tokens, chosen once on the LLM input) rate
the visual tokens by the attention they pay them; at each cut the best-rated visual tokens stay and
the deleted ones are partly recycled: the best-rated 30 % (+1) of them are clustered (DPC-kNN) and
each cluster's plain mean enters the sequence after the kept visual tokens, a visual token like the
others at later cuts. Semantics, counts and every deviation from the reference: docs/peers.md.

Version v1.5 (branch `v1.5`, fixed per-stage counts, cuts after layers 3/7/16) is the default; v1
(rank-adaptive counts, four cuts) is `version="v1"`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from tokenprune.types import (
    LLM_LAYER_RATER_ATTN,
    LLM_LAYER_RATER_ATTN_ROWS,
    LayerTokens,
    Positions,
    Reduced,
    Space,
)

# The reference's per-stage counts (v1.5 score.py), by budget (a 32-layer average incl. clusters).
V15_KEEP = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
V15_LAYERS = (3, 7, 16)  # pruning_loc [2, 6, 15]: that layer's attention scores its own output
# v1: k = int(rank * scale + bias) (README / scripts), four cuts (pruning_loc [2, 6, 15, 19])
V1_RANK = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
V1_LAYERS = (3, 7, 16, 20)

Version = Literal["v1.5", "v1"]


class SparseVLM:
    """SparseVLM's cuts with text raters and token recycling (module docstring).

    Args:
        budget: 192, 128 or 64: the reference's setting (v1.5 counts or v1 scale/bias) when `keep`
            (v1.5) or `scale`/`bias` (v1) are not given.
        version: "v1.5" (fixed counts k_s = min(keep[s], N - 1)) or "v1" (k = min(int(rank(R) *
            scale + bias), N - 1), R = the head-averaged rater x visual attention; no cut when
            rank(R) = N).
        layers: the cuts (K = decoder layers run before it; the reference's `pruning_loc` + 1).
        keep: v1.5 per-cut counts (None: `V15_KEEP[budget]`).
        scale, bias: v1's rank rule (None: `V1_RANK[budget]`).
        recycle: merge part of the deleted tokens into recycled ones (the reference does).
        recycle_fraction: the top int(|D| * fraction) + 1 deleted tokens by rating are clustered.
        cluster_size: int(candidates / cluster_size) + 1 clusters.
        positions: "renumber" (the reference) or "gather" (original (M-)RoPE positions; a recycled
            token takes the position of `recycled_position`; M-RoPE models always gather).
        recycled_position: under gather, "centre" (its cluster centre's position) or "last" (the
            position of the last visual token before the cut).
        signal_precision: "float32" (ours) or "float16" (emulates the reference's half-precision
            raters and attention: logits, probabilities and means rounded to float16).
        density_noise: the reference adds U(0, 1e-6) noise to the DPC-kNN densities to break ties;
            0 (default) breaks ties by candidate order instead (deterministic); > 0 draws that noise
            from a generator seeded with `seed` for each sample and cut.
        seed: the noise generator's seed.

    Ties in every ranking go to the earlier token (stable sorts). Each sample is reduced alone.
    """

    space: ClassVar[Space] = "llm_layer"

    def __init__(
        self,
        budget: int = 192,
        version: Version = "v1.5",
        layers: Sequence[int] | None = None,
        keep: Sequence[int] | None = None,
        scale: float | None = None,
        bias: float | None = None,
        recycle: bool = True,
        recycle_fraction: float = 0.3,
        cluster_size: int = 10,
        positions: Positions = "renumber",
        recycled_position: Literal["centre", "last"] = "centre",
        signal_precision: Literal["float32", "float16"] = "float32",
        density_noise: float = 0.0,
        seed: int = 0,
    ) -> None:
        if version not in ("v1.5", "v1"):
            raise ValueError(f"version must be v1.5 or v1 (v2.0 is not implemented), got {version!r}")
        table = V15_KEEP if version == "v1.5" else V1_RANK
        if budget not in table and (keep is None if version == "v1.5" else scale is None or bias is None):
            raise ValueError(
                f"budget must be one of {sorted(table)} for {version}, or give its counts; got {budget}"
            )
        self.version = version
        self.layers = tuple(int(k) for k in (layers or (V15_LAYERS if version == "v1.5" else V1_LAYERS)))
        default_keep = V15_KEEP.get(budget, ()) if version == "v1.5" else ()
        self.keep = tuple(int(k) for k in (keep if keep is not None else default_keep))
        if version == "v1.5" and len(self.keep) != len(self.layers):
            raise ValueError(f"keep has {len(self.keep)} counts for {len(self.layers)} layers {self.layers}")
        if any(k < 1 for k in self.keep):
            raise ValueError(f"keep counts must be >= 1, got {list(self.keep)}")
        default_scale, default_bias = V1_RANK.get(budget, (0.0, 0.0))
        self.scale = float(default_scale if scale is None else scale)
        self.bias = float(default_bias if bias is None else bias)
        if not 0.0 <= recycle_fraction <= 1.0 or cluster_size < 1:
            raise ValueError(
                f"recycle_fraction must be in [0, 1] and cluster_size >= 1, got {recycle_fraction}, {cluster_size}"
            )
        if positions not in ("gather", "renumber"):
            raise ValueError(f"positions must be gather or renumber, got {positions!r}")
        if recycled_position not in ("centre", "last"):
            raise ValueError(f"recycled_position must be centre or last, got {recycled_position!r}")
        if signal_precision not in ("float32", "float16"):
            raise ValueError(f"signal_precision must be float32 or float16, got {signal_precision!r}")
        self.recycle = recycle
        self.recycle_fraction = recycle_fraction
        self.cluster_size = cluster_size
        self.positions = positions
        self.recycled_position = recycled_position
        self.signal_precision = signal_precision
        self.density_noise = float(density_noise)
        self.seed = seed
        self.requires = (LLM_LAYER_RATER_ATTN,) + ((LLM_LAYER_RATER_ATTN_ROWS,) if version == "v1" else ())

    # ------------------------------------------------------------------ counts
    def count(self, n: int, stage: int, rater_rows: torch.Tensor | None = None) -> int:
        """How many of a sample's `n` current visual tokens stay at cut `stage` (before recycling).

        v1 takes the sample's [R, n] rater x visual attention rows; it returns n (no cut) when their
        rank is n.
        """
        if n == 0:
            return 0
        if self.version == "v1.5":
            return min(self.keep[stage], n - 1)
        rank = int(torch.linalg.matrix_rank(rater_rows.float()))
        if rank == n:
            return n
        return max(0, min(int(rank * self.scale + self.bias), n - 1))

    def recycled_count(self, deleted: int) -> tuple[int, int]:
        """(candidates, clusters) recycled out of `deleted` tokens: int(|D| * f) + 1 and int(that / size) + 1."""
        if deleted == 0 or not self.recycle:
            return 0, 0
        candidates = min(int(deleted * self.recycle_fraction) + 1, deleted)
        return candidates, int(candidates / self.cluster_size) + 1

    # ------------------------------------------------------------------ the cut
    def __call__(self, tokens: LayerTokens) -> Reduced:
        rating = tokens.signals[LLM_LAYER_RATER_ATTN].float()  # [B, N]
        rows = tokens.signals.get(LLM_LAYER_RATER_ATTN_ROWS)  # [B, R, N] (v1)
        outputs = []
        for b, n in enumerate(tokens.lengths.tolist()):
            outputs.append(
                self.reduce_one(
                    tokens.features[b, :n],
                    rating[b, :n],
                    None if rows is None else rows[b, :, :n],
                    tokens.stage,
                )
            )
        width = max((len(index) for _, index, _ in outputs), default=0)
        batch, dim = tokens.features.shape[0], tokens.features.shape[-1]
        features = tokens.features.new_zeros(batch, width, dim)
        index = torch.full((batch, width), -1, dtype=torch.long, device=tokens.features.device)
        anchor = torch.zeros_like(index)
        for b, (values, picked, anchors) in enumerate(outputs):
            features[b, : len(picked)] = values
            index[b, : len(picked)] = picked
            anchor[b, : len(picked)] = anchors
        lengths = torch.tensor([len(picked) for _, picked, _ in outputs], device=index.device)
        return Reduced(features=features, index=index, lengths=lengths, anchor=anchor)

    def reduce_one(
        self, features: torch.Tensor, rating: torch.Tensor, rater_rows: torch.Tensor | None, stage: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sample: (features [M, D], index [M] with -1 for recycled tokens, anchor [M])."""
        n = features.shape[0]
        k = self.count(n, stage, rater_rows)
        order = torch.argsort(rating, descending=True, stable=True)
        kept = order[:k].sort().values
        deleted = order[k:].sort().values  # the deleted tokens in sequence order
        candidates, clusters = self.recycled_count(deleted.numel())
        if clusters == 0:
            return features[kept], kept, torch.zeros_like(kept)
        best = deleted[torch.argsort(rating[deleted], descending=True, stable=True)[:candidates]]
        merged, centres = self.cluster_and_merge(features[best], clusters, stage)
        anchors = best[centres] if self.recycled_position == "centre" else torch.full_like(centres, n - 1)
        synthetic = torch.full_like(centres, -1)
        return (
            torch.cat([features[kept], merged.to(features.dtype)]),
            torch.cat([kept, synthetic]),
            torch.cat([torch.zeros_like(kept), anchors]),
        )

    def cluster_and_merge(
        self, x: torch.Tensor, clusters: int, stage: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DPC-kNN clustering of `x` [m, D] into `clusters`; (the clusters' means [c, D], centres [c]).

        Distances ‖x_i - x_j‖ / √D; density ρ_i = exp(-mean squared distance to its `clusters`
        nearest tokens, itself included); δ_i = the distance to the nearest denser token (the
        largest distance for the densest); centres = the top `clusters` of ρ·δ (in that order, the
        clusters' order); each token joins its nearest centre, a centre itself; a cluster's token =
        the sum of its members / (count + 1e-6), the reference's mean.
        """
        m, dim = x.shape
        x = x.float()
        distance = torch.cdist(x[None], x[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(
            dim
        )
        nearest = distance.sort(dim=-1).values[:, :clusters]  # [m, c]
        density = torch.exp(-(nearest**2).mean(-1))  # [m]
        if self.density_noise > 0:
            generator = torch.Generator().manual_seed(self.seed + stage)
            density = density + (torch.rand(m, generator=generator) * self.density_noise).to(density.device)
        # j is denser than i: higher density, ties to the earlier candidate (a total order)
        rank = torch.empty(m, dtype=torch.long, device=x.device)
        rank[torch.argsort(density, descending=True, stable=True)] = torch.arange(m, device=x.device)
        denser = rank[None, :] < rank[:, None]  # [i, j]
        delta = torch.where(denser, distance, distance.max()).min(-1).values  # [m]
        centres = torch.argsort(delta * density, descending=True, stable=True)[:clusters]  # [c]
        assignment = distance[centres].argmin(0)  # [m], the first nearest centre
        assignment[centres] = torch.arange(clusters, device=x.device)
        members = torch.zeros(clusters, m, device=x.device).index_put_(
            (assignment, torch.arange(m, device=x.device)), torch.ones(m, device=x.device)
        )
        merged = (members @ x) / (members.sum(-1, keepdim=True) + 1e-6)
        return merged, centres
