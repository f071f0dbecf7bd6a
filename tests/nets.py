"""Small static networks and scope helpers for the tests."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import paddle

IN_FEATURES = 5


@dataclasses.dataclass
class Net:
    x: Any
    out: Any
    loss: Any
    test_program: Any
    test_out: Any  # `out` as seen in test_program


def clone_for_test(main, value):
    """The IR's way to take an inference copy of ``main``: PIR clones through an IrMapping."""
    if paddle.framework.in_pir_mode():
        mapping = paddle.pir.IrMapping()
        program = main.clone(mapping)
        return program, mapping.look_up(value)
    return main.clone(for_test=True), value


def build_net(main, *, batch_norm=False, frozen=False, lr=0.05, optimizer="sgd"):
    """x -> fc(4) [-> BatchNorm1D] [-> fc(3) with do_model_average=False] -> fc(2) -> mean.

    Parameters get fixed names so save/load and the two IRs agree. The test program is cloned before
    minimize, which is what PIR requires.
    """
    x = paddle.static.data("x", [-1, IN_FEATURES], "float32")
    h = paddle.static.nn.fc(x, 4, weight_attr=paddle.ParamAttr(name="fc1.w"),
                            bias_attr=paddle.ParamAttr(name="fc1.b"))
    if batch_norm:
        bn = paddle.nn.BatchNorm1D(4, weight_attr=paddle.ParamAttr(name="bn.w"),
                                   bias_attr=paddle.ParamAttr(name="bn.b"))
        h = bn(h)
    if frozen:
        h = paddle.static.nn.fc(
            h, 3,
            weight_attr=paddle.ParamAttr(name="frozen.w", do_model_average=False),
            bias_attr=paddle.ParamAttr(name="frozen.b", do_model_average=False),
        )
    out = paddle.static.nn.fc(h, 2, weight_attr=paddle.ParamAttr(name="fc2.w"),
                              bias_attr=paddle.ParamAttr(name="fc2.b"))
    loss = paddle.mean(out * out)
    test_program, test_out = clone_for_test(main, out)
    opt = paddle.optimizer.Adam(lr) if optimizer == "adam" else paddle.optimizer.SGD(lr)
    opt.minimize(loss)
    return Net(x=x, out=out, loss=loss, test_program=test_program, test_out=test_out)


def read(name: str) -> np.ndarray:
    """A copy of tensor ``name`` from the current global scope."""
    var = paddle.static.global_scope().find_var(name)
    assert var is not None, f"{name} is not in the scope"
    return np.array(var.get_tensor())


def read_all(names) -> dict[str, np.ndarray]:
    return {name: read(name) for name in names}


def batch(rng, n=8) -> np.ndarray:
    return rng.standard_normal((n, IN_FEATURES)).astype("float32")


def read_average(slot) -> np.ndarray:
    """The stored (biased) average of one parameter, cut out of its possibly stacked average tensor."""
    average = read(slot.average)
    return average if slot.rows is None else average[slot.rows[0]:slot.rows[1]]


def state_names(ema) -> list[str]:
    """Names of an EMA's persistable state: the step, the bias denominator and every average tensor."""
    plan = ema._plan
    return [plan.step, plan.debias] + [group.average for group in plan.groups]


def train_with_ema(programs, exe, rng, steps, decay=0.9, **net_options):
    """A net (see build_net) with an EMA of ``decay``, started up and trained for ``steps`` steps."""
    import paddle_ema

    main, startup = programs
    net = build_net(main, **net_options)
    ema = paddle_ema.ExponentialMovingAverage(decay)
    ema.update()
    exe.run(startup)
    for _ in range(steps):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
    return net, ema
