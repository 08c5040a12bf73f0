"""ConML for in-context learning: the contrastive meta-objective, as pure tensor functions.

Wu et al., "Learning to Learn with Contrastive Meta-Objective" (arXiv 2410.05975). For a
batch of tasks τ, a representation e = ψ(g(D; θ)) of what the model learned from data D is
read at a probe input u appended after the context:

    anchor  e*_τ   from the whole context,          views  e^k_τ from K views of it,
    d_in  = mean_τ mean_k φ(e^k_τ, e*_τ)             (alignment),
    d_out = mean_{τ ≠ τ'} φ(e*_τ, e*_τ')             (discrimination),
    loss  = d_in − d_out                             (``difference``, the paper), or InfoNCE.

τ ≠ τ' ranges over pairs of *distinct tasks*: batch rows are different tasks unless they carry
the same ``task_ids`` (a finite task pool smaller than the batch), and two rows of one task are
neither a d_out pair nor an InfoNCE negative of each other.

The total training loss is ``icl_loss + λ · loss``. The paper's ICL setting is the default:
one probe u ~ N(0, I) per step shared by all tasks, the read-out at u as representation, one
view = the first ⌊n/2⌋ pairs, φ(a, b) = sigmoid((a − b)²) averaged over dimensions, λ = 0.02.
Note that sigmoid_sq is 1/2 for identical representations (the paper's φ, kept exactly);
the constant cancels in d_in − d_out.

How probes and views become tokens (one model forward, no loop over tasks or views):
- The anchor is a probe token appended to the main sequence. It sees the whole context and
  has position id 2n, exactly what it would have in [context, u]; since the model is causal,
  the context's own predictions are unchanged.
- Prefix views (``prefix_half``) are probe tokens appended the same way, seeing only the
  first 2h context tokens, with position id 2h: identical to running [first h pairs, u] as
  its own sequence.
- Other views (subsets, shuffles) are real extra tokens: each view's pairs, re-interleaved
  with positions 0..2s-1 and followed by its probes, a sequence that sees nothing else. The
  layout lists them after the anchor. A view as long as the context (a shuffle) runs as its
  own batch row, in the same backbone call as the main rows (``ProbeLayout.rows``), which
  costs less than packing it after the main sequence, where attention grows with the square
  of the row's length; a shorter view (a subset) is packed after the main sequence in the
  same row, behind a block mask, which at these sizes costs less than a second backbone call.
  Either way this equals running the view as its own sequence. (Probing a subset through a
  mask over the original tokens would not: those tokens' hidden states have already attended
  to the pairs left out.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from .registry import Registry, takes_positional

# The fixed choices, as types (recipes check them and --help lists them: arguments.ConMLArguments).
Loss = Literal["difference", "infonce"]
Terms = Literal["both", "in", "out"]
PrefixMode = Literal["probe_mask", "extra_sequence"]
LOSSES: tuple[str, ...] = get_args(Loss)
TERMS: tuple[str, ...] = get_args(Terms)
PREFIX_MODES: tuple[str, ...] = get_args(PrefixMode)

# The extension points: each a registry, named in a recipe by registered name or import path.
# A view sampler: (n_tasks, n_points, num_views, generator, subset_min, subset_max) -> pair
# indices (B, K, s) in the order the view presents them, s the same for every task and view.
ViewSampler = Callable[[int, int, int, torch.Generator, float, float], torch.Tensor]
VIEWS: Registry[ViewSampler] = Registry(
    "conml_views",
    takes_positional(6),
    "a view sampler f(n_tasks, n_points, num_views, generator, subset_min, subset_max)",
)
# A distance φ(a, b) over the last dimension, broadcasting the others.
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DISTANCES: Registry[Distance] = Registry("conml_distance", takes_positional(2), "a distance f(a, b)")
# A representation: (appended_outputs (B, P), appended_hidden (B, P, E)) -> (B, P, D), read at the probes.
Representation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
REPRESENTATIONS: Registry[Representation] = Registry(
    "conml_representation", takes_positional(2), "a representation f(appended_outputs, appended_hidden)"
)


def register_view(name: str, prefix: bool = False) -> Callable[[ViewSampler], ViewSampler]:
    """Register a view sampler as ``conml_views: name`` (``prefix=True``: it returns leading pairs)."""
    return VIEWS.register(name, prefix=prefix)


def register_distance(name: str) -> Callable[[Distance], Distance]:
    """Register φ as ``conml_distance: name``; it must broadcast over leading dimensions."""
    return DISTANCES.register(name)


def register_representation(name: str) -> Callable[[Representation], Representation]:
    """Register what a probe reads as ``conml_representation: name``."""
    return REPRESENTATIONS.register(name)


# ---- sampling --------------------------------------------------------------------------------
def sample_probes(num_probes: int, n_dims: int, generator: torch.Generator) -> torch.Tensor:
    """M probe inputs u ~ N(0, I_d), shape (M, d); drawn once per step for the whole batch."""
    return torch.randn(num_probes, n_dims, generator=generator)


def subset_size(n_points: int, subset_min: float, subset_max: float, generator: torch.Generator) -> int:
    """A view size s ∈ [subset_min·n, subset_max·n] drawn for this step (the same for every task)."""
    low = max(1, round(subset_min * n_points))
    high = max(low, min(n_points, round(subset_max * n_points)))
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _random_orders(n_tasks: int, num_views: int, n_points: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n_tasks, num_views, n_points, generator=generator).argsort(dim=-1)


@register_view("prefix_half", prefix=True)
def prefix_half(n_tasks, n_points, num_views, generator, subset_min=0.5, subset_max=0.5) -> torch.Tensor:
    """The first ⌊n/2⌋ pairs (the paper's view)."""
    size = n_points // 2
    return torch.arange(size).expand(n_tasks, num_views, size).contiguous()


@register_view("random_subset")
def random_subset(n_tasks, n_points, num_views, generator, subset_min=0.5, subset_max=0.5) -> torch.Tensor:
    """A random subset of the pairs, kept in their original order."""
    size = subset_size(n_points, subset_min, subset_max, generator)
    return _random_orders(n_tasks, num_views, n_points, generator)[..., :size].sort(dim=-1).values


@register_view("shuffle")
def shuffle(n_tasks, n_points, num_views, generator, subset_min=0.5, subset_max=0.5) -> torch.Tensor:
    """All pairs in a random order."""
    return _random_orders(n_tasks, num_views, n_points, generator)


@register_view("shuffled_subset")
def shuffled_subset(n_tasks, n_points, num_views, generator, subset_min=0.5, subset_max=0.5) -> torch.Tensor:
    """A random subset of the pairs in a random order."""
    size = subset_size(n_points, subset_min, subset_max, generator)
    return _random_orders(n_tasks, num_views, n_points, generator)[..., :size]


def sample_views(
    kind: str,
    n_tasks: int,
    n_points: int,
    num_views: int,
    generator: torch.Generator,
    subset_min: float = 0.5,
    subset_max: float = 0.5,
) -> torch.Tensor:
    """Pair indices of each view, shape (B, K, s), from the sampler ``kind`` names (a registered
    name, or an import path the recipe already resolved)."""
    sampler = VIEWS.resolve(kind, allow_import=False)
    return sampler(n_tasks, n_points, num_views, generator, subset_min, subset_max)


# ---- tokens ------------------------------------------------------------------------------------
@dataclass
class ProbeLayout:
    """Tokens appended after the main context, and where the representations are read.

    ``tokens`` (B, P, d) are read-in inputs; everything else depends only on the sizes and is
    shared between steps (``LayoutStructure``: treat it as read-only): ``position_ids`` (P,) the
    tokens' positions, ``visible`` (P, 2n + P) which of [context, appended] tokens each one
    attends to, ``anchor_slots`` (M,) and ``view_slots`` (K, M) the probe tokens among the P, and
    ``rows`` = (offset, length), when set: the appended tokens from ``offset`` on are K
    independent sequences of ``length`` tokens each (the views: they see nothing else), which
    the model may run as their own batch rows instead of behind a block mask in the main row;
    the result is the same (see ``ICLModel.forward``), and the P slots keep their meaning.
    """

    tokens: torch.Tensor
    structure: LayoutStructure

    def model_inputs(self) -> dict[str, Any]:
        """The keyword arguments of ``ICLModel.forward`` that append these tokens."""
        return {"appended_tokens": self.tokens, "appended_layout": self.structure}

    @property
    def position_ids(self) -> torch.Tensor:
        return self.structure.position_ids

    @property
    def visible(self) -> torch.Tensor:
        return self.structure.visible

    @property
    def anchor_slots(self) -> torch.Tensor:
        return self.structure.anchor_slots

    @property
    def view_slots(self) -> torch.Tensor:
        return self.structure.view_slots

    @property
    def rows(self) -> tuple[int, int] | None:
        return self.structure.rows

    @property
    def tokens_per_task(self) -> int:
        """Tokens of one task the backbone processes: the 2n context tokens and the P appended."""
        return self.visible.shape[1]


def interleave(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """[x_1, (y_1, 0, …), x_2, …]: shape (B, 2n, d); y is zero-padded to the width of x."""
    y_tokens = torch.zeros_like(xs)
    y_tokens[..., 0] = ys.to(xs.dtype)
    return torch.stack((xs, y_tokens), dim=2).flatten(1, 2)


# ---- the attention plan of appended tokens --------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """How one kind of batch row runs: its position ids (L,) and additive mask (1, 1, L, L), or
    ``None`` for both when the row is a plain causal sequence (the backbone's own default, which
    keeps sdpa on its causal fast path)."""

    length: int
    position_ids: torch.Tensor | None
    mask: torch.Tensor | None

    def same_as(self, other: Segment) -> bool:
        if self.length != other.length or (self.mask is None) != (other.mask is None):
            return False
        return self.mask is None or (
            torch.equal(self.mask, other.mask) and torch.equal(self.position_ids, other.position_ids)
        )

    def inputs(self, rows: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(position_ids, attention_mask) for ``rows`` batch rows of this kind."""
        if self.mask is None:
            return None, None
        return self.position_ids.expand(rows, -1), self.mask.expand(rows, 1, -1, -1)


@dataclass(frozen=True)
class AttentionPlan:
    """The main rows' segment; with ``rows``, the view rows' too, and whether both kinds run in
    one backbone call (same length and structure) or in two."""

    main: Segment
    rows: Segment | None = None
    joined: bool = False


def attention_plan(
    context: int,
    position_ids: torch.Tensor,
    visible: torch.Tensor,
    rows: tuple[int, int] | None,
    dtype: torch.dtype,
) -> AttentionPlan:
    """Position ids and additive masks (in ``dtype``) of a layout's rows (``ProbeLayout`` fields).

    Without ``rows``: one row of context + appended tokens; the context is causal and sees no
    appended token, appended tokens see what ``visible`` allows (a boolean 4D mask gives wrong
    results under GPT-2's eager attention, so the additive form is used).

    With ``rows = (offset, length)``: the main rows hold the context and the first ``offset``
    appended tokens; the rest are K sequences of ``length`` tokens, each seen by nothing else and
    seeing nothing else (checked here), which run as K extra rows per task. A row is the same
    computation as the corresponding tokens behind the block mask, minus the attention scores
    that the mask would have thrown away.
    """
    device = visible.device
    positions = torch.cat([torch.arange(context, device=device), position_ids])
    if rows is None:
        mask = _mask_from_allowed(_allowed(context, visible), dtype)
        return AttentionPlan(main=Segment(positions.shape[0], positions, mask))

    offset, length = rows
    total = context + visible.shape[0]
    main_length = context + offset
    num_rows, remainder = divmod(total - main_length, length)
    if remainder or num_rows < 1 or visible.shape[1] != total:
        raise ValueError(f"appended_rows={rows} does not split {total - context} appended tokens into rows")
    allowed = _allowed(context, visible)
    main_allowed = allowed[:main_length, :main_length]
    row_allowed = allowed[main_length : main_length + length, main_length : main_length + length]
    row_positions = positions[main_length : main_length + length]
    expected = torch.block_diag(main_allowed, *[row_allowed] * num_rows)
    if not torch.equal(allowed, expected) or not torch.equal(
        positions[main_length:], row_positions.repeat(num_rows)
    ):
        raise ValueError(
            f"appended_rows={rows}: the appended tokens after {offset} are not independent "
            f"sequences of {length} tokens with equal positions and visibility"
        )
    main = _segment(positions[:main_length], main_allowed, dtype)
    row = _segment(row_positions, row_allowed, dtype)
    return AttentionPlan(main=main, rows=row, joined=main.same_as(row))


def _segment(position_ids: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype) -> Segment:
    length = position_ids.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool, device=allowed.device).tril()
    if torch.equal(allowed, causal) and torch.equal(
        position_ids, torch.arange(length, device=position_ids.device)
    ):
        return Segment(length, None, None)
    return Segment(length, position_ids, _mask_from_allowed(allowed, dtype))


def _allowed(context: int, visible: torch.Tensor) -> torch.Tensor:
    """(L, L) bool: the context is causal and sees no appended token; appended tokens see what
    ``visible`` (P, context + P) allows."""
    appended = visible.shape[0]
    total = context + appended
    allowed = torch.zeros(total, total, dtype=torch.bool, device=visible.device)
    allowed[:context, :context] = torch.ones(context, context, dtype=torch.bool, device=allowed.device).tril()
    allowed[context:] = visible
    return allowed


def _mask_from_allowed(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, L, L) float mask: 0 where attention is allowed, the dtype's minimum elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


# ---- the layout's structure: built once per size, with its attention plans ----------------------------
@dataclass(frozen=True)
class LayoutStructure:
    """The part of a layout that depends only on its sizes (not on the data): built once, and
    with it the attention plan for each dtype the model asks for (one cache for both)."""

    context: int
    position_ids: torch.Tensor
    visible: torch.Tensor
    anchor_slots: torch.Tensor
    view_slots: torch.Tensor
    rows: tuple[int, int] | None
    plans: dict[torch.dtype, AttentionPlan] = field(default_factory=dict, compare=False, repr=False)

    @torch.compiler.disable
    def attention_plan(self, dtype: torch.dtype) -> AttentionPlan:
        """``attention_plan`` of this structure in ``dtype``, built on first use."""
        plan = self.plans.get(dtype)
        if plan is None:
            with torch.inference_mode(False):  # a cached plan must also serve later training steps
                plan = attention_plan(self.context, self.position_ids, self.visible, self.rows, dtype)
            self.plans[dtype] = plan
        return plan


@functools.lru_cache(maxsize=64)
def _layout_structure(
    n_points: int,
    size: int,
    num_probes: int,
    num_views: int,
    masked_prefix: bool,
    view_rows: bool | None,
    device: torch.device,
) -> LayoutStructure:
    """Positions, visibility, probe slots and row split of the appended tokens (see ``build_layout``).

    Cached: a run sees a handful of (n, s) pairs (one per curriculum stage and view size), and
    rebuilding this from Python lists on every step showed in the step's profile.
    """
    with torch.inference_mode(False):  # cached tensors must also serve later training steps
        context = 2 * n_points
        # Per appended token: how many context tokens it sees, its segment id (-1: none), is it a probe.
        positions: list[torch.Tensor] = [torch.full((num_probes,), context, device=device)]
        context_seen: list[int] = [context] * num_probes
        segment: list[int] = [-1] * num_probes
        is_probe: list[bool] = [True] * num_probes
        anchor_slots = torch.arange(num_probes, device=device)
        view_slots = torch.empty(num_views, num_probes, dtype=torch.long, device=device)
        start = num_probes
        for k in range(num_views):  # K is small (a handful): this loop builds a layout, not data
            if masked_prefix:
                positions.append(torch.full((num_probes,), 2 * size, device=device))
                context_seen += [2 * size] * num_probes
                segment += [-1] * num_probes
                is_probe += [True] * num_probes
                view_slots[k] = torch.arange(start, start + num_probes, device=device)
                start += num_probes
                continue
            positions += [
                torch.arange(2 * size, device=device),
                torch.full((num_probes,), 2 * size, device=device),
            ]
            context_seen += [0] * (2 * size + num_probes)
            segment += [k] * (2 * size + num_probes)
            is_probe += [False] * (2 * size) + [True] * num_probes
            view_slots[k] = torch.arange(start + 2 * size, start + 2 * size + num_probes, device=device)
            start += 2 * size + num_probes

        appended = start
        # Views run as their own batch rows where that is cheaper: when they are as long as the
        # main rows (shuffles), both kinds share one backbone call. Shorter views stay behind the
        # block mask: a second backbone call cost more than the attention it saves on the
        # quickstart model (docs/benchmarks.md); ``view_rows=True`` asks for rows anyway.
        use_rows = not masked_prefix and num_views > 0 and view_rows is not False
        if view_rows is None:
            use_rows = use_rows and size == n_points
        seen = torch.tensor(context_seen, device=device)
        seg = torch.tensor(segment, device=device)
        probe = torch.tensor(is_probe, device=device)
        sees_context = torch.arange(context, device=device)[None, :] < seen[:, None]
        j = torch.arange(appended, device=device)
        # Within a segment, causal over the view's pair tokens; probes never see other probes.
        same_segment = (
            (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0) & (j[None, :] < j[:, None]) & ~probe[None, :]
        )
        sees_appended = same_segment | torch.eye(appended, dtype=torch.bool, device=device)
        return LayoutStructure(
            context=context,
            position_ids=torch.cat(positions),
            visible=torch.cat([sees_context, sees_appended], dim=1),
            anchor_slots=anchor_slots,
            view_slots=view_slots,
            rows=(num_probes, 2 * size + num_probes) if use_rows else None,
        )


def build_layout(
    xs: torch.Tensor,
    ys: torch.Tensor,
    probes: torch.Tensor,
    view_index: torch.Tensor,
    view_kind: str,
    prefix_mode: str = "probe_mask",
    view_rows: bool | None = None,
) -> ProbeLayout:
    """Appended tokens for the anchor and K views of every task; see the module docstring.

    xs (B, n, d), ys (B, n), probes (B, M, d) (the same probes in every row), view_index
    (B, K, s) from ``sample_views``. The tokens are gathered every step; their positions,
    visibility and slots come from a cache keyed by the sizes. ``view_rows`` (views that are
    real tokens only): ``None`` runs them as their own batch rows when they are as long as the
    main rows, ``True`` always, ``False`` never (packed behind the block mask); the results are
    the same up to float rounding.
    """
    batch, n_points, width = xs.shape
    num_views, size = view_index.shape[1], view_index.shape[2]
    num_probes = probes.shape[1]
    masked_prefix = VIEWS.options(view_kind).get("prefix", False) and prefix_mode == "probe_mask"
    structure = _layout_structure(n_points, size, num_probes, num_views, masked_prefix, view_rows, xs.device)

    probes = probes.to(xs.dtype)
    if masked_prefix:  # anchor probes, then the probes of each view: no other tokens
        tokens = torch.cat([probes] * (1 + num_views), dim=1)
    else:  # anchor probes, then each view: its pairs re-interleaved, followed by the probes
        idx = view_index.reshape(batch, num_views * size)
        view_xs = torch.gather(xs, 1, idx.unsqueeze(-1).expand(-1, -1, width))
        view_ys = torch.gather(ys, 1, idx)
        pairs = interleave(view_xs.reshape(batch * num_views, size, width), view_ys.reshape(-1, size))
        view_probes = probes.unsqueeze(1).expand(-1, num_views, -1, -1)
        views = torch.cat([pairs.reshape(batch, num_views, 2 * size, width), view_probes], dim=2)
        tokens = torch.cat([probes, views.flatten(1, 2)], dim=1)
    return ProbeLayout(tokens=tokens, structure=structure)


def representations(
    appended_outputs: torch.Tensor,
    appended_hidden: torch.Tensor,
    layout: ProbeLayout,
    kind: str = "probe_output",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor (B, D) and view (B, K, D) representations read at the probe tokens, by the
    representation ``kind`` names (a registered name, or an import path the recipe resolved)."""
    source = REPRESENTATIONS.resolve(kind, allow_import=False)(appended_outputs, appended_hidden)
    anchor = source[:, layout.anchor_slots].flatten(1)
    views = source[:, layout.view_slots].flatten(2)
    return anchor.float(), views.float()


@register_representation("probe_output")
def probe_output(appended_outputs: torch.Tensor, appended_hidden: torch.Tensor) -> torch.Tensor:
    """The read-out prediction at each of the M probes (D = M): the paper's."""
    return appended_outputs.unsqueeze(-1)


@register_representation("probe_hidden")
def probe_hidden(appended_outputs: torch.Tensor, appended_hidden: torch.Tensor) -> torch.Tensor:
    """The last hidden state at each probe, concatenated (D = M · n_embd)."""
    return appended_hidden


# ---- distances and the objective ---------------------------------------------------------------
@register_distance("sigmoid_sq")
def sigmoid_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean_i sigmoid((a_i − b_i)²): the paper's ICL choice; 1/2 when a = b, saturates at 1."""
    return torch.sigmoid((a - b).square()).mean(-1)


@register_distance("cosine")
def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 − cos(a, b)."""
    return 1 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)


@register_distance("sq_euclidean")
def sq_euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean_i (a_i − b_i)²: does not saturate on scalar outputs."""
    return (a - b).square().mean(-1)


def distance(a: torch.Tensor, b: torch.Tensor, kind: str = "sigmoid_sq") -> torch.Tensor:
    """φ(a, b) over the last dimension (broadcasting the others), by registered name (or an import
    path the recipe already resolved)."""
    return DISTANCES.resolve(kind, allow_import=False)(a, b)


def gather_across_processes(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All tasks' anchors (differentiable all-gather) and the offset of this process's rows."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local, 0
    from torch.distributed.nn.functional import all_gather

    gathered = all_gather(local.contiguous())
    return torch.cat(gathered, dim=0), dist.get_rank() * local.shape[0]


def gather_task_ids(local: torch.Tensor) -> torch.Tensor:
    """All processes' task ids (G,), in the order of ``gather_across_processes``; integers, so a
    plain (non-differentiable) all-gather."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


@dataclass
class ConMLTerms:
    loss: torch.Tensor
    d_in: torch.Tensor
    d_out: torch.Tensor


def conml_loss(
    anchor: torch.Tensor,
    views: torch.Tensor,
    all_anchors: torch.Tensor | None = None,
    offset: int = 0,
    distance_kind: str = "sigmoid_sq",
    loss_kind: str = "difference",
    terms: str = "both",
    temperature: float = 0.1,
    task_ids: torch.Tensor | None = None,
    all_task_ids: torch.Tensor | None = None,
) -> ConMLTerms:
    """d_in, d_out and the ConML loss for local anchors (B, D) and views (B, K, D).

    ``all_anchors`` (G, D) are the negatives: every task of the global batch, with this
    process's tasks at rows ``offset .. offset + B``. Averaging this process's loss over
    processes gives the loss of one process holding the whole batch.

    ``task_ids`` (B,) and ``all_task_ids`` (G,) say which rows are the same task (a task pool
    sampled with replacement): every pair of equal ids, not only a row with itself, is left out
    of d_out and out of the InfoNCE negatives. d_out is then the mean over the N pairs of the
    global batch with distinct ids; this process contributes its rows' sum × (G / B) / N, so
    the average over processes is still that mean. With no such pair (one task in the whole
    batch) d_out is 0. Without ids every row is its own task.
    """
    all_anchors = anchor if all_anchors is None else all_anchors
    batch, total = anchor.shape[0], all_anchors.shape[0]
    if total < 2:
        raise ValueError("ConML needs at least 2 tasks in the (global) batch for d_out")
    d_in = distance(views, anchor.unsqueeze(1), distance_kind).mean()
    pairwise = distance(anchor.unsqueeze(1), all_anchors.unsqueeze(0), distance_kind)  # (B, G)
    own = torch.arange(batch, device=anchor.device) + offset
    if task_ids is None:
        others = torch.ones_like(pairwise, dtype=torch.bool)
        others[torch.arange(batch, device=anchor.device), own] = False
        d_out = pairwise[others].mean()
    else:
        all_task_ids = task_ids if all_task_ids is None else all_task_ids
        others = task_ids[:, None] != all_task_ids[None, :]  # (B, G); False on the diagonal too
        pairs = (all_task_ids[:, None] != all_task_ids[None, :]).sum().clamp(min=1)  # no host sync
        d_out = (pairwise * others).sum() * (total / batch) / pairs

    if loss_kind == "difference":
        loss = {"both": d_in - d_out, "in": d_in, "out": -d_out}[terms]
    elif loss_kind == "infonce":
        # Each view must pick its own task's anchor among all anchors of the global batch.
        logits = (
            -distance(views.unsqueeze(2), all_anchors[None, None], distance_kind) / temperature
        )  # (B, K, G)
        if task_ids is not None:  # another row of the same task is no negative
            copies = ~others
            copies[torch.arange(batch, device=anchor.device), own] = False
            logits = logits.masked_fill(copies.unsqueeze(1), float("-inf"))
        target = own.unsqueeze(1).expand(-1, views.shape[1])
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    else:
        raise ValueError(f"unknown conml_loss {loss_kind!r}; choose one of {LOSSES}")
    return ConMLTerms(loss=loss, d_in=d_in.detach(), d_out=d_out.detach())
