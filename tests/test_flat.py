"""ModelEMA's flat groups (paddle_ema._flat): the numbers of the per-tensor path bit for bit, in a
few kernels whatever the tensor count, and an update that Ctrl-C cannot cut in half."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import paddle
import pytest

import paddle_ema
from paddle_ema import _flat

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from kernels import count_kernels  # noqa: E402

# Eager code only: once per Paddle release (conftest.py).
pytestmark = pytest.mark.eager


class Mixed(paddle.nn.Layer):
    """Small float32 layers (grouped), one too large to group, two float64 buffers (a float64
    group), a float16 buffer (a float32 average, per tensor), an empty buffer, and a float32 buffer
    the forward re-binds every step (``self.seen = self.seen + n``)."""

    def __init__(self, depth: int = 4):
        super().__init__()
        self.layers = paddle.nn.Sequential(*(paddle.nn.Linear(6, 6) for _ in range(depth)))
        self.large = paddle.nn.Linear(200, 200)  # 40,000 elements: more than a group takes
        self.register_buffer("scale64", paddle.ones([3], "float64"))
        self.register_buffer("shift64", paddle.zeros([2, 2], "float64"))
        self.register_buffer("low", paddle.ones([4], "float16"))
        self.register_buffer("empty", paddle.zeros([0]))
        self.register_buffer("seen", paddle.zeros([1]))

    def forward(self, x):
        self.seen = self.seen + x.shape[0]
        return self.layers(x)


def set_random_weights(model, rng):
    """Every floating-point tensor to new random values (also re-binding ``seen``, as a forward does)."""
    model(paddle.zeros([1, 6]))
    with paddle.no_grad():
        for _, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.size and paddle.is_floating_point(tensor):
                value = rng.standard_normal(tensor.shape).astype(paddle_ema._ir.dtype_name(tensor))
                tensor.set_value(value)


def numpy_state(model):
    return {n: t.numpy().astype(np.float64) for n, t in [*model.named_parameters(), *model.named_buffers()]
            if paddle.is_floating_point(t)}


class PerTensor:
    """Runs a ModelEMA's calls with grouping switched off: the per-tensor path of paddle_ema 0.4."""

    def __init__(self, monkeypatch, ema):
        self.monkeypatch, self.ema = monkeypatch, ema

    def __getattr__(self, name):
        method = getattr(self.ema, name)

        def call(*args, **kwargs):
            with self.monkeypatch.context() as patch:
                patch.setattr(_flat, "groupable", lambda tensor, average: False)
                return method(*args, **kwargs)
        return call


def build(monkeypatch, grouped, **options):
    paddle.seed(3)
    model = Mixed()
    if grouped:
        return model, paddle_ema.ModelEMA(model, 0.9, **options)
    with monkeypatch.context() as patch:
        patch.setattr(_flat, "groupable", lambda tensor, average: False)
        ema = paddle_ema.ModelEMA(model, 0.9, **options)
    return model, PerTensor(monkeypatch, ema)


def as_on_a_device(monkeypatch):
    """Group as on a GPU (one slice, tensors up to 1M elements), here on the CPU."""
    monkeypatch.setattr(_flat, "policy", lambda tensor: _flat.DEVICE_POLICY)


@pytest.mark.parametrize("place_policy", ["cpu", "device"])
@pytest.mark.parametrize("options", [{}, {"warmup": "threshold", "update_every": 2}, {"init": "weights"}])
def test_groups_give_the_per_tensor_numbers_bit_for_bit(dygraph, monkeypatch, options, place_policy):
    if place_policy == "device":
        as_on_a_device(monkeypatch)
    model, ema = build(monkeypatch, True, **options)
    twin, reference = build(monkeypatch, False, **options)
    assert ema._groups and not reference.ema._groups
    assert {g.dtype for g in ema._groups} == {"float32", "float64"}
    large_grouped = any("large.weight" in g.names for g in ema._groups)
    assert large_grouped == (place_policy == "device")
    rngs = np.random.default_rng(0), np.random.default_rng(0)
    for step in range(12):
        for m, r in zip((model, twin), rngs):
            set_random_weights(m, r)
        ema.update()
        reference.update()
        for name, average in ema._averages.items():
            np.testing.assert_array_equal(average.numpy(), reference.ema._averages[name].numpy(),
                                          err_msg=f"{name} at update {step}")
        if step % 4 == 3:
            trained = numpy_state(model)
            with ema.apply():
                applied = numpy_state(model)
            with reference.apply():
                applied_reference = numpy_state(twin)
            for name, value in applied.items():
                np.testing.assert_array_equal(value, applied_reference[name], err_msg=name)
            for name, value in numpy_state(model).items():
                np.testing.assert_array_equal(value, trained[name], err_msg=f"{name} restored")


def test_groups_follow_the_oracle(dygraph, rng):
    model = Mixed()
    follows_the_oracle(model, paddle_ema.ModelEMA(model, 0.9, warmup="threshold"), rng)


def follows_the_oracle(model, ema, rng):
    """``ema`` (decay 0.9, threshold warm-up) of ``model`` (a Mixed) against a float64 numpy
    reference of the threshold schedule, written from the doc."""
    names = ema.names
    averages = {n: np.zeros(t.shape) for n, t in numpy_state(model).items() if n in names}
    product = 1.0
    for step in range(15):
        set_random_weights(model, rng)
        decay = min(0.9, (1 + step) / (10 + step))
        product *= decay
        for name, value in numpy_state(model).items():
            if name in averages:
                averages[name] = decay * averages[name] + (1 - decay) * value
        ema.update()
    got = {n: t.numpy().astype(np.float64) for n, t in ema.averages().items()}
    for name, expected in averages.items():
        tolerance = 1e-3 if name == "low" else 2e-6  # (float16's applied value is rounded to float16)
        np.testing.assert_allclose(got[name], expected / (1 - product), rtol=tolerance, atol=1e-6,
                                   err_msg=name)


def kernels_of(fn):
    counts = count_kernels(fn)  # (one warm-up call first)
    assert counts["kernel_event"], "the profiler recorded no kernels"
    return counts["kernels"]


@pytest.mark.parametrize("what", ["update", "apply_restore"])
def test_an_update_and_an_apply_are_a_few_kernels_whatever_the_tensor_count(dygraph, what):
    counts = {}
    for depth in (8, 128):
        paddle.seed(1)
        model = paddle.nn.Sequential(*(paddle.nn.Linear(16, 16) for _ in range(depth)))
        ema = paddle_ema.ModelEMA(model, 0.99)
        ema.update()

        def apply_restore(ema=ema):
            with ema.apply():
                pass
        counts[depth] = kernels_of(ema.update if what == "update" else apply_restore)
    # update: two fills of the step weight, one sgd_ over the buffer, then a concat and an sgd_ for
    # its one slice; apply: the reciprocal, a scale and a split.
    assert counts[8] == counts[128] <= (5 if what == "update" else 3), counts


def test_a_group_over_a_mib_costs_two_more_kernels_a_mib_and_no_page_fault(dygraph):
    """512 tensors of 1.06M float32 values (4 MiB): 5 slices, 13 kernels an update, 11 an apply."""
    import resource

    paddle.seed(1)
    model = paddle.nn.Sequential(*(paddle.nn.Linear(64, 64) for _ in range(256)))
    ema = paddle_ema.ModelEMA(model, 0.99)
    ema.update()
    (group,) = ema._groups
    slices = len(group._slices)
    assert slices == -(-4 * sum(p.size for p in model.parameters()) // _flat.CPU_POLICY.slice_bytes) == 5

    def apply_restore():
        with ema.apply():
            pass
    assert kernels_of(ema.update) == 3 + 2 * slices <= 16
    assert kernels_of(apply_restore) == 1 + 2 * slices <= 16
    for call in (ema.update, apply_restore):
        call()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            call()
        # (one 4 MiB temporary a call faults 1,025 pages; reused blocks none, the allocator's own
        # bookkeeping a few)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 5 * 300, call


def test_on_a_device_a_model_of_large_and_small_tensors_updates_in_five_kernels(dygraph, monkeypatch):
    as_on_a_device(monkeypatch)
    paddle.seed(1)
    model = paddle.nn.Sequential(*(paddle.nn.Linear(64, 64) for _ in range(256)), paddle.nn.Linear(512, 512))
    ema = paddle_ema.ModelEMA(model, 0.99)
    ema.update()
    (group,) = ema._groups
    assert len(group.names) == 514 and len(group._slices) == 1

    def apply_restore():
        with ema.apply():
            pass
    assert (kernels_of(ema.update), kernels_of(apply_restore)) == (5, 3)


def test_a_strided_buffer_is_averaged_on_its_own(dygraph, rng):
    """A buffer registered as a transposed view (not contiguous: it cannot be read as flat rows)."""

    class Strided(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.a = paddle.nn.Linear(3, 3)
            self.register_buffer("tb", paddle.to_tensor(rng.standard_normal([4, 6]).astype("float32")).t())

    model = Strided()
    assert not model.tb.is_contiguous()
    ema = paddle_ema.ModelEMA(model, 0.5)
    assert all("tb" not in group.names for group in ema._groups)
    expected = {}
    for _ in range(3):
        with paddle.no_grad():
            model.a.weight.set_value(rng.standard_normal([3, 3]).astype("float32"))
        for name, value in numpy_state(model).items():
            expected[name] = 0.5 * expected.get(name, 0.0) + 0.5 * value
        ema.update()
    for name, value in ema.averages().items():
        np.testing.assert_allclose(value.numpy(), expected[name] / (1 - 0.5**3), rtol=1e-6, err_msg=name)
    trained = numpy_state(model)
    with ema.apply():
        for name, value in numpy_state(model).items():
            np.testing.assert_allclose(value, expected[name] / (1 - 0.5**3), rtol=1e-6, err_msg=name)
    for name, value in numpy_state(model).items():
        np.testing.assert_array_equal(value, trained[name], err_msg=f"{name} restored")


def test_a_tensor_given_new_memory_is_averaged_from_there(dygraph, monkeypatch, rng):
    """A grouped tensor whose DenseTensor is replaced (what a loader or a sharding wrapper may do;
    `set_value` keeps the memory) is read from its new memory: the per-tensor numbers, bit for bit."""
    runs = {}
    for grouped in (True, False):
        model, ema = build(monkeypatch, grouped)
        rng_run = np.random.default_rng(7)
        for step in range(3):
            set_random_weights(model, rng_run)
            if step == 1:
                for weight in (model.layers[0].weight, model.layers[2].bias):
                    value = rng_run.standard_normal(weight.shape).astype("float32")
                    paddle.to_tensor(value)._share_underline_tensor_to(weight)
            ema.update()
        runs[grouped] = {n: t.numpy() for n, t in ema.averages().items()}
    for name, value in runs[False].items():
        np.testing.assert_array_equal(runs[True][name], value, err_msg=name)


def test_a_buffer_re_bound_every_step_costs_no_regrouping(dygraph, rng):
    model = Mixed()
    ema = paddle_ema.ModelEMA(model, 0.9)
    groups = list(ema._groups)
    for _ in range(3):
        set_random_weights(model, rng)  # re-binds `seen`
        ema.update()
    assert all(a is b for a, b in zip(ema._groups, groups)) and len(ema._groups) == len(groups)
    assert ema._groups[0].tensors[ema._groups[0].names.index("seen")] is model.seen


def test_ctrl_c_during_an_update_lands_once_the_update_is_done(dygraph, rng, monkeypatch):
    model = Mixed()
    ema = paddle_ema.ModelEMA(model, 0.5)
    set_random_weights(model, rng)
    expected = {n: v for n, v in numpy_state(model).items() if n in ema.names}  # 0.5 of it, then / 0.5
    original, calls = paddle._C_ops.sgd_, []

    def sgd_then_ctrl_c(*args):
        out = original(*args)
        calls.append(1)
        if len(calls) == 1:  # between the two kernels of the first group
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(paddle._C_ops, "sgd_", sgd_then_ctrl_c)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        ema.update()
    monkeypatch.undo()
    assert len(calls) > 2 and signal.getsignal(signal.SIGINT) is handler
    assert ema.num_updates == 1
    for name, value in ema.averages().items():
        np.testing.assert_allclose(value.numpy().astype(np.float64), expected[name], rtol=1e-3, err_msg=name)
    ema.update()  # usable on


def test_an_update_off_the_main_thread_runs(dygraph, rng):
    model = Mixed()
    ema = paddle_ema.ModelEMA(model, 0.5)
    errors = []

    def update():
        try:
            ema.update()
        except BaseException as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    worker = threading.Thread(target=update)
    worker.start()
    worker.join()
    assert ema.num_updates == 1 and not errors
