"""The learned explainability mapper (Lei et al., arXiv 2506.01097) and its oracle, at the LLM input.

`ExplainMapper` scores every visual token from one cheap signal, the LLM's layer-0 attention from
the instruction after the image to each visual token (`llm_text_attn`, computed by the adapter on
the unreduced input), with a small fully convolutional net trained to reproduce the answer's GAE
relevance (`tokenprune.explain`), and keeps the top `ratio` of the tokens in their original order.
`ExplainOracle` keeps the top tokens of the exact relevance (`relevance`, which needs the answer:
the adapter explains the unreduced model's own greedy answer), the upper bound the mapper imitates.

The net (notes/explainability_mapper.md §2.2): 5 depthwise-separable 1-D conv blocks,
1 → 32 → 64 → 128 → 256 → 512 channels ("same" padding, stride 1), a 1×1 conv to one channel and a
softmax over the tokens. Every detail the paper leaves open is a `MapperConfig` field; every
choice and its default is documented in docs/explain_mapper.md. A trained mapper is two files:
`mapper.safetensors` (weights) and `mapper.json` (its `MapperConfig` and training info).
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from omegaconf import OmegaConf
from torch import nn

from tokenprune.atomic import atomic_folder
from tokenprune.reducers._ops import gather_tokens, identity, resolve_budget
from tokenprune.types import LLM_TEXT_ATTN, RELEVANCE, Reduced, Space, VisualTokens

log = logging.getLogger(__name__)

WEIGHTS_FILE = "mapper.safetensors"
CONFIG_FILE = "mapper.json"
FORMAT = "tokenprune-explain-mapper"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
NORMS = ("none", "layer")
SCALINGS = ("zscore", "mean", "max", "none")
POSITIONS = ("gather", "renumber")
Positions = Literal["gather", "renumber"]


@dataclass
class MapperConfig:
    """The mapper net's architecture and input scaling (`reducer.net`, `train.net`).

    Attributes:
        channels: output channels of the depthwise-separable blocks (paper: 32, 64, 128, 256, 512;
            the input has one channel). The ablated depths (3, 7, 10) are other lists.
        kernel_size: the depthwise convolutions' kernel (odd; "same" zero padding, stride 1, no
            dilation). Not in the paper; default 3.
        activation: after every block: gelu | relu | silu. Not in the paper; default gelu.
        norm: after every block's pointwise conv, before the activation: none | layer (LayerNorm
            over the channels of each token, so padding and batching cannot leak in). Not in the
            paper; default none (the paper's parameter count, 177.5K at kernel 3, has no norm).
        input_scaling: per-sample standardisation of the attention vector before the net (raw
            values are ~1/N): zscore ((x - mean) / std) | mean (x / mean) | max (x / max) | none.
            Not in the paper; default zscore (invariant to N and to the attention's overall scale).
        eps: added to the scaling denominators.
    """

    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    kernel_size: int = 3
    activation: str = "gelu"
    norm: str = "none"
    input_scaling: str = "zscore"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if OmegaConf.is_config(self.channels) or isinstance(self.channels, tuple):
            self.channels = list(self.channels)
        self.channels = [int(c) for c in self.channels]
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive ints, got {self.channels}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd ('same' padding), got {self.kernel_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.input_scaling not in SCALINGS:
            raise ValueError(f"input_scaling must be one of {SCALINGS}, got {self.input_scaling!r}")


class _Block(nn.Module):
    """Depthwise conv (k, same padding) → pointwise conv → optional channel LayerNorm → activation."""

    def __init__(self, c_in: int, c_out: int, config: MapperConfig) -> None:
        super().__init__()
        k = config.kernel_size
        self.depthwise = nn.Conv1d(c_in, c_in, k, padding=k // 2, groups=c_in)
        self.pointwise = nn.Conv1d(c_in, c_out, 1)
        self.norm = nn.LayerNorm(c_out) if config.norm == "layer" else None
        self.act = ACTIVATIONS[config.activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, N] -> [B, C_out, N]
        x = self.pointwise(self.depthwise(x))
        if self.norm is not None:
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.act(x)


class MapperNet(nn.Module):
    """f_θ: attention vector [B, N] → logits [B, N] (softmax over the valid tokens = the relevance estimate).

    Fully convolutional: any N works. Padded positions (mask False) are zeroed after every block,
    so a padded sample scores exactly as alone (the convolution's own zero padding), and get -inf.
    """

    def __init__(self, config: MapperConfig | None = None) -> None:
        super().__init__()
        self.config = config or MapperConfig()
        widths = [1, *self.config.channels]
        self.blocks = nn.ModuleList(_Block(a, b, self.config) for a, b in itertools.pairwise(widths))
        self.head = nn.Conv1d(widths[-1], 1, 1)

    def scale(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample input scaling over the valid positions (`MapperConfig.input_scaling`)."""
        how, eps = self.config.input_scaling, self.config.eps
        if how == "none":
            return x
        weight = mask.float()
        count = weight.sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
        mean = (x * weight).sum(-1, keepdim=True) / count
        if how == "mean":
            return x / (mean + eps)
        if how == "max":
            return x / (x.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True).clamp_min(0) + eps)
        var = (((x - mean) * weight) ** 2).sum(-1, keepdim=True) / count
        return (x - mean) / (var.sqrt() + eps)

    def forward(self, signal: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """signal [B, N] (any float dtype), mask [B, N] bool (None: all valid) -> logits [B, N] float32."""
        signal = signal.float()
        if mask is None:
            mask = torch.ones_like(signal, dtype=torch.bool)
        keep = mask[:, None].float()  # [B, 1, N]
        h = (self.scale(signal, mask) * mask)[:, None]  # [B, 1, N]
        for block in self.blocks:
            h = block(h) * keep  # [B, C, N]
        logits = self.head(h)[:, 0]  # [B, N]
        return logits.masked_fill(~mask, float("-inf"))

    def macs_per_token(self) -> int:
        """Multiply-accumulates per token (for the FLOPs meter)."""
        widths = [1, *self.config.channels]
        k = self.config.kernel_size
        return sum(a * k + a * b for a, b in itertools.pairwise(widths)) + widths[-1]


def save_mapper(net: MapperNet, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write `mapper.safetensors` + `mapper.json` to `folder` atomically (a staging folder, renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"format": FORMAT, "version": 1, "net": asdict(net.config), "info": info or {}}
    with atomic_folder(folder) as staging:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return folder


def load_mapper(path: str | Path) -> tuple[MapperNet, dict[str, Any]]:
    """A saved mapper: its folder, or its `mapper.safetensors` (with `mapper.json` beside it)."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    weights, meta_file = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not meta_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a saved explainability mapper (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "train one with `python -m tokenprune.train train=mapper reducer=explain_mapper ...`"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file} is not a {FORMAT} file (format={meta.get('format')!r})")
    net = MapperNet(MapperConfig(**meta["net"]))
    net.load_state_dict(load_file(str(weights)))
    return net, meta


def _budget(n: int, keep: int | None, ratio: float | None) -> int:
    """`keep` (a count) when set, else round(ratio * n) (at least 1, at most n)."""
    return resolve_budget(n, keep, None) if keep is not None else resolve_budget(n, None, ratio)


def _top_in_order(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """[B, N] scores -> [B, budget] indices of the highest ones (ties: lower index), ascending."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :budget]
    return order.sort(dim=-1).values


def _signal(tokens: VisualTokens, name: str, reducer: str) -> torch.Tensor:
    if name not in tokens.signals:
        raise ValueError(
            f"{reducer} needs the `{name}` signal of the LLM input, which the adapters compute when the "
            "reducer runs at the LLM input (LLaVA, Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision); these "
            f"tokens carry {sorted(tokens.signals)}"
        )
    return tokens.signals[name].float()


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")


class ExplainMapper(nn.Module):
    """Keeps the visual tokens the learned mapper scores highest (top `ratio`), in their original order.

    Args:
        checkpoint: a saved mapper (folder or its mapper.safetensors). None: a seeded, untrained
            net built from `net` (tests; a trained stage loads its weights into it, `load`).
        video_checkpoint: the video mapper (the paper trains one mapper per model and modality);
            the adapters score a video's tokens (all its frames as one sequence) with it. None:
            videos are scored by the same net as images.
        ratio: fraction of the visual tokens kept (paper: 0.5 and 0.25); round(ratio * N), >= 1.
        keep: a count instead (overrides `ratio` when set; >= N keeps the input unchanged).
        net: the architecture used without a checkpoint (a checkpoint carries its own).
        positions: how the adapter numbers the reduced sequence: "gather" (each kept token and the
            text keep their positions in the unreduced sequence, as the scores were computed there)
            or "renumber" (contiguous). Read by the adapter.
        batch_invariant: score each sample in its own pass, so a batch reduces bit-identically to
            its samples alone (a batched conv can differ in the last bits and flip near-ties);
            False scores the batch in one pass.
        seed: initialises the untrained net (no checkpoint).

    The kept tokens are the input rows times a gate equal to 1 in value whose gradient is the
    kept token's mapper probability (straight-through), so gradients reach the net's parameters
    without changing any output.
    """

    space: ClassVar[Space] = "llm"
    requires: ClassVar[tuple[str, ...]] = (LLM_TEXT_ATTN,)

    def __init__(
        self,
        checkpoint: str | None = None,
        ratio: float | None = 0.5,
        keep: int | None = None,
        net: MapperConfig | None = None,
        positions: Positions = "gather",
        batch_invariant: bool = True,
        seed: int = 0,
        video_checkpoint: str | None = None,
    ) -> None:
        super().__init__()
        _budget(1 << 30, keep, ratio)  # validate early
        _check_positions(positions)
        self.ratio, self.keep, self.positions = ratio, keep, positions
        self.batch_invariant = batch_invariant
        self.checkpoint = checkpoint
        self.info: dict[str, Any] = {}
        if checkpoint is not None:
            self.net, meta = load_mapper(checkpoint)
            self.info = meta.get("info", {})
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.net = MapperNet(net if isinstance(net, MapperConfig) else MapperConfig(**(net or {})))
        self.video_checkpoint = video_checkpoint
        self.video_net = None if video_checkpoint is None else load_mapper(video_checkpoint)[0]

    def for_modality(self, modality: str) -> ExplainMapper | _VideoMapper:
        """The reducer for "image" or "video" tokens: the video mapper when one was given, else this one
        (the same budget and settings either way)."""
        if modality not in ("image", "video"):
            raise ValueError(f"modality must be image or video, got {modality!r}")
        return _VideoMapper(self) if modality == "video" and self.video_net is not None else self

    def load(self, path: str | Path) -> ExplainMapper:
        """Replace the net with a saved mapper (its own architecture); returns self."""
        self.net, meta = load_mapper(path)
        self.info = meta.get("info", {})
        self.checkpoint = str(path)
        return self

    def scores(self, signal: torch.Tensor, net: MapperNet | None = None) -> torch.Tensor:
        """logits [B, N] float32 of the attention vectors [B, N] (by `net`, default the image mapper)."""
        net = self.net if net is None else net
        parameter = next(net.parameters())
        if parameter.device != signal.device:
            net.to(signal.device)
        if self.batch_invariant and signal.shape[0] > 1:
            return torch.cat([net(row[None]) for row in signal])
        return net(signal)

    def forward(self, tokens: VisualTokens) -> Reduced:
        return self.reduce(tokens, self.net)

    def reduce(self, tokens: VisualTokens, net: MapperNet) -> Reduced:
        """Keep the top tokens by `net`'s scores (see the class)."""
        b, n, _ = tokens.features.shape
        budget = _budget(n, self.keep, self.ratio)
        if budget >= n or b == 0:
            return identity(tokens)
        logits = self.scores(_signal(tokens, LLM_TEXT_ATTN, type(self).__name__), net)  # [B, N]
        index = _top_in_order(logits.detach(), budget)  # [B, M]
        probs = torch.gather(logits.softmax(dim=-1), 1, index)  # [B, M]
        gate = (1.0 + (probs - probs.detach())).to(tokens.features.dtype)  # == 1, d/dprob = 1
        features = gather_tokens(tokens.features, index) * gate[..., None]  # [B, M, D]
        lengths = torch.full((b,), budget, device=features.device, dtype=torch.long)
        return Reduced(features=features, index=index, lengths=lengths)

    def flops(self, n: int, kept: int, width: int) -> int:
        """The net over n tokens, the top-k sort and the gather (for the FLOPs meter)."""
        return 2 * self.net.macs_per_token() * n + kept * width


class _VideoMapper:
    """An ExplainMapper's video mapper: the same budget and settings, its `video_net` scores."""

    space: ClassVar[Space] = "llm"
    requires: ClassVar[tuple[str, ...]] = (LLM_TEXT_ATTN,)

    def __init__(self, mapper: ExplainMapper) -> None:
        self.mapper = mapper

    def __call__(self, tokens: VisualTokens) -> Reduced:
        return self.mapper.reduce(tokens, self.mapper.video_net)


class ExplainOracle:
    """Keeps the visual tokens with the highest GAE relevance of the answer (an upper bound; analysis).

    The adapter computes `relevance` (tokenprune.models.gae) before reducing: for the answers given
    in training inputs, else for the unreduced model's own greedy answer (`answer_tokens` at most),
    then the reduced model answers again. Costs one extra generation, one teacher-forced forward
    with recorded attention and one backward per answer token per sample.

    Args:
        ratio / keep: the budget, as for ExplainMapper.
        positions: gather | renumber, as for ExplainMapper.
        answer_tokens: the most tokens of the unreduced greedy answer that is explained.
        include_eos: also explain the end-of-sequence token.
        target: the differentiated score: logit (GAE's convention) | logprob.
    """

    space: ClassVar[Space] = "llm"
    requires: ClassVar[tuple[str, ...]] = (RELEVANCE,)

    def __init__(
        self,
        ratio: float | None = 0.5,
        keep: int | None = None,
        positions: Positions = "gather",
        answer_tokens: int = 16,
        include_eos: bool = False,
        target: str = "logit",
    ) -> None:
        _budget(1 << 30, keep, ratio)
        _check_positions(positions)
        if target not in ("logit", "logprob"):
            raise ValueError(f"target must be logit or logprob, got {target!r}")
        self.ratio, self.keep, self.positions = ratio, keep, positions
        self.answer_tokens, self.include_eos, self.target = answer_tokens, include_eos, target

    def __call__(self, tokens: VisualTokens) -> Reduced:
        b, n, _ = tokens.features.shape
        budget = _budget(n, self.keep, self.ratio)
        if budget >= n or b == 0:
            return identity(tokens)
        index = _top_in_order(_signal(tokens, RELEVANCE, type(self).__name__), budget)  # [B, M]
        lengths = torch.full((b,), budget, device=index.device, dtype=torch.long)
        return Reduced(features=gather_tokens(tokens.features, index), index=index, lengths=lengths)

    def flops(self, n: int, kept: int, width: int) -> int:
        return kept * width  # the selection only; the relevance itself costs a backward per answer token
