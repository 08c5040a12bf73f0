"""The ConML objective: hand-computed values, views, probes, exactness of the one-forward layout."""

import math

import pytest
import torch

from icl_conml import conml
from icl_conml.data import ConMLSampling, Curriculum, PromptSampler
from icl_conml.tasks import get_task


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---- distances and loss forms, by hand ------------------------------------------------------------
def test_distances_by_hand():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert conml.distance(a, b, "sigmoid_sq").item() == pytest.approx((sigmoid(1) + sigmoid(4)) / 2)
    assert conml.distance(a, b, "sq_euclidean").item() == pytest.approx((1 + 4) / 2)
    cos = (0 + 8) / (math.sqrt(5) * 4)
    assert conml.distance(a, b, "cosine").item() == pytest.approx(1 - cos)
    # the paper's scalar case
    assert conml.distance(torch.tensor([3.0]), torch.tensor([1.0])).item() == pytest.approx(sigmoid(4))


def test_difference_loss_by_hand():
    anchor = torch.tensor([[0.0], [1.0], [3.0]])
    views = torch.tensor([[[0.0]], [[2.0]], [[3.0]]])  # K = 1
    terms = conml.conml_loss(anchor, views, distance_kind="sq_euclidean")
    d_in = (0 + 1 + 0) / 3
    pairs = [(0, 1), (0, 3), (1, 0), (1, 3), (3, 0), (3, 1)]
    d_out = sum((a - b) ** 2 for a, b in pairs) / 6
    assert terms.d_in.item() == pytest.approx(d_in)
    assert terms.d_out.item() == pytest.approx(d_out)
    assert terms.loss.item() == pytest.approx(d_in - d_out)
    assert conml.conml_loss(
        anchor, views, distance_kind="sq_euclidean", terms="in"
    ).loss.item() == pytest.approx(d_in)
    out_only = conml.conml_loss(anchor, views, distance_kind="sq_euclidean", terms="out")
    assert out_only.loss.item() == pytest.approx(-d_out)


def test_infonce_loss_by_hand():
    anchor = torch.tensor([[0.0], [2.0]])
    views = torch.tensor([[[0.5]], [[2.0]]])
    t = 0.5
    loss = conml.conml_loss(
        anchor, views, distance_kind="sq_euclidean", loss_kind="infonce", temperature=t
    ).loss
    logits = torch.tensor([[-0.25, -2.25], [-4.0, 0.0]]) / t
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(expected.item())


@pytest.mark.parametrize("kind", ["cosine", "sq_euclidean"])
def test_d_in_is_zero_when_views_equal_anchors(kind):
    anchor = torch.randn(4, 3)
    assert conml.conml_loss(
        anchor, anchor.unsqueeze(1).repeat(1, 2, 1), distance_kind=kind
    ).d_in.item() == pytest.approx(0, abs=1e-6)


def test_sigmoid_sq_is_the_papers_phi_with_its_half_at_equality():
    anchor = torch.randn(4, 1)
    terms = conml.conml_loss(anchor, anchor.unsqueeze(1), distance_kind="sigmoid_sq")
    assert terms.d_in.item() == pytest.approx(0.5)  # sigmoid(0); cancels in d_in - d_out


def test_cross_process_offset_excludes_own_task():
    everything = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    views = everything.unsqueeze(1) + 0.5
    whole = conml.conml_loss(everything, views, distance_kind="sq_euclidean")
    halves = [
        conml.conml_loss(everything[i : i + 2], views[i : i + 2], everything, i, distance_kind="sq_euclidean")
        for i in (0, 2)
    ]
    assert (halves[0].loss + halves[1].loss).item() / 2 == pytest.approx(whole.loss.item())
    assert (halves[0].d_out + halves[1].d_out).item() / 2 == pytest.approx(whole.d_out.item())


# ---- rows of the same task (a task pool smaller than the batch) ----------------------------------------
def pool_batch_ids() -> torch.Tensor:
    """Task ids of a real pool batch: 8 draws from a pool of 4 repeat some tasks."""
    task = get_task("linear_regression", 3)
    ids = PromptSampler(task, Curriculum.constant(3, 4), 8, seed=0, task_pool_size=4).global_batch(0)[
        "task_ids"
    ]
    assert ids.unique().numel() < 8
    return ids


def test_d_out_is_over_pairs_of_distinct_tasks_by_hand():
    ids = pool_batch_ids()
    anchor = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    views = anchor.unsqueeze(1) + 0.1
    terms = conml.conml_loss(anchor, views, distance_kind="sq_euclidean", task_ids=ids, all_task_ids=ids)
    pairs = [
        ((anchor[i] - anchor[j]).square().mean().item())
        for i in range(8)
        for j in range(8)
        if ids[i] != ids[j]
    ]
    assert len(pairs) < 8 * 7  # the copies' pairs are left out
    assert terms.d_out.item() == pytest.approx(sum(pairs) / len(pairs))
    assert terms.loss.item() == pytest.approx(0.01 - sum(pairs) / len(pairs))
    # without ids every row is its own task (the copies count as negatives)
    assert conml.conml_loss(anchor, views, distance_kind="sq_euclidean").d_out.item() != pytest.approx(
        terms.d_out.item()
    )


@pytest.mark.parametrize("loss_kind", ["difference", "infonce"])
def test_task_ids_split_across_processes_give_the_whole_batch_loss(loss_kind):
    ids = pool_batch_ids()
    anchor = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    views = anchor.unsqueeze(1) + torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(2))
    kwargs = {"distance_kind": "sq_euclidean", "loss_kind": loss_kind}
    whole = conml.conml_loss(anchor, views, task_ids=ids, all_task_ids=ids, **kwargs)
    parts = [
        conml.conml_loss(
            anchor[i : i + 2],
            views[i : i + 2],
            anchor,
            i,
            task_ids=ids[i : i + 2],
            all_task_ids=ids,
            **kwargs,
        )
        for i in range(0, 8, 2)
    ]
    assert sum(p.loss.item() for p in parts) / 4 == pytest.approx(whole.loss.item(), rel=1e-6)
    assert sum(p.d_out.item() for p in parts) / 4 == pytest.approx(whole.d_out.item(), rel=1e-6)


def test_infonce_never_counts_a_copy_of_the_task_as_a_negative():
    anchor = torch.tensor([[0.0], [0.0], [2.0]])  # rows 0 and 1: the same task
    views = torch.tensor([[[0.5]], [[0.5]], [[1.5]]])
    ids = torch.tensor([7, 7, 3])
    terms = conml.conml_loss(
        anchor, views, distance_kind="sq_euclidean", loss_kind="infonce", temperature=1.0, task_ids=ids
    )
    # logits -φ: row 0 sees itself (-0.25) and task 3 (-2.25), not row 1; row 1 likewise; row 2
    # sees itself (-0.25) and both rows of task 7 (-2.25 each), which are other tasks for it
    own, other = -0.25, -2.25
    rows_0_1 = -own + math.log(math.exp(own) + math.exp(other))
    row_2 = -own + math.log(math.exp(own) + 2 * math.exp(other))
    assert terms.loss.item() == pytest.approx((2 * rows_0_1 + row_2) / 3)
    assert terms.d_out.item() == pytest.approx(4.0)  # pairs (0,2), (1,2), (2,0), (2,1) only


def test_one_task_in_the_whole_batch_has_no_d_out():
    anchor = torch.randn(4, 1)
    terms = conml.conml_loss(anchor, anchor.unsqueeze(1), task_ids=torch.zeros(4, dtype=torch.long))
    assert terms.d_out.item() == 0 and torch.isfinite(terms.loss)


# ---- views and probes -----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 10])
def test_prefix_half_takes_exactly_floor_half(n):
    views = conml.sample_views("prefix_half", 3, n, 2, torch.Generator().manual_seed(0))
    assert views.shape == (3, 2, n // 2)
    assert torch.equal(views[0, 0], torch.arange(n // 2))


def test_subset_and_shuffle_views():
    gen = torch.Generator().manual_seed(0)
    subset = conml.sample_views("random_subset", 4, 10, 3, gen, 0.3, 0.6)
    assert 3 <= subset.shape[-1] <= 6
    assert (subset.diff(dim=-1) > 0).all()  # sorted, no repeats
    shuffled = conml.sample_views("shuffle", 4, 10, 2, gen)
    assert torch.equal(shuffled.sort(dim=-1).values, torch.arange(10).expand(4, 2, 10))
    assert not torch.equal(shuffled[0, 0], torch.arange(10))
    part = conml.sample_views("shuffled_subset", 4, 10, 2, gen, 0.5, 0.5)
    assert part.shape == (4, 2, 5) and (part.unique(dim=-1).shape[-1] == 5)


def test_probe_is_shared_by_the_batch_and_all_processes():
    task = get_task("linear_regression", 5)
    spec = ConMLSampling(num_probes=2, views="shuffle", num_views=1, subset_min=0.5, subset_max=0.5)
    sampler = PromptSampler(task, Curriculum.constant(5, 8), 8, seed=1, conml_sampling=spec)
    parts = [sampler.micro_batch(3, part, 2) for part in range(2)]
    probes = torch.cat([p["probes"] for p in parts])
    assert probes.shape == (8, 2, 5) and (probes == probes[0]).all()
    assert not torch.equal(sampler.global_batch(4)["probes"][0], probes[0])  # drawn anew each step
    views = torch.cat([p["view_index"] for p in parts])
    assert torch.equal(views, sampler.global_batch(3)["view_index"])


# ---- the one-forward layout equals separately built sequences --------------------------------------
@pytest.mark.parametrize(
    "kind, mode",
    [
        ("prefix_half", "probe_mask"),
        ("prefix_half", "extra_sequence"),
        ("random_subset", "probe_mask"),
        ("shuffle", "probe_mask"),
        ("shuffled_subset", "probe_mask"),
    ],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_views_equal_separate_sequences(tiny_config, kind, mode, attn):
    from icl_conml import ICLModel

    tiny_config.backbone_config._attn_implementation = attn
    torch.manual_seed(0)
    model = ICLModel(tiny_config).eval()
    gen = torch.Generator().manual_seed(1)
    batch, n, d, num_probes, num_views = 3, 10, 5, 2, 2
    xs, ys = torch.randn(batch, n, d, generator=gen), torch.randn(batch, n, generator=gen)
    probes = conml.sample_probes(num_probes, d, gen).expand(batch, -1, -1)
    view_index = conml.sample_views(kind, batch, n, num_views, gen, 0.3, 0.7)
    layout = conml.build_layout(xs, ys, probes, view_index, kind, mode)
    with torch.no_grad():
        plain = model(xs=xs, ys=ys).predictions
        out = model(xs=xs, ys=ys, **layout.model_inputs())
        anchor, views = conml.representations(out.appended_outputs, out.appended_hidden, layout)
        torch.testing.assert_close(out.predictions, plain, atol=1e-6, rtol=0)  # main predictions untouched

        def alone(sub_xs, sub_ys, probe):
            seq_xs = torch.cat([sub_xs, probe.unsqueeze(1)], dim=1)
            seq_ys = torch.cat([sub_ys, torch.zeros(batch, 1)], dim=1)
            return model(xs=seq_xs, ys=seq_ys).predictions[:, -1]

        for m in range(num_probes):
            torch.testing.assert_close(anchor[:, m], alone(xs, ys, probes[:, m]), atol=1e-5, rtol=0)
            for k in range(num_views):
                idx = view_index[:, k]
                sub_xs = torch.gather(xs, 1, idx.unsqueeze(-1).expand(-1, -1, d))
                sub_ys = torch.gather(ys, 1, idx)
                torch.testing.assert_close(
                    views[:, k, m], alone(sub_xs, sub_ys, probes[:, m]), atol=1e-5, rtol=0
                )


def prefix_half_forward(model, batch: int, n: int, num_probes: int, num_views: int, representation: str):
    """Anchor and view representations of random prompts under the paper's prefix_half views."""
    gen = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(batch, n, 5, generator=gen), torch.randn(batch, n, generator=gen)
    probes = conml.sample_probes(num_probes, 5, gen).expand(batch, -1, -1)
    views = conml.sample_views("prefix_half", batch, n, num_views, gen)
    layout = conml.build_layout(xs, ys, probes, views, "prefix_half")
    out = model(xs=xs, ys=ys, **layout.model_inputs())
    return conml.representations(out.appended_outputs, out.appended_hidden, layout, representation)


def test_probe_hidden_representation_has_hidden_width(tiny_model):
    anchor, views = prefix_half_forward(
        tiny_model, 2, 6, num_probes=3, num_views=2, representation="probe_hidden"
    )
    assert anchor.shape == (2, 3 * 32) and views.shape == (2, 2, 3 * 32)


@pytest.mark.parametrize("terms", ["in", "out"])
def test_gradients_reach_the_backbone_through_each_term(tiny_config, terms):
    from icl_conml import ICLModel

    torch.manual_seed(0)
    model = ICLModel(tiny_config)
    anchor, views = prefix_half_forward(model, 4, 8, num_probes=1, num_views=1, representation="probe_output")
    conml.conml_loss(anchor, views, terms=terms).loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


# ---- views in their own batch rows; the layout's cached structure -----------------------------------
def _layout_and_batch(kind, mode, num_probes, num_views, view_rows=None, batch=3, n=10):
    gen = torch.Generator().manual_seed(2)
    xs, ys = torch.randn(batch, n, 5, generator=gen), torch.randn(batch, n, generator=gen)
    probes = conml.sample_probes(num_probes, 5, gen).expand(batch, -1, -1)
    view_index = conml.sample_views(kind, batch, n, num_views, gen, 0.3, 0.7)
    return xs, ys, conml.build_layout(xs, ys, probes, view_index, kind, mode, view_rows)


@pytest.mark.parametrize(
    "kind, mode",
    [("shuffle", "probe_mask"), ("random_subset", "probe_mask"), ("prefix_half", "extra_sequence")],
)
@pytest.mark.parametrize("num_probes", [1, 2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_view_rows_equal_the_packed_block_mask(tiny_config, kind, mode, num_probes, attn):
    """Views as their own batch rows (one backbone call with the main rows for shuffles, a second
    one for shorter views) give what the same tokens packed behind a block mask give: the
    outputs, and the gradients of a loss over predictions and probe read-outs."""
    from icl_conml import ICLModel

    tiny_config.backbone_config._attn_implementation = attn
    torch.manual_seed(0)
    model = ICLModel(tiny_config)
    xs, ys, layout = _layout_and_batch(kind, mode, num_probes, num_views=2, view_rows=True)
    _, _, packed = _layout_and_batch(kind, mode, num_probes, num_views=2, view_rows=False)
    assert layout.rows is not None and packed.rows is None
    assert torch.equal(layout.tokens, packed.tokens) and torch.equal(layout.view_slots, packed.view_slots)
    results = []
    for each in (layout, packed):
        model.zero_grad()
        out = model(xs=xs, ys=ys, **each.model_inputs())
        anchor, views = conml.representations(out.appended_outputs, out.appended_hidden, each, "probe_hidden")
        (out.loss + anchor.square().mean() + (views - anchor.unsqueeze(1)).square().mean()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]  # wte is unused
        results.append((out.predictions, out.appended_outputs, anchor, views, grads))
    for rows_value, packed_value in zip(results[0][:4], results[1][:4], strict=True):
        torch.testing.assert_close(rows_value, packed_value, atol=1e-5, rtol=0)
    assert len(results[0][4]) == len(results[1][4]) > 0
    for rows_grad, packed_grad in zip(results[0][4], results[1][4], strict=True):
        torch.testing.assert_close(rows_grad, packed_grad, atol=1e-5, rtol=1e-4)


def test_one_probe_shuffle_runs_as_plain_causal_rows(tiny_model):
    """Shuffled views with one probe: main rows and view rows are both [2n tokens, probe], a plain
    causal sequence, so they share one backbone call with no mask (sdpa's causal fast path)."""
    xs, ys, layout = _layout_and_batch("shuffle", "probe_mask", num_probes=1, num_views=2)
    plan = layout.structure.attention_plan(torch.float32)
    assert plan is layout.structure.attention_plan(torch.float32)  # cached with the layout
    assert plan.joined and plan.main.mask is None and plan.main.position_ids is None
    _, _, two = _layout_and_batch("shuffle", "probe_mask", num_probes=2, num_views=2)
    plan = two.structure.attention_plan(torch.float32)
    assert plan.joined and plan.main.mask is not None  # probes must not see each other
    _, _, subset = _layout_and_batch("random_subset", "probe_mask", num_probes=1, num_views=2, view_rows=True)
    plan = subset.structure.attention_plan(torch.float32)
    assert not plan.joined and plan.rows.mask is None  # shorter rows: a second, causal call
    with torch.no_grad():
        out = tiny_model(xs=xs, ys=ys, **layout.model_inputs(), output_hidden_states=True)
    assert out.appended_outputs.shape == (3, layout.tokens.shape[1])
    assert all(state.shape[0] == 3 for state in out.hidden_states)  # the main rows' states only


def test_views_get_their_own_rows_where_that_is_cheaper():
    """By default only views as long as the context (shuffles) become rows; shorter views and
    prefix views as extra sequences stay packed, and masked prefix probes never are rows."""
    assert _layout_and_batch("shuffle", "probe_mask", 1, 2)[2].rows == (1, 21)
    assert _layout_and_batch("shuffle", "probe_mask", 2, 1)[2].rows == (2, 22)
    assert _layout_and_batch("random_subset", "probe_mask", 1, 2)[2].rows is None
    assert _layout_and_batch("prefix_half", "extra_sequence", 1, 2)[2].rows is None
    assert _layout_and_batch("prefix_half", "probe_mask", 1, 2, view_rows=True)[2].rows is None
    assert _layout_and_batch("shuffle", "probe_mask", 1, 2, view_rows=False)[2].rows is None


def test_view_rows_that_are_not_independent_are_refused(tiny_model):
    xs, ys, layout = _layout_and_batch("shuffle", "probe_mask", num_probes=1, num_views=2)
    by_hand = {"appended_tokens": layout.tokens, "appended_position_ids": layout.position_ids,
               "appended_visible": layout.visible}  # fmt: skip
    with pytest.raises(ValueError, match="appended_rows"):
        tiny_model(xs=xs, ys=ys, **by_hand, appended_rows=(0, layout.rows[1]))  # anchor is no row
    with pytest.raises(ValueError, match="appended_rows"):
        tiny_model(xs=xs, ys=ys, **by_hand, appended_rows=(1, 7))  # does not divide the views


def test_prefix_layout_is_masked_probes_and_its_structure_is_cached():
    """The paper's layout: [anchor u at position 2n seeing the context, u at position 2h seeing the
    first 2h context tokens]; no extra rows. Positions, visibility and slots are built once per size."""
    n, half = 4, 2
    xs, ys = torch.randn(2, n, 5), torch.randn(2, n)
    probes = torch.randn(1, 1, 5).expand(2, -1, -1)
    views = conml.sample_views("prefix_half", 2, n, 1, torch.Generator().manual_seed(0))
    layout = conml.build_layout(xs, ys, probes, views, "prefix_half")
    assert layout.rows is None
    assert torch.equal(layout.tokens, torch.cat([probes, probes], dim=1))
    assert layout.position_ids.tolist() == [2 * n, 2 * half]
    expected = torch.zeros(2, 2 * n + 2, dtype=torch.bool)
    expected[0, : 2 * n] = expected[1, : 2 * half] = True
    expected[0, 2 * n] = expected[1, 2 * n + 1] = True  # each probe sees itself, not the other
    assert torch.equal(layout.visible, expected)
    assert layout.anchor_slots.tolist() == [0] and layout.view_slots.tolist() == [[1]]
    assert layout.tokens_per_task == 2 * n + 2
    again = conml.build_layout(xs + 1, ys, probes, views, "prefix_half")
    assert again.structure is layout.structure  # one cache: positions, visibility, slots, plans


def test_a_layout_first_built_under_inference_mode_still_trains(tiny_config):
    from icl_conml import ICLModel

    torch.manual_seed(0)
    model = ICLModel(tiny_config)
    xs, ys = torch.randn(2, 7, 5), torch.randn(2, 7)
    probes = torch.randn(1, 3, 5).expand(2, -1, -1)  # a size no other test builds
    views = conml.sample_views("shuffle", 2, 7, 1, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(xs=xs, ys=ys, **conml.build_layout(xs, ys, probes, views, "shuffle").model_inputs())
    out = model(xs=xs, ys=ys, **conml.build_layout(xs, ys, probes, views, "shuffle").model_inputs())
    (out.loss + out.appended_outputs.sum()).backward()
    assert model.read_in.weight.grad is not None
