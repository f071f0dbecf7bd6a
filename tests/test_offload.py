"""ModelEMA(offload=True): the averages live and are updated in host memory, with the numbers of an
EMA whose averages sit beside the model's tensors, bit for bit.

This machine has no GPU, so the model's tensors are in host memory too and nothing would move. The
tests below make the EMA see the model as if on a device: every place comparison says "another
place", and every copy between places is a real copy (a clone), counted. That runs every path an
offloaded EMA takes on a GPU, except Paddle's own device-to-host copy (``Tensor._copy_to``).
"""

from __future__ import annotations

import numpy as np
import paddle
import pytest
from test_flat import Mixed, follows_the_oracle, numpy_state, set_random_weights

import paddle_ema
from paddle_ema import _ir

# Eager code only: once per Paddle release (conftest.py).
pytestmark = pytest.mark.eager


class AsIfOnADevice:
    """Runs an EMA's calls with the model's tensors seen as on another device than host memory
    (only inside its calls, so an EMA built without it in the same test is not affected). ``moves``
    lists the size of each copy between places."""

    def __init__(self, monkeypatch, build):
        self.monkeypatch, self.moves = monkeypatch, []
        self.ema = self._patched(build)

    def _patched(self, fn, *args, **kwargs):
        def moved_to(tensor, place):
            self.moves.append(int(np.prod(tensor.shape)))
            return tensor.clone() if tensor.size else tensor  # (as moved_to: an empty one stays)

        with self.monkeypatch.context() as patch:
            patch.setattr(_ir, "same_place", lambda a, b: False)
            patch.setattr(_ir, "moved_to", moved_to)
            return fn(*args, **kwargs)

    def __getattr__(self, name):
        method = getattr(self.ema, name)
        return lambda *args, **kwargs: self._patched(method, *args, **kwargs)


def build(**options):
    paddle.seed(3)
    model = Mixed()
    return model, paddle_ema.ModelEMA(model, 0.9, **options)


@pytest.mark.parametrize("options", [{}, {"warmup": "threshold", "update_every": 2}, {"init": "weights"}])
def test_offloaded_averages_are_the_on_device_ones_bit_for_bit(dygraph, monkeypatch, options):
    model, ema = build(**options)
    twin = Mixed()
    twin.set_state_dict(model.state_dict())
    offloaded = AsIfOnADevice(monkeypatch, lambda: paddle_ema.ModelEMA(twin, 0.9, offload=True, **options))
    assert all(a.place.is_cpu_place() for a in offloaded.ema._averages.values())
    assert offloaded.ema._groups, "no flat group: the grouped offload path is not tested"
    numel = sum(int(np.prod(t.shape)) for t in offloaded.ema._tensors.values())
    rngs = np.random.default_rng(0), np.random.default_rng(0)
    for step in range(12):
        for m, r in zip((model, twin), rngs):
            set_random_weights(m, r)
        ema.update()
        offloaded.moves.clear()
        offloaded.update()
        averaging = (step + 1) % options.get("update_every", 1) == 0
        # Every averaged value copied to host memory once: one copy per flat slice (of the slice's
        # tensors concatenated) and one per tensor not grouped, but for the empty one (no values).
        slices = sum(len(g._slices) for g in offloaded.ema._groups)
        ungrouped = [t for n, t in offloaded.ema._tensors.items() if n not in offloaded.ema._grouped]
        assert any(t.size == 0 for t in ungrouped), "no empty tensor: its skipped update is not tested"
        plan = sum(1 for t in ungrouped if t.size)
        assert len(offloaded.moves) == (slices + plan if averaging else 0)
        assert sum(offloaded.moves) == (numel if averaging else 0)
        for name, average in ema._averages.items():
            np.testing.assert_array_equal(offloaded.ema._averages[name].numpy(), average.numpy(),
                                          err_msg=f"{name} at update {step}")
        if step % 4 == 3:
            trained = numpy_state(twin)
            with ema.apply():
                expected = numpy_state(model)
            offloaded.moves.clear()
            offloaded.apply()
            # Each slice's values and each other nonempty tensor's go back in one copy each.
            assert len(offloaded.moves) == slices + plan and sum(offloaded.moves) == numel
            for name, value in numpy_state(twin).items():
                np.testing.assert_array_equal(value, expected[name], err_msg=name)
            offloaded.restore()
            for name, value in numpy_state(twin).items():
                np.testing.assert_array_equal(value, trained[name], err_msg=f"{name} restored")
    averages = offloaded.averages()
    for name, value in ema.averages().items():
        np.testing.assert_array_equal(averages[name].numpy(), value.numpy(), err_msg=name)


def test_offloaded_averages_follow_the_oracle(dygraph, rng):
    model = Mixed()
    follows_the_oracle(model, paddle_ema.ModelEMA(model, 0.9, warmup="threshold", offload=True), rng)


def test_a_state_moves_between_offloaded_and_on_device_emas_bit_for_bit(dygraph, monkeypatch, rng):
    model, ema = build()
    offloaded = AsIfOnADevice(monkeypatch, lambda: paddle_ema.ModelEMA(model, 0.9, offload=True))
    for _ in range(5):
        set_random_weights(model, rng)
        ema.update()
    offloaded.set_state_dict(ema.state_dict())
    assert all(a.place.is_cpu_place() for a in offloaded.ema._averages.values())
    for name, average in ema._averages.items():
        np.testing.assert_array_equal(offloaded.ema._averages[name].numpy(), average.numpy(), err_msg=name)
    set_random_weights(model, rng)
    offloaded.update()
    back = paddle_ema.ModelEMA(model, 0.9)
    back.set_state_dict(offloaded.state_dict())
    for name, average in offloaded.ema._averages.items():
        np.testing.assert_array_equal(back._averages[name].numpy(), average.numpy(), err_msg=name)


@pytest.mark.parametrize("make", ["ModelEMA", "PowerEMA", "PostHocEMA"])
def test_offload_must_be_a_bool(dygraph, tmp_path, make):
    model = paddle.nn.Linear(2, 2)
    extra = {"snapshot_dir": tmp_path, "snapshot_every": 1} if make == "PostHocEMA" else {}
    with pytest.raises(TypeError, match="offload must be a bool, got 'yes'"):
        getattr(paddle_ema, make)(model, offload="yes", **extra)
    ema = getattr(paddle_ema, make)(model, offload=True, **extra)
    for tracked in getattr(ema, "_emas", [ema]):
        assert tracked._offload and all(a.place.is_cpu_place() for a in tracked._averages.values())
