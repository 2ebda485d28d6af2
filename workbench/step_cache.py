"""Step caching (TeaCache / first-block-cache family): reuse the last residual while the input barely moves.

At every sampler evaluation the transformer's first block modulates its image tokens (``norm1``: adaLN of the
patch embedding with the step's conditioning). When that modulated input has changed little since the last full
evaluation, the block stack would change the tokens much as it did then, so the cache returns
``tokens + residual`` of that evaluation instead of running the blocks (the final norm and projection still run).

Decision (TeaCache, Liu et al. 2024, without its model-fitted polynomial rescaling): with ``m_i`` the modulated
input ``(B, N, dim)`` of evaluation i, ``d_i = mean|m_i − m_{i−1}| / mean|m_{i−1}|`` (relative L1 over the whole
batch: a CFG batch [negative; positive] is decided as a whole). The distances are summed since the last full
evaluation; while the sum stays below ``threshold`` the evaluation is skipped, otherwise it is computed and the sum
restarts at 0. The first evaluation and the evaluations at the ``always`` sigmas (the pipeline passes the first and
last step's) are always computed. ``threshold`` 0 computes everything through the same code path as no cache.

The cached residual is ``blocks(tokens) − tokens`` ``(B, N, dim)``, the image stream after the last block minus its
input. Each batch shape keeps its own state (a positive-only pass outside the guidance interval has half the rows).
Skip-layer guidance passes do not use the cache. Evaluation indices are the sampler's velocity calls (one per step
for euler and dpmpp_2m; two per step for heun, as in :class:`workbench.models.moe.RoutingRecord`). ControlNet
residuals are computed lazily (:class:`workbench.controlnet.LazyControls`), so a skipped evaluation runs no ControlNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float; ValueError unless it is a finite number ≥ 0."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"cache_threshold must be a finite number >= 0, got {threshold!r}")
    if threshold < 0:
        raise ValueError(f"cache_threshold must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|current − previous| / mean|previous|`` over all elements, in float32 (0 when ``previous`` is 0)."""
    scale = float(previous.float().abs().mean())
    change = float((current.float() - previous.float()).abs().mean())
    return change / scale if scale > 0 else (0.0 if change == 0 else math.inf)


@dataclass
class _State:
    """One batch shape's memory: the previous modulated input, the summed distance and the cached residual."""

    modulated: torch.Tensor
    residual: torch.Tensor
    distance: float = 0.0


@dataclass
class StepCache:
    """A generation's step cache (see the module docstring). Attach it to the transformer
    (``MMDiT.step_cache``) and route the sampler's velocity function through :meth:`velocity`.

    ``computed`` and ``skipped`` count transformer block-stack runs and reuses; ``skipped_steps`` lists the
    evaluation indices (velocity calls) at which the residual was reused."""

    threshold: float = 0.0
    always: Collection[float] = ()
    computed: int = 0
    skipped: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    _index: int = -1
    _sigma: float | None = None
    _states: dict[tuple[int, ...], _State] = field(default_factory=dict)
    _pending: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.threshold = check_threshold(self.threshold)
        self.always = frozenset(float(s) for s in self.always)

    def velocity(self, fn: VelocityFn) -> VelocityFn:
        """``fn`` with each call marked as one evaluation at its σ (the decision's step)."""

        def call(x: torch.Tensor, sigma: float) -> torch.Tensor:
            self._index += 1
            self._sigma = float(sigma)
            return fn(x, sigma)

        return call

    def reuse(self, tokens: torch.Tensor, modulated: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """``tokens + residual`` ``(B, N, dim)`` of the last full evaluation when the cache skips this one, else
        None: then the caller runs the block stack and hands its output to :meth:`store`. ``modulated()`` returns
        the first block's modulated image input ``(B, N, dim)``; it is called only with a positive threshold."""
        self._pending = None
        if self.threshold == 0:
            return None
        current = modulated()
        key = tuple(tokens.shape)
        state = self._states.get(key)
        forced = state is None or self._sigma is None or self._sigma in self.always
        if not forced:
            state.distance += relative_l1(current, state.modulated)
            state.modulated = current
            if state.distance < self.threshold:
                self.skipped += 1
                if not self.skipped_steps or self.skipped_steps[-1] != self._index:
                    self.skipped_steps.append(self._index)
                return tokens + state.residual
        self._pending = current
        return None

    def store(self, tokens: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Count a full evaluation of ``tokens`` → ``out`` (both ``(B, N, dim)``), remember its residual when the
        threshold is positive, and return ``out``."""
        self.computed += 1
        if self._pending is not None:
            self._states[tuple(tokens.shape)] = _State(self._pending, out - tokens)
            self._pending = None
        return out
