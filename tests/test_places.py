"""Place logic, checked on CPU: no place is hard-coded; state made by paddle_ema itself goes where the
parameters live (CI has no GPU, so the CUDA branch is checked with a stand-in place)."""

from __future__ import annotations

import paddle
from nets import build_net, train_with_ema

import paddle_ema
from paddle_ema import _ir


class _FakeGpuPlace:
    """What DenseTensor._place() reports for a tensor on GPU 1, as far as _typed_place looks."""

    def is_gpu_place(self):
        return True

    def gpu_device_id(self):
        return 1


def test_typed_place_for_cpu_tensors(programs, exe, rng):
    net, ema = train_with_ema(programs, exe, rng, steps=1)
    place = _ir.initialized_place(ema.parameter_names[0], paddle.static.global_scope())
    assert isinstance(place, paddle.CPUPlace)


def test_typed_place_for_gpu_tensors_asks_for_that_device(monkeypatch):
    monkeypatch.setattr(paddle, "CUDAPlace", lambda device: ("CUDAPlace", device))
    assert _ir._typed_place(_FakeGpuPlace()) == ("CUDAPlace", 1)


def test_state_made_after_startup_and_backups_sit_on_the_parameters_place(programs, exe, rng):
    main, startup = programs
    build_net(main)
    exe.run(startup)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()  # startup already ran: the state is set in the scope directly
    scope = paddle.static.global_scope()
    plan = ema._plan
    for name in [plan.step, plan.debias] + [g.average for g in plan.groups]:
        assert scope.find_var(name).get_tensor()._place().is_cpu_place(), name
    exe.run(main, feed={"x": rng.standard_normal((4, 5)).astype("float32")})
    with ema.apply(exe):
        for slot, backup in zip(plan.slots, ema._applied.backups):
            assert backup._place().is_cpu_place(), slot.param
