"""Recorded switches (patch/recorded.py), checked on the CPU: ``addmm`` counts as a GEMM device here, a prepared
list replays as it would on a GPU, and a stand-in "graph" replays by running the list again, so every step must land
exactly where the eager switch lands. The real CUDA graph is checked by tests/test_gpu.py."""
from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from .conftest import assert_original, snapshot
from .factories import make_kohya_lora, tiny_components

from lorakit.lora_model import LoraModel, lora_from_state_dict
from lorakit.patch import Patcher, fused
from lorakit.patch.recorded import RecordedSwitches
from lorakit.patch.plan import PlanCache


class Recorder:
    """Stands in for ``cuda_capture``: records the work (runs nothing), replays by running it."""

    def __init__(self) -> None:
        self.replays = 0

    def __call__(self, work: Callable[[], None], device: torch.device) -> Callable[[], None]:
        def replay() -> None:
            self.replays += 1
            work()
        return replay


def loras(comps: dict[str, torch.nn.Module], kind: str = "lora", n: int = 3) -> list[LoraModel]:
    def only_some(path: str) -> str | None:  # the third LoRA reaches only the attention layers
        return kind if ".attn" in path or "self_attn" in path else None
    out = []
    for seed in range(n):
        sd = make_kohya_lora(comps, only_some if seed == 2 else kind, rank=4, seed=seed, alpha=2.0,
                             dtype=torch.float16)
        out.append(lora_from_state_dict(sd, {}, name=f"l{seed}"))
    return out


def patchers(dtype: torch.dtype, recorder: Recorder) -> tuple[Patcher, Patcher]:
    """The same tiny model twice: one switching with recorded graphs, one eagerly."""
    comps = tiny_components("sd1", dtype=dtype)
    graphed, eager = Patcher(comps), Patcher(copy.deepcopy(comps))
    for p in (graphed, eager):
        p.fused.originals_mode = "device"
    graphed.fused.recorded = RecordedSwitches(capture=recorder, graphs=True)
    eager.fused.recorded = RecordedSwitches(enabled=False)
    return graphed, eager


def assert_same(a: Patcher, b: Patcher) -> None:
    for name, module in a.components.items():
        for (n, p), q in zip(module.named_parameters(), b.components[name].parameters()):
            assert torch.equal(p.detach(), q.detach()), f"{name}.{n}"


@pytest.fixture
def gemm_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "GEMM_DEVICES", {"cpu", "cuda"})


@pytest.mark.usefixtures("gemm_on_cpu")
def test_a_set_is_recorded_the_second_time_and_replays_exactly() -> None:
    rec = Recorder()
    graphed, eager = patchers(torch.float16, rec)
    snap = snapshot(graphed.components)
    a, b, c = loras(graphed.components)
    sets = [[(a, 1.0)], [(b, 0.7)], [(a, 1.0)], [(b, 0.7)], [(a, 1.0)], [(a, 1.0), (b, 0.5)], [(b, 0.7)],
            [(a, 1.0), (b, 0.5)], [(c, 1.0)], [(a, 1.0)], [(c, 1.0)], [(b, 0.7)]]
    captures = []
    for s in sets:
        graphed.set(s, log_reports=False)
        eager.set(s, log_reports=False)
        assert_same(graphed, eager)
        captures.append(graphed.fused.recorded.recordings)
    # a, b recorded on their second use, a+b on its second; c (fewer layers) restores the others, so the a and
    # b after it patch fresh buffers eagerly (their recordings point at the dropped ones) — never a stale replay.
    assert captures == [0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4]
    assert rec.replays >= 5
    graphed.restore()
    assert_original(graphed.components, snap)
    assert graphed.fused.buffers == {}


@pytest.mark.usefixtures("gemm_on_cpu")
def test_restore_forgets_recorded_switches() -> None:
    rec = Recorder()
    graphed, eager = patchers(torch.float16, rec)
    a, b, _ = loras(graphed.components)
    for s in ([(a, 1.0)], [(b, 1.0)], [(a, 1.0)]):
        graphed.set(s, log_reports=False)
    assert graphed.fused.recorded.recordings == 1
    graphed.restore()
    replays = rec.replays
    for s in ([(b, 1.0)], [(a, 1.0)]):
        graphed.set(s, log_reports=False)
        eager.set(s, log_reports=False)
    assert rec.replays == replays  # fresh buffers after a restore: nothing recorded before may run
    assert_same(graphed, eager)


@pytest.mark.usefixtures("gemm_on_cpu")
@pytest.mark.parametrize("dtype,kind", [(torch.bfloat16, "lora"), (torch.float16, "loha"), (torch.float32, "lora")])
def test_sums_a_graph_cannot_hold_stay_eager(dtype: torch.dtype, kind: str) -> None:
    """bf16 (exact only through the fp32 row blocks), a non-low-rank type, fp32: never recorded, still exact."""
    rec = Recorder()
    graphed, eager = patchers(dtype, rec)
    a, b, _ = loras(graphed.components, kind)
    for s in ([(a, 1.0)], [(b, 1.0)], [(a, 1.0)], [(b, 1.0)]):
        graphed.set(s, log_reports=False)
        eager.set(s, log_reports=False)
        assert_same(graphed, eager)
    assert graphed.fused.recorded.recordings == 0 and rec.replays == 0


@pytest.mark.usefixtures("gemm_on_cpu")
def test_host_originals_are_never_recorded() -> None:
    rec = Recorder()
    graphed, eager = patchers(torch.float16, rec)
    graphed.fused.originals_mode = eager.fused.originals_mode = "host"
    a, b, _ = loras(graphed.components)
    for s in ([(a, 1.0)], [(b, 1.0)], [(a, 1.0)]):
        graphed.set(s, log_reports=False)
        eager.set(s, log_reports=False)
    assert_same(graphed, eager)
    assert graphed.fused.recorded.recordings == 0


def test_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAKIT_SWITCH_GRAPHS", raising=False)
    assert not RecordedSwitches().graphs and RecordedSwitches().enabled
    monkeypatch.setenv("LORAKIT_SWITCH_GRAPHS", "1")
    assert RecordedSwitches().graphs


def test_a_set_switched_back_to_reuses_its_plan() -> None:
    comps = tiny_components("sd1")
    p = Patcher(comps)
    a, b, _ = loras(comps)
    p.set([(a, 1.0)], log_reports=False)
    first = p._plans.get([(x, w) for x, w in _resolved(p, [(a, 1.0)])], False)
    p.set([(b, 1.0)], log_reports=False)
    p.set([(a, 1.0)], log_reports=False)
    assert first is not None and p._plans.get(_resolved(p, [(a, 1.0)]), False) is first
    assert p._plans.get(_resolved(p, [(a, 0.5)]), False) is None  # another weight: another plan


def _resolved(p: Patcher, pairs: list[tuple[LoraModel, float]]) -> list[tuple[LoraModel, object]]:
    from lorakit.patch.placement import place_loras
    from lorakit.patch.weights import as_weight
    return place_loras([(lora, as_weight(w)) for lora, w in pairs], p.components)  # type: ignore[return-value]


def test_plan_cache_is_bounded() -> None:
    from lorakit.patch import plan as plan_module
    cache = PlanCache()
    comps = tiny_components("sd1")
    a = loras(comps, n=1)[0]
    from lorakit.patch.weights import as_weight
    for i in range(plan_module.PLANS_KEEP + 3):
        cache.put([(a, as_weight(i / 10))], False, plan_module.Plan({}, {}, []))
    assert len(cache._items) == plan_module.PLANS_KEEP


@pytest.mark.usefixtures("gemm_on_cpu")
def test_a_set_whose_graph_cannot_be_captured_replays_its_prepared_list(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(work: Callable[[], None], device: torch.device) -> Callable[[], None]:
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed, eager = patchers(torch.float16, Recorder())
    graphed.fused.recorded.capture = refuse
    a, b, _ = loras(graphed.components)
    for s in ([(a, 1.0)], [(b, 1.0)], [(a, 1.0)], [(b, 1.0)], [(a, 1.0)]):
        graphed.set(s, log_reports=False)
        eager.set(s, log_reports=False)
        assert_same(graphed, eager)
    assert graphed.fused.recorded.recordings == 2 and graphed.fused.recorded.graphs_captured == 0
    assert sum("could not record the LoRA switch" in r.message for r in caplog.records) == 2  # once per set


@pytest.mark.usefixtures("gemm_on_cpu")
def test_by_default_a_recorded_switch_is_one_op_per_weight() -> None:
    """Without CUDA graphs a set switched back to replays its prepared ``addmm`` list: one torch op per weight
    (the eager switch: a few more and the Python around them), the same weights as a patcher that records nothing,
    and a restore brings back the originals."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            Count.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    comps = tiny_components("sd1", dtype=torch.float16)
    recorded, eager = Patcher(comps), Patcher(copy.deepcopy(comps))
    eager.fused.recorded = RecordedSwitches(enabled=False)
    snap = snapshot(comps)
    a, b, _ = loras(comps)
    for p in (recorded, eager):
        p.fused.originals_mode = "device"
        for s in ([(a, 1.0)], [(b, 0.5)], [(a, 1.0)], [(b, 0.5)]):
            p.set(s, log_reports=False)
    assert recorded.fused.recorded.recordings == 2 and recorded.fused.recorded.graphs_captured == 0
    assert_same(recorded, eager)
    with Count():
        n = recorded.fused.apply(recorded._plans.get(_resolved(recorded, [(a, 1.0)]), False))  # type: ignore[arg-type]
    assert n == len(recorded.fused.params) and Count.ops == ["aten.addmm.out"] * n
    eager.set([(a, 1.0)], log_reports=False)
    assert_same(recorded, eager)
    recorded.restore()
    assert_original(comps, snap)
    assert recorded.fused.recorded.recordings == 2 and recorded.fused.recorded.held() == []


def test_caches_do_not_keep_placed_factors_alive() -> None:
    """The resolution cache holds LoRAs weakly and the plan cache goes with a restore: once the placement cache
    drops a placed copy, its factors (on a GPU: device memory) are freed."""
    import gc
    import weakref

    from lorakit.patch import placement

    comps = tiny_components("sd1")  # fp32 model, fp16 files: each LoRA gets a placed fp32 copy
    p = Patcher(comps)
    a, b, _ = loras(comps)
    p.set([(a, 1.0)], log_reports=False)
    p.set([(b, 1.0)], log_reports=False)
    placed = [weakref.ref(x) for x, _ in _resolved(p, [(a, 1.0), (b, 1.0)])]
    assert all(r() is not None and r() is not lo for r, lo in zip(placed, (a, b)))
    p.restore()
    placement.clear_cache()
    gc.collect()
    assert [r() for r in placed] == [None, None]
    p.set([(a, 1.0)], log_reports=False)  # resolved again from scratch: still right
    assert p.reports[0].patched


@pytest.mark.usefixtures("gemm_on_cpu")
def test_kept_gemm_factors_give_the_same_weights_as_fresh_ones() -> None:
    """Switching back to a set reuses its fp16 one-addmm factors; the weights equal a fresh patcher's that
    computes them anew, and only two switches' factors are kept."""
    comps = tiny_components("sd1", dtype=torch.float16)
    fresh_comps = copy.deepcopy(comps)
    p = Patcher(comps)
    p.fused.originals_mode = "device"
    p.fused.recorded = RecordedSwitches(enabled=False)  # the eager switch's kept factors (a recording holds its own)
    a, b, _ = loras(comps)
    p.set([(a, 1.0), (b, 0.3)], log_reports=False)
    first = dict(p.fused._gemm)
    for s in ([(b, 0.7)], [(a, 1.0), (b, 0.3)]):
        p.set(s, log_reports=False)
    assert first and set(p.fused._gemm) == set(first)  # the factors made two switches ago, not made again
    assert all(p.fused._gemm[k][0] is u for k, (u, _, _) in first.items())
    assert {sig[0][1] for _, sig in p.fused._gemm_before} == {0.7}  # and the switch before's
    fresh = Patcher(fresh_comps)
    fresh.fused.originals_mode = "device"
    fresh.set([(a, 1.0), (b, 0.3)], log_reports=False)
    assert_same(p, fresh)
    p.restore()
    assert p.fused._gemm == {} and p.fused._gemm_before == {}


@pytest.mark.usefixtures("gemm_on_cpu")
@pytest.mark.parametrize("seed", range(4))
def test_random_switch_sequences_land_where_a_fresh_patcher_does(seed: int) -> None:
    """Random sequences over a few sets — full and partial LoRAs, other strengths, a non-low-rank type, a set
    applied again, restores — with recordings (prepared lists, and stand-in graphs) and without: after every step
    the three models are equal bit for bit, and each set lands where a patcher applying it to the untouched model
    does; a restore brings back the originals."""
    import random

    rnd = random.Random(seed)
    comps = tiny_components("sd1", dtype=torch.float16)
    pristine = copy.deepcopy(comps)
    snap = snapshot(comps)
    lists, graphs, eager = Patcher(comps), Patcher(copy.deepcopy(comps)), Patcher(copy.deepcopy(comps))
    graphs.fused.recorded = RecordedSwitches(capture=Recorder(), graphs=True)
    eager.fused.recorded = RecordedSwitches(enabled=False)
    for p in (lists, graphs, eager):
        p.fused.originals_mode = "device"
    a, b, attn = loras(comps)
    loha = loras(comps, "loha", n=1)[0]
    pool = [[(a, 1.0)], [(b, 0.7)], [(a, 1.0), (b, 0.3)], [(attn, 1.0)], [(a, 0.5)], [(loha, 0.8)],
            [(a, 1.0), (attn, -0.5)]]
    fresh = {}
    for _ in range(30):
        if rnd.random() < 0.1:
            for p in (lists, graphs, eager):
                p.restore()
            assert_original(comps, snap)
            continue
        i = rnd.randrange(len(pool))
        for p in (lists, graphs, eager):
            p.set(pool[i], log_reports=False)
        assert_same(lists, eager)
        assert_same(graphs, eager)
        if i not in fresh:  # the same set applied to the untouched model
            ref = Patcher(copy.deepcopy(pristine))
            ref.fused.originals_mode = "device"
            ref.set(pool[i], log_reports=False)
            fresh[i] = ref
        assert_same(lists, fresh[i])
    assert lists.fused.recorded.recordings > 0 and graphs.fused.recorded.graphs_captured > 0


@pytest.mark.usefixtures("gemm_on_cpu")
def test_a_graph_recording_keeps_what_its_sums_read() -> None:
    """A CUDA graph holds no reference to the tensors it reads: the recording must. The stand-in keeps only a weak
    reference to the recorded work, as a graph keeps none; every replay finds it (and its factors) alive — also
    for factors made only for the recording (A, B, C, A) and kept ones the eager switch has since let go."""
    import gc
    import weakref

    def weak_capture(work: Callable[[], None], device: torch.device) -> Callable[[], None]:
        ref = weakref.ref(work)

        def replay() -> None:
            alive = ref()
            assert alive is not None, "the graph would read freed memory"
            alive()
        return replay

    graphed, eager = patchers(torch.float16, Recorder())
    graphed.fused.recorded.capture = weak_capture
    a, b, _ = loras(graphed.components)
    c, d = loras(graphed.components, n=2)  # two more full sets (seeds 0, 1: other LoRA objects)
    for s in ([(a, 1.0)], [(b, 1.0)], [(c, 0.5)], [(a, 1.0)], [(d, 0.5)], [(a, 1.0)], [(b, 1.0)], [(c, 0.5)],
              [(d, 0.5)], [(a, 1.0)], [(b, 1.0)]):
        graphed.set(s, log_reports=False)
        eager.set(s, log_reports=False)
        gc.collect()
        assert_same(graphed, eager)
    assert graphed.fused.recorded.graphs_captured >= 3


@pytest.mark.usefixtures("gemm_on_cpu")
def test_a_set_with_fewer_layers_keeps_its_recording() -> None:
    """Switching between a full set and one on the attention layers only: the smaller set's recording does not
    write the buffers the switch drops, so it stays and replays; the full set patches fresh buffers each time."""
    comps = tiny_components("sd1", dtype=torch.float16)
    p = Patcher(comps)
    p.fused.originals_mode = "device"
    a, _, attn = loras(comps)
    for _ in range(4):
        p.set([(a, 1.0)], log_reports=False)
        p.set([(attn, 1.0)], log_reports=False)
    assert p.fused.recorded.recordings == 1 and len(p.fused.recorded.held()) == 1


@pytest.mark.usefixtures("gemm_on_cpu")
def test_recordings_go_with_their_plans() -> None:
    """Sets the plan cache has let go can never be switched back to (a new plan is made): their recordings, and
    what was seen or refused of them, hold nothing — the plans and their placed factors are freed."""
    import gc
    import weakref

    from lorakit.patch import plan as plan_module

    comps = tiny_components("sd1", dtype=torch.float16)
    p = Patcher(comps)
    p.fused.originals_mode = "device"
    a, b, _ = loras(comps)
    for s in ([(a, 1.0)], [(b, 1.0)], [(a, 1.0)], [(b, 1.0)]):
        p.set(s, log_reports=False)
    assert p.fused.recorded.recordings == 2
    first = weakref.ref(p._plans.get(_resolved(p, [(a, 1.0)]), False))  # type: ignore[arg-type]
    assert first() is not None
    for i in range(plan_module.PLANS_KEEP + 1):  # other strengths: other plans, the first one falls out
        p.set([(b, 0.1 * (i + 1))], log_reports=False)
    gc.collect()
    assert first() is None
    assert len(p.fused.recorded.held()) <= 1  # only b's last sets can still be switched back to
