"""Execution-order layout (runtime/gpu_server/layout.py) and the weight arena's placement and
eviction (runtime/gpu_server/arena.py)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models
from runtime.gpu_server.arena import Arena, ArenaFull
from runtime.gpu_server.layout import ALIGNMENT, bind, named_weights, pack, trace_layout


def layout_of(kind: str, seed: int = 0):
    module = models.build(kind, seed)
    example = tuple(torch.from_numpy(a) for a in models.inputs(kind, seed))
    return module, trace_layout(module, example)


def packed(module: nn.Module, layout) -> torch.Tensor:
    buffer = torch.empty(layout.total_bytes, dtype=torch.uint8)
    pack(module, layout, buffer)
    return buffer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- layout


class Reversed(nn.Module):
    """Declares its layers in the opposite order of the one it runs them in."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.norm = nn.BatchNorm1d(8)
        self.body = nn.Linear(4, 8)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.body(x))))


def test_sequential_layout_is_execution_order_aligned_and_exact():
    module = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    layout = trace_layout(module, (torch.randn(2, 4),))
    assert layout.traced
    assert [s.names for s in layout.slots] == [
        ("0.weight",), ("0.bias",), ("1.weight",), ("1.bias",), ("1.running_mean",), ("1.running_var",),
        ("3.weight",), ("3.bias",),
        ("1.num_batches_tracked",),  # untouched in eval mode: after every weight the pass used
    ]
    assert [s.offset for s in layout.slots] == [i * ALIGNMENT for i in range(9)]
    assert layout.total_bytes == 9 * ALIGNMENT
    # each module may run once the buffer is present up to the end of its own weights
    assert layout.first_use_end == {"0": 2 * ALIGNMENT, "1": 6 * ALIGNMENT, "3": 8 * ALIGNMENT}


def test_layout_follows_execution_not_declaration():
    module = Reversed().eval()
    traced = trace_layout(module, (torch.randn(2, 4),))
    assert [s.names[0] for s in traced.slots] == [
        "body.weight", "body.bias", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
        "head.weight", "head.bias", "norm.num_batches_tracked"]
    untraced = trace_layout(module, None)
    assert not untraced.traced
    assert [s.names[0] for s in untraced.slots][:2] == ["head.weight", "head.bias"]  # state-dict order
    assert untraced.first_use_end == {}


def test_resnet_layout_starts_at_the_stem_and_ends_at_the_classifier():
    module, layout = layout_of("resnet")
    names = [s.names[0] for s in layout.slots]
    assert names[0] == "model.resnet.embedder.embedder.convolution.weight"
    last_used = names.index("model.classifier.1.bias")
    assert names[last_used - 1] == "model.classifier.1.weight"
    # only weights no operator reads (eval-mode batch-norm counters) follow the classifier
    assert names[last_used + 1:] and all(n.endswith("num_batches_tracked") for n in names[last_used + 1:])
    assert set(names) == set(named_weights(module))


@pytest.mark.parametrize("kind", models.SMALL)
def test_slots_aligned_disjoint_and_sized(kind):
    module, layout = layout_of(kind)
    weights = named_weights(module)
    end = 0
    for slot in layout.slots:
        assert slot.offset % ALIGNMENT == 0 and slot.offset >= end
        t = weights[slot.names[0]]
        assert slot.nbytes == t.numel() * t.element_size() and slot.shape == tuple(t.shape) and slot.dtype == t.dtype
        end = slot.offset + slot.nbytes
    assert layout.total_bytes % ALIGNMENT == 0 and end <= layout.total_bytes < end + ALIGNMENT
    assert layout.total_bytes >= models.weight_bytes(module)
    all_names = [n for s in layout.slots for n in s.names]
    assert sorted(all_names) == sorted(weights)  # every weight, each in exactly one slot


def test_tied_gpt2_weights_are_stored_once():
    module, layout = layout_of("gpt2")
    assert module.model.lm_head.weight.data_ptr() == module.model.transformer.wte.weight.data_ptr()
    tied = layout.slot_of()["model.lm_head.weight"]
    assert set(tied.names) == {"model.transformer.wte.weight", "model.lm_head.weight"}
    assert layout.slot_of()["model.transformer.wte.weight"] is tied
    assert layout.slots[0] is tied  # the embedding is the first operator of the pass
    wte_bytes = tied.nbytes
    assert layout.total_bytes < models.weight_bytes(module) + wte_bytes  # not stored twice
    assert sum((s.nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT for s in layout.slots) == layout.total_bytes


@pytest.mark.parametrize("kind", models.SMALL)
def test_first_use_end_gates_every_first_use(kind):
    """Runs the model on a buffer that starts as NaN bytes and only receives, before each
    module of ``first_use_end`` runs, the prefix that module is declared to need: any weight
    read before its bytes were granted poisons the output."""
    module, layout = layout_of(kind)
    src = packed(module, layout)
    dst = torch.full_like(src, 0xFF)  # float NaN, int -1
    runnable = copy.deepcopy(module).to("meta")
    bind(runnable, layout, dst)
    landed = [0]

    def grant(end):
        def hook(_module, _args):
            if end > landed[0]:
                dst[landed[0]:end].copy_(src[landed[0]:end])
                landed[0] = end
        return hook

    for path, end in layout.first_use_end.items():
        runnable.get_submodule(path).register_forward_pre_hook(grant(end))
    arrays = models.inputs(kind, seed=1)
    models.assert_same(models.native(runnable, arrays), models.native(module, arrays))
    assert 0 < landed[0] <= layout.total_bytes


def test_first_use_end_poison_is_detected_without_gating():
    """The check above can fail: without the grants the poisoned buffer gives NaN."""
    module, layout = layout_of("resnet")
    runnable = copy.deepcopy(module).to("meta")
    dst = packed(module, layout)
    first = layout.slots[0]
    dst[first.offset:first.offset + first.nbytes] = 0xFF
    bind(runnable, layout, dst)
    out = models.native(runnable, models.inputs("resnet"))[0]
    assert torch.isnan(torch.from_numpy(out)).all()


@pytest.mark.parametrize("kind", models.SMALL)
def test_bind_runs_a_meta_template_on_a_flat_buffer(kind):
    module, layout = layout_of(kind)
    template = copy.deepcopy(module).to("meta")
    assert all(t.is_meta for t in named_weights(template).values())
    buffer = packed(module, layout)
    runnable = copy.deepcopy(template)
    bind(runnable, layout, buffer)
    for name, t in named_weights(runnable).items():
        slot = layout.slot_of()[name]
        assert t.data_ptr() == buffer.data_ptr() + slot.offset  # a view, no copy
    arrays = models.inputs(kind, seed=2)
    models.assert_same(models.native(runnable, arrays), models.native(module, arrays))
    if kind == "gpt2":
        assert runnable.model.lm_head.weight.data_ptr() == runnable.model.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("kind", models.SMALL)
def test_a_binding_moves_its_weights_to_another_buffer_in_place(kind):
    module, layout = layout_of(kind)
    runnable = copy.deepcopy(module).to("meta")
    first, second = packed(module, layout), packed(module, layout)
    binding = bind(runnable, layout, first)
    before = {name: id(t) for name, t in named_weights(runnable).items()}
    first.fill_(0xFF)  # NaN everywhere: a weight left behind shows in the outputs
    binding.to(second)
    for name, t in named_weights(runnable).items():
        assert t.data_ptr() == second.data_ptr() + layout.slot_of()[name].offset
        assert id(t) == before[name]  # re-pointed, not replaced
    arrays = models.inputs(kind, seed=3)
    models.assert_same(models.native(runnable, arrays), models.native(module, arrays))
    if kind == "gpt2":  # tied: two names, one slot, both moved
        assert runnable.model.lm_head.weight.data_ptr() == runnable.model.transformer.wte.weight.data_ptr()
    with pytest.raises(ValueError, match="not aligned"):
        binding.to(torch.zeros(layout.total_bytes + 8, dtype=torch.uint8)[1:1 + layout.total_bytes])


# ---------------------------------------------------------------- arena


def filled(capacity: int, regions: list[tuple[str, int, int]], alignment: int = 10) -> Arena:
    arena = Arena(capacity, alignment)
    for owner, offset, size in regions:
        arena.place(owner, offset, size)
    return arena


def priced(prices: dict[str, float]):
    return lambda owners: sum(prices[o] for o in owners)


def test_first_fit_over_gaps():
    arena = filled(100, [("a", 0, 30), ("b", 30, 20), ("c", 50, 20)])
    arena.free("a")
    assert arena.gaps() == [(0, 30), (70, 30)]
    assert arena.plan(20, lambda o: True, priced({})) == (0, [])
    assert arena.plan(30, lambda o: True, priced({})) == (0, [])
    arena.place("d", 0, 25)  # rounded up to the alignment: 30
    assert arena.region_of("d").size == 30 and arena.used == 70
    assert arena.plan(21, lambda o: True, priced({})) == (70, [])


def test_eviction_picks_the_cheapest_contiguous_window():
    arena = filled(100, [(o, i * 20, 20) for i, o in enumerate("abcde")])
    prices = {"a": 5, "b": 1, "c": 1, "d": 9, "e": 9}
    assert arena.plan(40, lambda o: True, priced(prices)) == (20, ["b", "c"])
    assert arena.plan(20, lambda o: True, priced(prices)) == (20, ["b"])


def test_a_window_holding_a_model_in_use_is_never_chosen():
    arena = filled(100, [(o, i * 20, 20) for i, o in enumerate("abcde")])
    prices = {"a": 5, "b": 1, "c": 1, "d": 9, "e": 9}
    offset, victims = arena.plan(40, lambda o: o != "b", priced(prices))
    assert "b" not in victims
    assert (offset, victims) == (40, ["c", "d"])  # 10: cheaper windows all contain b
    with pytest.raises(ArenaFull):
        arena.plan(40, lambda o: o in ("a", "e"), priced(prices))


def test_fragmentation_evicts_one_contiguous_window_not_scattered_models():
    # 40 bytes free in total, in gaps of 10, 10 and 20: none fits 30
    arena = filled(100, [("a", 0, 20), ("b", 30, 20), ("c", 60, 20)])
    assert sum(size for _, size in arena.gaps()) == 40
    prices = {"a": 3, "b": 1, "c": 2}
    offset, victims = arena.plan(30, lambda o: True, priced(prices))
    assert victims == ["b"] and offset == 20  # b plus the free bytes beside it
    for v in victims:
        arena.free(v)
    region = arena.place("new", offset, 30)
    assert (region.offset, region.end) == (20, 50)
    assert [r.owner for r in arena.regions] == ["a", "new", "c"]  # nobody moved


def test_home_offset_is_reused():
    arena = filled(100, [("p", 0, 20), ("a", 40, 20), ("q", 60, 20)])
    arena.free("p")
    arena.free("a")
    assert arena.plan(20, lambda o: True, priced({}))[0] == 0  # first fit
    assert arena.plan(20, lambda o: True, priced({}), home=40) == (40, [])
    # the home wins a tie between equally cheap windows
    full = filled(60, [("x", 0, 20), ("y", 20, 20), ("z", 40, 20)])
    assert full.plan(20, lambda o: True, priced({"x": 1, "y": 1, "z": 1}), home=20) == (20, ["y"])
    assert full.plan(20, lambda o: True, priced({"x": 1, "y": 1, "z": 1})) == (0, ["x"])


def test_a_sticky_home_beats_the_cheapest_window_only_when_room_must_be_made():
    # while a free gap fits, nobody is evicted for a home (two models sharing one would
    # otherwise evict each other on every request)
    arena = filled(100, [("x", 0, 20), ("y", 20, 20)])
    prices = priced({"x": 1, "y": 5, "z": 9, "w": 9})
    assert arena.plan(20, lambda o: True, prices, home=20, sticky_home=True) == (40, [])
    # full: the home's idle models go, although the policy prices x's window lower
    full = filled(60, [("x", 0, 20), ("y", 20, 20), ("z", 40, 20)])
    assert full.plan(20, lambda o: True, prices, home=20, sticky_home=True) == (20, ["y"])
    assert full.plan(20, lambda o: True, prices, home=20) == (0, ["x"])  # not sticky: the policy's window
    # a home spanning two models evicts both
    assert full.plan(30, lambda o: True, prices, home=20, sticky_home=True) == (20, ["y", "z"])
    # a home holding a model in use, or one that must never be evicted: the policy's window
    assert full.plan(20, lambda o: o != "y", prices, home=20, sticky_home=True) == (0, ["x"])
    assert full.plan(20, lambda o: True, priced({"x": 1, "y": float("inf"), "z": 9}), home=20,
                     sticky_home=True) == (0, ["x"])
    # a home past the arena's end (a home kept from an older, larger version of the model) is ignored
    assert full.plan(20, lambda o: True, prices, home=50, sticky_home=True) == (0, ["x"])


def test_home_first_evicts_guests_for_the_home_while_free_gaps_exist():
    arena = filled(100, [("x", 0, 20), ("y", 20, 20), ("z", 40, 20)])
    prices = priced({"x": 1, "y": 5, "z": 5})
    def guests(owner: str) -> bool:  # owners with no graphs where they sit
        return owner in ("y", "z")
    assert arena.plan(20, lambda o: True, prices, home=20, sticky_home=True, home_first=guests) == (20, ["y"])
    assert arena.plan(30, lambda o: True, prices, home=20, sticky_home=True, home_first=guests) == (20, ["y", "z"])
    # not a guest (its graphs are where it sits: two models with graphs at overlapping homes
    # would evict each other on every request), in use, or never to be evicted: a free gap
    assert arena.plan(20, lambda o: True, prices, home=0, sticky_home=True, home_first=guests) == (60, [])
    assert arena.plan(30, lambda o: True, prices, home=10, sticky_home=True, home_first=guests) == (60, [])
    assert arena.plan(20, lambda o: o != "y", prices, home=20, sticky_home=True, home_first=guests) == (60, [])
    assert arena.plan(20, lambda o: True, priced({"x": 1, "y": float("inf"), "z": 1}), home=20, sticky_home=True,
                      home_first=guests) == (60, [])
    # without home_first the free gap wins; a free home needs no eviction either way
    assert arena.plan(20, lambda o: True, prices, home=20, sticky_home=True) == (60, [])
    assert arena.plan(20, lambda o: True, prices, home=80, home_first=guests) == (80, [])
    # a home past the arena's end is ignored
    assert arena.plan(20, lambda o: True, prices, home=90, sticky_home=True, home_first=guests) == (60, [])


def test_model_larger_than_the_arena_is_refused():
    arena = Arena(105, 10)
    assert arena.capacity == 100
    with pytest.raises(ArenaFull, match="exceed"):
        arena.plan(101, lambda o: True, priced({}))
    assert arena.plan(100, lambda o: True, priced({})) == (0, [])


def test_place_and_free_errors():
    arena = filled(100, [("a", 0, 20), ("b", 40, 20)])
    with pytest.raises(ValueError):
        arena.place("c", 10, 20)  # overlaps a
    with pytest.raises(ValueError):
        arena.place("c", 30, 20)  # runs into b
    with pytest.raises(ValueError):
        arena.place("c", 90, 20)  # leaves the arena
    with pytest.raises(ValueError):
        arena.place("c", 25, 5)  # not aligned
    with pytest.raises(ValueError):
        arena.place("c", 20, 0)  # empty
    with pytest.raises(KeyError):
        arena.free("nobody")
    assert arena.free("a").owner == "a"
    with pytest.raises(KeyError):
        arena.free("a")
    assert arena.used == 20


def test_owners_of_a_window_and_windows_found_by_bisection_match_a_scan():
    arena = filled(100, [("a", 0, 20), ("b", 30, 10), ("c", 50, 30)])
    assert arena.owners(10, 25) == ["a", "b"]  # 30 bytes from 10 once aligned: [10, 40)
    assert arena.owners(40, 10) == [] and arena.owners(0, 100) == ["a", "b", "c"]
    assert arena.owners(45, 10) is None and arena.owners(90, 20) is None  # not aligned; past the end
    # every window plan may choose covers exactly the regions a scan of all regions finds
    prices = {"a": 3, "b": 1, "c": 2}
    for size in range(10, 101, 10):
        for home in (None, 0, 30, 40, 90):
            try:
                offset, victims = arena.plan(size, lambda o: True, priced(prices), home=home)
            except ArenaFull:
                continue
            scanned = [r.owner for r in arena.regions if r.offset < offset + size and r.end > offset]
            assert victims == scanned, (size, home, offset)
