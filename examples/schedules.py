"""What to average and how the decay warms up: the keyword options of ExponentialMovingAverage.

Three EMAs of one small regression model, trained together:

* ``power``: the power warm-up of ema-pytorch and diffusers, ``d_t = 1 - (1 + t)^(-2/3)``, clipped
  to ``[min_decay, decay]``, starting after ``start_step`` updates that just copy the weights;
* ``threshold``: PaddleDetection's default "threshold" schedule, ``min(decay, (1 + s) / (10 + s))``
  with ``s`` the global step (Paddle's own ``thres_steps``);
* ``head only``: the output layer only (``parameters=``), biases left out (``exclude=``).

It prints each EMA's decay over the first updates, then the validation loss with the raw weights
and with each EMA applied, and what ``ema.averages(exe)`` reads without applying anything.

Run: ``python examples/schedules.py``
"""

import argparse

# --help (and an unknown argument) ends here, before Paddle loads.
argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()

import numpy as np  # noqa: E402
import paddle  # noqa: E402

import paddle_ema  # noqa: E402
from paddle_ema import schedule  # noqa: E402

paddle.enable_static()
PIR = paddle.framework.in_pir_mode()

x = paddle.static.data("x", [-1, 8], "float32")
y = paddle.static.data("y", [-1, 1], "float32")
hidden = paddle.static.nn.fc(x, 32, activation="relu", weight_attr=paddle.ParamAttr(name="body.w"),
                             bias_attr=paddle.ParamAttr(name="body.b"))
out = paddle.static.nn.fc(hidden, 1, weight_attr=paddle.ParamAttr(name="head.w"),
                          bias_attr=paddle.ParamAttr(name="head.b"))
loss = paddle.mean(paddle.square(out - y))
main = paddle.static.default_main_program()
if PIR:  # PIR's clone has no for_test: clone before minimize, and fetch the clone's loss
    mapping = paddle.pir.IrMapping()
    test_program = main.clone(mapping)
    test_loss = mapping.look_up(loss)
else:
    test_program, test_loss = main.clone(for_test=True), loss
step = paddle_ema.global_step_counter()
paddle.optimizer.Momentum(0.05, momentum=0.9).minimize(loss)

emas = {
    "power": paddle_ema.ExponentialMovingAverage(0.999, power=2 / 3, min_decay=0.5, start_step=5),
    "threshold": paddle_ema.ExponentialMovingAverage(0.999, thres_steps=step),
    "head only": paddle_ema.ExponentialMovingAverage(0.99, parameters=["head.w", "head.b"],
                                                     exclude=[r".*\.b"]),
}
for ema in emas.values():
    ema.update()

# The decays the schedules give the first updates (the same maths the graph computes).
power = schedule.Schedule.make(0.999, power=2 / 3, min_decay=0.5, start_step=5)
threshold = schedule.Schedule.make(0.999, threshold=True)
for name, sched in (("power", power), ("threshold", threshold)):
    decays = [1.0 - schedule.step_weight(sched, u, steps=u) for u in (0, 4, 5, 6, 10, 100, 1000)]
    print(f"{name:>9} decay at updates 0, 4, 5, 6, 10, 100, 1000: " + " ".join(f"{d:.4f}" for d in decays))

exe = paddle.static.Executor(paddle.CPUPlace())
exe.run(paddle.static.default_startup_program())
rng = np.random.default_rng(0)
truth = rng.standard_normal((8, 1)).astype("float32")
for _ in range(300):
    xs = rng.standard_normal((16, 8)).astype("float32")
    ys = (np.tanh(xs @ truth) + 0.5 * rng.standard_normal((16, 1))).astype("float32")
    exe.run(main, feed={"x": xs, "y": ys}, fetch_list=[loss])

val = {"x": rng.standard_normal((512, 8)).astype("float32")}
val["y"] = np.tanh(val["x"] @ truth).astype("float32")
(raw,) = exe.run(test_program, feed=val, fetch_list=[test_loss])
print(f"validation loss, raw weights: {float(raw):.4f}")
for name, ema in emas.items():
    with ema.apply(exe):
        (averaged,) = exe.run(test_program, feed=val, fetch_list=[test_loss])
    print(f"validation loss, {name} EMA applied: {float(averaged):.4f} "
          f"(averages {sorted(ema.parameter_names)})")
head = emas["head only"].averages(exe)["head.w"]
print(f"head.w average read without applying: shape {list(head.shape)}, mean {float(head.mean()):.4f}")
