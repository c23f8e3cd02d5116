"""The learned fusion weight: w = sigmoid(MLP(features of both sides' top-K)) per decoding position.

Two variants, both fed only what fusion has at hand (the device's small-model top-K and the cloud's
top-K, log-probabilities below ``floor`` clamped to it):
- ``paper``: the paper's network, a Linear over [z_small; z_large] where each z is the vocabulary-
  sized log-probability vector holding the top-K entries and ``floor`` everywhere else, then
  ReLU -> 16 -> 1 (the released code's ProbFusionModel, hidden 512 there). The first layer is
  computed sparsely: with x = z - floor (zero off the top-K) it is an embedding lookup, and the
  constant floor background folds into its bias, so the function class is the paper's exactly.
- ``compact``: vocabulary-independent features, the sorted top-K log-probs of each side and their
  two entropies (2K + 2 inputs), MLP -> 64 -> 16 -> 1: a few thousand parameters.

Checkpoints (``save``/``load``) carry the variant, K, vocabulary size, floor and what the network
was trained on, so a mismatch with the running models is a clear error, not silent nonsense.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cogenesis.core.errors import ConfigError
from cogenesis.core.fusion import topk_entropy

VARIANTS = ("compact", "paper")
CHECKPOINT_FORMAT = "cogenesis-fusion/1"


class FusionNet(nn.Module):
    def __init__(
        self, variant: str = "compact", k: int = 10, vocab: int = 0, hidden: int = 64, floor: float = -20.0
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown fusion network variant {variant!r}: use one of {', '.join(VARIANTS)}")
        if variant == "paper" and vocab <= 0:
            raise ValueError("the paper variant needs the vocabulary size")
        if k < 1 or hidden < 1 or floor >= 0:
            raise ValueError(f"need k >= 1, hidden >= 1, floor < 0 (got {k}, {hidden}, {floor})")
        self.variant, self.k, self.vocab, self.hidden, self.floor = variant, k, vocab, hidden, float(floor)
        if variant == "paper":
            self.small_in = nn.Embedding(vocab, hidden)  # rows of the first Linear's weight, small half
            self.large_in = nn.Embedding(vocab, hidden)  # ... large half
            self.bias = nn.Parameter(torch.zeros(hidden))
            for emb in (self.small_in, self.large_in):
                nn.init.normal_(emb.weight, std=(2.0 / (2 * k)) ** 0.5 / abs(self.floor))  # ~unit pre-activations
        else:
            self.first = nn.Linear(2 * k + 2, hidden)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden, 16), nn.ReLU(), nn.Linear(16, 1))

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _clamped(self, lp: torch.Tensor) -> torch.Tensor:
        return lp.float().nan_to_num(neginf=self.floor).clamp(min=self.floor, max=0.0)

    def logit(
        self, small_ids: torch.Tensor, small_lp: torch.Tensor, large_ids: torch.Tensor, large_lp: torch.Tensor
    ) -> torch.Tensor:
        """Pre-sigmoid weight per row: ids/lps [B, K] (small: the device's top-K; large: the cloud's)."""
        for name, t in (("small", small_lp), ("large", large_lp)):
            if t.dim() != 2 or t.shape[1] != self.k:
                raise ValueError(f"{name} top-k must be [B, {self.k}], got {tuple(t.shape)}")
        s, lg = self._clamped(small_lp), self._clamped(large_lp)
        if self.variant == "paper":
            x = (
                self.bias
                + ((s - self.floor)[..., None] * self.small_in(small_ids.long())).sum(1)
                + ((lg - self.floor)[..., None] * self.large_in(large_ids.long())).sum(1)
            )
        else:
            s_sorted = s.sort(dim=-1, descending=True).values / -self.floor  # in [-1, 0]
            l_sorted = lg.sort(dim=-1, descending=True).values / -self.floor
            feats = torch.cat([s_sorted, l_sorted, topk_entropy(s)[:, None], topk_entropy(lg)[:, None]], dim=-1)
            x = self.first(feats)
        return self.head(x).squeeze(-1)

    def weight(self, small_ids, small_lp, large_ids, large_lp) -> torch.Tensor:
        """w_small in (0, 1) per row -> [B]."""
        return torch.sigmoid(self.logit(small_ids, small_lp, large_ids, large_lp))

    def config(self) -> dict:
        return {"variant": self.variant, "k": self.k, "vocab": self.vocab, "hidden": self.hidden, "floor": self.floor}


def save(net: FusionNet, path: str | Path, meta: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"format": CHECKPOINT_FORMAT, "config": net.config(), "meta": meta or {}, "state_dict": net.state_dict()}, path
    )
    return path


def load(path: str | Path, k: int | None = None, vocab: int | None = None) -> tuple[FusionNet, dict]:
    """Load a checkpoint; ``k``/``vocab``: what the running setup uses (checked against the net)."""
    path = Path(path)
    hint = "train one with `cogenesis train-fusion --data PATH --out PATH`"
    if not path.is_file():
        raise ConfigError(f"fusion checkpoint {path} does not exist", hint=hint)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{path} is not a fusion checkpoint ({type(exc).__name__}: {exc})", hint=hint) from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint", hint=hint)
    net = FusionNet(**blob["config"])
    net.load_state_dict(blob["state_dict"])
    net.eval()
    if k is not None and k != net.k:
        raise ConfigError(
            f"{path} was trained on the cloud's top-{net.k}, this run uses top-{k}",
            hint=f"run with --top-k {net.k}, or retrain with --top-k {k}",
        )
    if vocab is not None and net.vocab and vocab != net.vocab:
        raise ConfigError(
            f"{path} was trained for a vocabulary of {net.vocab}, these models have {vocab}",
            hint="retrain the fusion network for this model pair",
        )
    return net, blob.get("meta", {})


class Fuser:
    """A device's fusion, built once from its ``FusionConfig`` (loads the network for ``learned``)."""

    def __init__(self, cfg, k: int, vocab: int | None = None) -> None:
        self.cfg = cfg
        self.net = load(cfg.checkpoint, k=k, vocab=vocab)[0] if cfg.method == "learned" else None

    @property
    def needs_plain(self) -> bool:
        """Whether the device must also run its small model without the private context."""
        return self.cfg.method == "contrast"

    def __call__(
        self,
        small_lp: torch.Tensor,
        large_ids: torch.Tensor,
        large_lp: torch.Tensor,
        plain_lp: torch.Tensor | None = None,
        restrict: bool = True,
    ) -> torch.Tensor:
        from cogenesis.core.fusion import fuse

        c = self.cfg
        return fuse(
            c.method,
            small_lp,
            large_ids,
            large_lp,
            weight=c.weight,
            floor=c.floor,
            alpha=c.alpha,
            plain_lp=plain_lp,
            net=self.net,
            restrict=restrict,
        )
