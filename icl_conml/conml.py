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

How probes and views become tokens (one forward pass, no loop over tasks or views):
- The anchor is a probe token appended to the main sequence. It sees the whole context and
  has position id 2n, exactly what it would have in [context, u]; since the model is causal,
  the context's own predictions are unchanged.
- Prefix views (``prefix_half``) are probe tokens appended the same way, seeing only the
  first 2h context tokens, with position id 2h: identical to running [first h pairs, u] as
  its own sequence.
- Other views (subsets, shuffles) are real extra tokens: each view's pairs, re-interleaved
  with positions 0..2s-1 and followed by its probes, packed after the main sequence in the
  same row, with a block mask so it sees nothing else. This equals running the view as its
  own sequence. (Probing a subset through a mask over the original tokens would not: those
  tokens' hidden states have already attended to the pairs left out of the view.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REPRESENTATIONS = ("probe_output", "probe_hidden")
VIEWS = ("prefix_half", "random_subset", "shuffle", "shuffled_subset")
DISTANCES = ("sigmoid_sq", "cosine", "sq_euclidean")
LOSSES = ("difference", "infonce")
TERMS = ("both", "in", "out")
PREFIX_MODES = ("probe_mask", "extra_sequence")


# ---- sampling --------------------------------------------------------------------------------
def sample_probes(num_probes: int, n_dims: int, generator: torch.Generator) -> torch.Tensor:
    """M probe inputs u ~ N(0, I_d), shape (M, d); drawn once per step for the whole batch."""
    return torch.randn(num_probes, n_dims, generator=generator)


def view_size(
    kind: str, n_points: int, subset_min: float, subset_max: float, generator: torch.Generator
) -> int:
    """Number of pairs in each view this step (the same for every task, so views batch)."""
    if kind == "prefix_half":
        return n_points // 2
    if kind == "shuffle":
        return n_points
    low = max(1, round(subset_min * n_points))
    high = max(low, min(n_points, round(subset_max * n_points)))
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def sample_views(
    kind: str,
    n_tasks: int,
    n_points: int,
    num_views: int,
    generator: torch.Generator,
    subset_min: float = 0.5,
    subset_max: float = 0.5,
) -> torch.Tensor:
    """Pair indices of each view, shape (B, K, s), in the order the view presents them.

    ``prefix_half``: the first ⌊n/2⌋ pairs. ``random_subset``: a random subset of size
    s ∈ [subset_min·n, subset_max·n] kept in its original order. ``shuffle``: all pairs in a
    random order. ``shuffled_subset``: a random subset in a random order.
    """
    if kind not in VIEWS:
        raise ValueError(f"unknown conml_views {kind!r}; choose one of {VIEWS}")
    size = view_size(kind, n_points, subset_min, subset_max, generator)
    if kind == "prefix_half":
        return torch.arange(size).expand(n_tasks, num_views, size).contiguous()
    order = torch.rand(n_tasks, num_views, n_points, generator=generator).argsort(dim=-1)[..., :size]
    return order.sort(dim=-1).values if kind == "random_subset" else order


# ---- tokens ------------------------------------------------------------------------------------
@dataclass
class ProbeLayout:
    """Tokens appended after the main context, and where the representations are read.

    ``tokens`` (B, P, d) are read-in inputs, ``position_ids`` (P,) their positions,
    ``visible`` (P, 2n + P) says which of [context, appended] tokens each one attends to.
    ``anchor_slots`` (M,) and ``view_slots`` (K, M) index the probe tokens among the P.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    visible: torch.Tensor
    anchor_slots: torch.Tensor
    view_slots: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of ``ICLModel.forward`` that append these tokens."""
        return {
            "appended_tokens": self.tokens,
            "appended_position_ids": self.position_ids,
            "appended_visible": self.visible,
        }


def interleave(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """[x_1, (y_1, 0, …), x_2, …]: shape (B, 2n, d); y is zero-padded to the width of x."""
    y_tokens = torch.zeros_like(xs)
    y_tokens[..., 0] = ys.to(xs.dtype)
    return torch.stack((xs, y_tokens), dim=2).flatten(1, 2)


def build_layout(
    xs: torch.Tensor,
    ys: torch.Tensor,
    probes: torch.Tensor,
    view_index: torch.Tensor,
    view_kind: str,
    prefix_mode: str = "probe_mask",
) -> ProbeLayout:
    """Appended tokens for the anchor and K views of every task; see the module docstring.

    xs (B, n, d), ys (B, n), probes (B, M, d) (the same probes in every row), view_index
    (B, K, s) from ``sample_views``.
    """
    batch, n_points, _ = xs.shape
    num_views, size = view_index.shape[1], view_index.shape[2]
    num_probes = probes.shape[1]
    context = 2 * n_points
    device = xs.device

    pieces: list[torch.Tensor] = [probes]  # anchor probes first
    positions: list[torch.Tensor] = [torch.full((num_probes,), context, device=device)]
    # Per appended token: how many context tokens it sees, its segment id (-1: none), is it a probe.
    context_seen: list[int] = [context] * num_probes
    segment: list[int] = [-1] * num_probes
    is_probe: list[bool] = [True] * num_probes
    anchor_slots = torch.arange(num_probes, device=device)
    view_slots = torch.empty(num_views, num_probes, dtype=torch.long, device=device)

    masked_prefix = view_kind == "prefix_half" and prefix_mode == "probe_mask"
    for k in range(num_views):  # K is small (a handful): this loop builds a layout, not data
        start = sum(piece.shape[1] for piece in pieces)
        if masked_prefix:
            pieces.append(probes)
            positions.append(torch.full((num_probes,), 2 * size, device=device))
            context_seen += [2 * size] * num_probes
            segment += [-1] * num_probes
            is_probe += [True] * num_probes
            view_slots[k] = torch.arange(start, start + num_probes, device=device)
            continue
        idx = view_index[:, k]  # (B, s)
        view_xs = torch.gather(xs, 1, idx.unsqueeze(-1).expand(-1, -1, xs.shape[-1]))
        view_ys = torch.gather(ys, 1, idx)
        pieces += [interleave(view_xs, view_ys), probes]
        positions += [
            torch.arange(2 * size, device=device),
            torch.full((num_probes,), 2 * size, device=device),
        ]
        context_seen += [0] * (2 * size + num_probes)
        segment += [k] * (2 * size + num_probes)
        is_probe += [False] * (2 * size) + [True] * num_probes
        view_slots[k] = torch.arange(start + 2 * size, start + 2 * size + num_probes, device=device)

    tokens = torch.cat([piece.to(xs.dtype) for piece in pieces], dim=1)
    appended = tokens.shape[1]
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
    return ProbeLayout(
        tokens=tokens,
        position_ids=torch.cat(positions),
        visible=torch.cat([sees_context, sees_appended], dim=1),
        anchor_slots=anchor_slots,
        view_slots=view_slots,
    )


def representations(
    appended_outputs: torch.Tensor,
    appended_hidden: torch.Tensor,
    layout: ProbeLayout,
    kind: str = "probe_output",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor (B, D) and view (B, K, D) representations read at the probe tokens.

    ``probe_output``: the read-out prediction at each of the M probes (D = M).
    ``probe_hidden``: the last hidden state at each probe, concatenated (D = M · n_embd).
    """
    if kind == "probe_output":
        source = appended_outputs.unsqueeze(-1)
    elif kind == "probe_hidden":
        source = appended_hidden
    else:
        raise ValueError(f"unknown conml_representation {kind!r}; choose one of {REPRESENTATIONS}")
    anchor = source[:, layout.anchor_slots].flatten(1)
    views = source[:, layout.view_slots].flatten(2)
    return anchor.float(), views.float()


# ---- distances and the objective ---------------------------------------------------------------
def distance(a: torch.Tensor, b: torch.Tensor, kind: str = "sigmoid_sq") -> torch.Tensor:
    """φ(a, b) over the last dimension (broadcasting the others).

    ``sigmoid_sq``: mean_i sigmoid((a_i − b_i)²) (the paper's ICL choice; 1/2 when a = b).
    ``cosine``: 1 − cos(a, b). ``sq_euclidean``: mean_i (a_i − b_i)².
    """
    if kind == "sigmoid_sq":
        return torch.sigmoid((a - b).square()).mean(-1)
    if kind == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)
    if kind == "sq_euclidean":
        return (a - b).square().mean(-1)
    raise ValueError(f"unknown conml_distance {kind!r}; choose one of {DISTANCES}")


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
