"""paddle_ema.load: resuming checkpoints with, without or with part of the EMA's state."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import paddle
import pytest
from nets import batch, build_net, read, read_all, state_names
from oracle import EmaOracle
from test_average import assert_applied_matches

import paddle_ema
from paddle_ema import _ir


def fresh_world():
    """A new program pair, scope and name generator, as a fresh training process would have."""
    import contextlib

    stack = contextlib.ExitStack()
    main, startup = paddle.static.Program(), paddle.static.Program()
    stack.enter_context(paddle.utils.unique_name.guard())
    stack.enter_context(paddle.static.scope_guard(paddle.static.Scope()))
    stack.enter_context(paddle.static.program_guard(main, startup))
    return stack, main, startup


def save_trained(exe, rng, prefix, *, with_ema):
    """Train 3 steps of build_net (Adam) with or without an EMA, save, and return the parameters."""
    stack, main, startup = fresh_world()
    with stack:
        net = build_net(main, optimizer="adam")
        if with_ema:
            paddle_ema.ExponentialMovingAverage(0.9).update()
        exe.run(startup)
        for _ in range(3):
            exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        paddle.static.save(main, prefix)
        return read_all([p.name for p in main.global_block().all_parameters()])


def resume(exe, prefix):
    """The same model with an EMA (decay 0.9), started up and loaded by paddle_ema.load."""
    stack, main, startup = fresh_world()
    net = build_net(main, optimizer="adam")
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    return stack, main, net, ema


def test_a_checkpoint_written_without_the_ema_resumes_with_a_fresh_ema(exe, rng, tmp_path, caplog):
    prefix = str(tmp_path / "no_ema")
    saved = save_trained(exe, rng, prefix, with_ema=False)
    with pytest.raises(AssertionError, match=r"Can not find \[ema_0\."):  # what Paddle does
        stack, main, net, ema = resume(exe, prefix)
        with stack:
            paddle.static.load(main, prefix)
    stack, main, net, ema = resume(exe, prefix)
    with stack:
        with caplog.at_level(logging.WARNING, logger="paddle_ema"):
            paddle_ema.load(main, prefix)
        assert "ema_0 starts fresh" in caplog.text and "ema_0.step" in caplog.text
        for name, value in saved.items():
            np.testing.assert_array_equal(read(name), value, err_msg=f"loaded {name}")
        for name in state_names(ema):
            assert not np.any(read(name)), f"{name} must start at zero"
        oracle = EmaOracle(0.9, ema.parameter_names)
        for _ in range(3):
            exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
            oracle.step(read_all(ema.parameter_names))
            assert_applied_matches(ema, exe, oracle, "EMA started fresh on a loaded checkpoint")


def assert_loads_fresh(exe, prefix, caplog, why):
    """paddle_ema.load of ``prefix`` into the model with an EMA starts the EMA fresh (every state tensor
    zero) and the warning says so, and ``why``."""
    stack, main, net, ema = resume(exe, prefix)
    with stack:
        with caplog.at_level(logging.WARNING, logger="paddle_ema"):
            paddle_ema.load(main, prefix)
        assert "ema_0 starts fresh" in caplog.text and why in caplog.text
        for name in state_names(ema):
            assert not np.any(read(name)), f"{name} must start at zero"


def test_a_checkpoint_with_the_ema_resumes_it_bit_exactly(exe, rng, tmp_path):
    prefix = str(tmp_path / "with_ema")
    save_trained(exe, rng, prefix, with_ema=True)
    loaded = {}
    for loader in (paddle.static.load, paddle_ema.load):
        stack, main, net, ema = resume(exe, prefix)
        with stack:
            loader(main, prefix)
            with ema.apply(exe):
                loaded[loader] = read_all(ema.parameter_names + state_names(ema))
    ours, paddles = loaded[paddle_ema.load], loaded[paddle.static.load]
    for name in paddles:
        np.testing.assert_array_equal(ours[name], paddles[name], err_msg=name)


def test_a_checkpoint_with_part_of_the_ema_state_starts_it_fresh(exe, rng, tmp_path, caplog):
    prefix = str(tmp_path / "part")
    save_trained(exe, rng, prefix, with_ema=True)
    with open(prefix + ".pdopt", "rb") as f:
        saved = pickle.load(f)
    del saved["ema_0.bias_correction"]
    with open(prefix + ".pdopt", "wb") as f:
        pickle.dump(saved, f, protocol=2)
    assert_loads_fresh(exe, prefix, caplog, "ema_0.bias_correction")


def test_a_checkpoint_of_another_model_is_refused_before_loading_anything(exe, rng, tmp_path):
    prefix = str(tmp_path / "other")
    stack, main, startup = fresh_world()
    with stack:
        x = paddle.static.data("x", [-1, 5], "float32")
        loss = paddle.mean(paddle.static.nn.fc(x, 2, weight_attr=paddle.ParamAttr(name="fc1.w")))
        paddle.optimizer.SGD(0.1).minimize(loss)
        exe.run(startup)
        paddle.static.save(main, prefix)
    stack, main, net, ema = resume(exe, prefix)
    with stack:
        before = read_all(ema.parameter_names + state_names(ema))
        with pytest.raises(ValueError, match=r"lacks \d+ variable\(s\) of the program.*nothing was loaded"):
            paddle_ema.load(main, prefix)
        for name, value in read_all(list(before)).items():
            np.testing.assert_array_equal(value, before[name], err_msg=f"{name} changed by a refused load")


def _rewrite(path, name, change):
    with open(path, "rb") as f:
        arrays = pickle.load(f, encoding="latin1")
    arrays[name] = change(arrays[name])
    with open(path, "wb") as f:
        pickle.dump(arrays, f, protocol=2)


@pytest.mark.parametrize("what", ["a wider parameter", "an average of another shape", "a float32 step"])
def test_a_checkpoint_whose_arrays_do_not_fit_is_refused_before_loading_anything(exe, rng, tmp_path, what):
    """Same names, other shapes or dtypes (another model): paddle.static.set_program_state would
    write the variables before the misfit one, then fail; paddle_ema.load checks them all first."""
    prefix = str(tmp_path / "misfit")
    save_trained(exe, rng, prefix, with_ema=True)
    stack, main, net, ema = resume(exe, prefix)
    with stack:
        group = next(g for g in ema._plan.groups if g.stacked is not None)

        def one_row_more(a):
            return np.zeros((a.shape[0] + 1, *a.shape[1:]), a.dtype)

        if what == "a wider parameter":
            _rewrite(prefix + ".pdparams", "fc2.b", one_row_more)
        elif what == "an average of another shape":
            _rewrite(prefix + ".pdopt", group.average, one_row_more)
        else:
            _rewrite(prefix + ".pdopt", ema._plan.step, lambda a: a.astype(np.float32))
        before = read_all(sorted(_ir.persistable_names(main)))
        with pytest.raises(ValueError, match=r"written by another model \(nothing was loaded\)"):
            paddle_ema.load(main, prefix)
        for name, value in read_all(list(before)).items():
            np.testing.assert_array_equal(value, before[name], err_msg=f"{name} changed by a refused load")


def test_load_refuses_while_an_ema_is_applied(exe, rng, tmp_path):
    prefix = str(tmp_path / "applied")
    save_trained(exe, rng, prefix, with_ema=True)
    stack, main, net, ema = resume(exe, prefix)
    with stack:
        paddle_ema.load(main, prefix)
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        with ema.apply(exe):
            with pytest.raises(RuntimeError, match=r"restore\(executor\) before loading"):
                paddle_ema.load(main, prefix)


def trained_and_saved(programs, exe, rng, prefix, steps, **net_options):
    main, startup = programs
    net = build_net(main, **net_options)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(startup)
    for _ in range(steps):
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
    paddle.static.save(main, prefix)
    return ema


@pytest.mark.parametrize("steps", [0, 4])
def test_load_averages_reads_what_apply_writes(programs, exe, rng, tmp_path, steps):
    prefix = str(tmp_path / "ckpt")
    ema = trained_and_saved(programs, exe, rng, prefix, steps, batch_norm=True)
    assert any(len(g.members) > 1 for g in ema._plan.groups), "the net must exercise stacked averages"
    averages = paddle_ema.load_averages(prefix)
    assert sorted(averages) == sorted(ema.parameter_names)
    with ema.apply(exe):
        for name, value in read_all(ema.parameter_names).items():
            assert averages[name].dtype == value.dtype and averages[name].shape == value.shape, name
            np.testing.assert_array_equal(averages[name], value, err_msg=f"{name} after {steps} steps")


def test_load_averages_names_the_ema_it_cannot_find(programs, exe, rng, tmp_path):
    prefix = str(tmp_path / "ckpt")
    trained_and_saved(programs, exe, rng, prefix, 1)
    with pytest.raises(ValueError, match=r"which EMA is 'slow'.*\['ema_0'\]"):
        paddle_ema.load_averages(prefix, name="slow")
    assert sorted(paddle_ema.load_averages(prefix, name="ema_0")) == sorted(paddle_ema.load_averages(prefix))


def test_load_averages_says_when_it_cannot_unstack(programs, exe, rng, tmp_path):
    """A parameter left out of the EMA that has the shape of stacked ones hides the stack's members."""
    prefix = str(tmp_path / "ckpt")
    trained_and_saved(programs, exe, rng, prefix, 2, frozen=True)
    with pytest.raises(ValueError, match="cannot tell which parameters share the stacked average"):
        paddle_ema.load_averages(prefix)


def test_load_averages_of_bfloat16_parameters_are_their_float32_averages(programs, exe, tmp_path):
    from test_dtypes import bf16_to_float32, cast_truncates, round_to_bf16, trained_bf16_ema

    ema = trained_bf16_ema(programs, exe, decay=0.99, steps=20, seed=5)
    prefix = str(tmp_path / "ckpt")
    paddle.static.save(programs[0], prefix)
    averages = paddle_ema.load_averages(prefix)
    truncate = cast_truncates("bfloat16")
    with ema.apply(exe):
        for name in ema.parameter_names:
            assert averages[name].dtype == np.float32, name
            np.testing.assert_array_equal(
                bf16_to_float32(read(name)), round_to_bf16(averages[name], truncate),
                err_msg=f"{name}: apply writes the float32 average, rounded once")


def paddle_class_checkpoint(exe, rng, prefix, decay):
    """Train build_net with Paddle's own ExponentialMovingAverage and save; the oracle of its averages.

    Skips where Paddle's class cannot be built or run (every PIR cell; the legacy IR from 3.2 on),
    with Paddle's error.
    """
    stack, main, startup = fresh_world()
    with stack:
        net = build_net(main, optimizer="adam")
        try:
            paddle_ema_class = paddle.static.ExponentialMovingAverage(decay)
            paddle_ema_class.update()
        except Exception as error:  # noqa: BLE001 - the Paddle defect is what the skip reports
            pytest.skip(f"Paddle's own ExponentialMovingAverage fails here: {str(error).strip()[:200]}")
        exe.run(startup)
        names = [p.name for p in main.global_block().all_parameters()]
        oracle = EmaOracle(float(np.float32(decay)), names)
        for _ in range(4):
            exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
            oracle.step(read_all(names))
        paddle.static.save(main, prefix)
    return oracle


def test_a_checkpoint_of_paddles_own_class_carries_on(exe, rng, tmp_path):
    prefix = str(tmp_path / "paddle_class")
    oracle = paddle_class_checkpoint(exe, rng, prefix, 0.9)
    stack, main, net, ema = resume(exe, prefix)
    with stack:
        paddle_ema.load(main, prefix)
        np.testing.assert_array_equal(read(ema._plan.step), [4])
        assert_applied_matches(ema, exe, oracle, "averages carried on from Paddle's class")
        oracle.decay = 0.9
        for _ in range(2):
            exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
            oracle.step(read_all(ema.parameter_names))
            assert_applied_matches(ema, exe, oracle, "training on after Paddle's class")


def add_paddle_class_state(prefix, params, decay, steps, rng, name=""):
    """Write the state Paddle's class (built with ``name``) would have saved into a checkpoint;
    return its averages."""
    with open(prefix + ".pdopt", "rb") as f:
        others = pickle.load(f)
    averages = {p: rng.standard_normal(value.shape).astype(value.dtype) for p, value in params.items()}
    others.update({f"{name}{p}_ema_0": value for p, value in averages.items()})
    others["@EMA_STEP_COUNTER@"] = np.array([steps], np.int64)
    others["scheduled_ema_decay_rate"] = np.array([decay], np.float32)
    with open(prefix + ".pdopt", "wb") as f:
        pickle.dump(others, f, protocol=2)
    return averages


@pytest.mark.parametrize("name", ["", "ema"], ids=["name=None", "name='ema'"])
def test_paddle_class_state_maps_onto_the_stacked_layout(exe, rng, tmp_path, name):
    """In every mode (Paddle's class itself runs in few): its names (prefixed by the name it was
    built with), the stacks, 1 - d^t."""
    prefix = str(tmp_path / "synthetic")
    params = save_trained(exe, rng, prefix, with_ema=False)
    averages = add_paddle_class_state(prefix, params, 0.9, 7, rng, name=name)
    stack, main, net, ema = resume(exe, prefix)
    with stack:
        paddle_ema.load(main, prefix)
        np.testing.assert_array_equal(read(ema._plan.step), [7])
        correction = 1.0 - float(np.float32(0.9)) ** 7
        np.testing.assert_array_equal(read(ema._plan.debias), [correction])
        with ema.apply(exe):
            for name in ema.parameter_names:
                expected = (averages[name] * np.float32(1.0 / correction)).astype(np.float32)
                np.testing.assert_array_equal(read(name), expected, err_msg=name)


def test_paddle_class_state_with_another_decay_starts_fresh_and_says_why(exe, rng, tmp_path, caplog):
    prefix = str(tmp_path / "warmed_up")
    params = save_trained(exe, rng, prefix, with_ema=False)
    add_paddle_class_state(prefix, params, 0.5, 7, rng)  # e.g. a thres_steps warm-up's last decay
    assert_loads_fresh(exe, prefix, caplog, "bias correction, is not in the checkpoint")


def test_paddle_class_state_of_two_names_starts_fresh_and_says_which(exe, rng, tmp_path, caplog):
    prefix = str(tmp_path / "two")
    params = save_trained(exe, rng, prefix, with_ema=False)
    add_paddle_class_state(prefix, params, 0.9, 7, rng)
    add_paddle_class_state(prefix, params, 0.9, 7, rng, name="ema")
    assert_loads_fresh(exe, prefix, caplog, "several ('', 'ema') name prefix")


def assert_load_refused(exe, prefix, loaded, error, match):
    """paddle_ema.load of ``loaded`` into the model that ``prefix`` was saved from (started up)
    raises ``error`` matching ``match`` and changes no parameter or EMA state."""
    stack, main, net, ema = resume(exe, prefix)
    with stack:
        before = read_all(ema.parameter_names + state_names(ema))
        with pytest.raises(error, match=match):
            paddle_ema.load(main, loaded)
        for name, value in read_all(before).items():
            np.testing.assert_array_equal(value, before[name], err_msg=name)


@pytest.mark.parametrize("where", ["mistyped prefix", "a directory"])
def test_load_of_a_path_without_a_checkpoint_names_it(exe, rng, tmp_path, where):
    prefix = str(tmp_path / "model")
    save_trained(exe, rng, prefix, with_ema=True)
    wrong = str(tmp_path / "modle") if where == "mistyped prefix" else str(tmp_path)
    assert_load_refused(exe, prefix, wrong, FileNotFoundError, f"no checkpoint at '{wrong}'")


def test_a_global_step_counter_new_with_the_ema_starts_with_it(exe, rng, tmp_path, caplog):
    """docs/checkpoints.md's thres_steps=paddle_ema.global_step_counter() added with the EMA to a model whose
    checkpoint has neither: both start afresh, the warm-up from step 0."""
    prefix = str(tmp_path / "before_ema")
    saved = save_trained(exe, rng, prefix, with_ema=False)
    stack, main, startup = fresh_world()
    with stack:
        net = build_net(main, optimizer="adam")
        step = paddle_ema.global_step_counter()
        ema = paddle_ema.ExponentialMovingAverage(0.999, thres_steps=step)
        ema.update()
        exe.run(startup)
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])  # the counter moved: 0
        with caplog.at_level(logging.WARNING, logger="paddle_ema"):
            paddle_ema.load(main, prefix)
        assert "global_step_0 starts at 0" in caplog.text and "ema_0 starts fresh" in caplog.text
        for name, value in saved.items():
            np.testing.assert_array_equal(read(name), value, err_msg=f"loaded {name}")
        oracle = EmaOracle(0.999, ema.parameter_names)
        for update in range(3):
            exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
            oracle.step(read_all(ema.parameter_names), thres_value=update)
            assert_applied_matches(ema, exe, oracle, "counter and EMA started afresh")


def test_stacking_buffers_stay_allocated_and_out_of_checkpoints(exe, rng, tmp_path):
    """A stack's concatenation goes into a scope tensor that keeps its memory from step to step (no
    large temporary freed and faulted back in every step), and no checkpoint carries it: checkpoints
    from before it existed and from now hold the same names."""
    prefix = str(tmp_path / "buffers")
    stack, main, startup = fresh_world()
    with stack:
        net = build_net(main, optimizer="adam")
        ema = paddle_ema.ExponentialMovingAverage(0.9)
        ema.update()
        exe.run(startup)
        plan = ema._plan
        stacks = [g for g in plan.groups if g.stacked is not None]
        assert stacks, "the net must exercise stacked averages"
        scope = paddle.static.global_scope()
        pointers = []
        for _ in range(3):
            exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
            pointers.append([scope.find_var(g.stacked).get_tensor()._ptr() for g in stacks])
        assert pointers[0] == pointers[1] == pointers[2], "a stacking buffer was re-allocated"
        for group in stacks:  # what a buffer holds: this step's parameters, stacked
            members = [read(plan.slots[i].param) for i in group.members]
            np.testing.assert_array_equal(read(group.stacked), np.concatenate(members), err_msg=group.stacked)
        paddle.static.save(main, prefix)
        parameters = {p.name for p in main.global_block().all_parameters()}
    saved = set(paddle.static.load_program_state(prefix))
    assert not saved & {g.stacked for g in stacks}, "a stacking buffer went into the checkpoint"
    assert set(state_names(ema)) | parameters <= saved


def _started_net_with_ema(exe):
    net = build_net(paddle.static.default_main_program(), optimizer="adam")
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    exe.run(paddle.static.default_startup_program())
    return net, ema


def test_older_persistables_checkpoints_load_with_the_predicate_readme_gives(exe, rng, tmp_path):
    """Legacy IR: Paddle's save_persistables saves every persistable variable, the stacking buffers
    too. A checkpoint of paddle_ema 0.3 or earlier lacks them: load_persistables stops at them, and
    paddle.static.io.load_vars with docs/checkpoints.md's predicate (skip need_check_feed, as
    paddle.static.save does) loads everything else bit for bit."""
    dirname = str(tmp_path / "persistables")
    stack, main, startup = fresh_world()
    with stack:
        net, ema = _started_net_with_ema(exe)
        for _ in range(3):
            exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        try:
            paddle.distributed.io.save_persistables(exe, dirname, main)
        except AttributeError as error:  # PIR: 'pir.Program' object has no attribute '_is_distributed'
            pytest.skip(f"paddle.distributed.io.save_persistables cannot save a PIR program: {error}")
        names = ema.parameter_names + state_names(ema)
        saved = read_all(names)
        buffers = [g.stacked for g in ema._plan.groups if g.stacked is not None]
    assert buffers and all((tmp_path / "persistables" / b).exists() for b in buffers)
    for buffer in buffers:  # the checkpoint as paddle_ema 0.3 wrote it
        (tmp_path / "persistables" / buffer).unlink()
    stack, main, startup = fresh_world()
    with stack:
        _started_net_with_ema(exe)
        with pytest.raises(Exception, match="load"):
            paddle.distributed.io.load_persistables(exe, dirname, main)
    stack, main, startup = fresh_world()
    with stack:
        net, ema = _started_net_with_ema(exe)
        paddle.static.io.load_vars(
            exe, dirname, main, predicate=lambda v: v.persistable and not v.desc.need_check_feed()
        )
        for name, value in read_all(names).items():
            np.testing.assert_array_equal(value, saved[name], err_msg=name)
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])  # and training goes on


def _wide_net():
    """Three fc layers 64 -> 64 (weights of 4096 elements) with an EMA of 0.9, trained by SGD."""
    x = paddle.static.data("x", [-1, 64], "float32")
    h = x
    for i in range(3):
        h = paddle.static.nn.fc(h, 64, weight_attr=paddle.ParamAttr(name=f"wide{i}.w"),
                                bias_attr=paddle.ParamAttr(name=f"wide{i}.b"))
    loss = paddle.mean(h * h)
    paddle.optimizer.SGD(0.01).minimize(loss)
    ema = paddle_ema.ExponentialMovingAverage(0.9)
    ema.update()
    return loss, ema


def test_a_checkpoint_with_the_averages_stacked_otherwise_carries_on(exe, rng, tmp_path, monkeypatch, caplog):
    """Up to 0.3, PIR stacked only parameters of up to 1024 elements (now 32768, as the legacy IR
    always did): the same EMA saved in the old layout resumes in the new one, value for value."""
    prefix = str(tmp_path / "old_layout")
    monkeypatch.setattr(paddle_ema._names, "stack_max_numel", lambda: 1024)
    stack, main, startup = fresh_world()
    with stack:
        loss, old = _wide_net()
        old_averages = {g.average for g in old._plan.groups}
        exe.run(startup)
        for _ in range(3):
            exe.run(main, feed={"x": rng.standard_normal((8, 64)).astype("float32")}, fetch_list=[loss])
        with old.apply(exe):
            applied = read_all(old.parameter_names)
        paddle.static.save(main, prefix)
    monkeypatch.undo()
    stack, main, startup = fresh_world()
    with stack:
        loss, new = _wide_net()
        assert not {g.average for g in new._plan.groups} <= old_averages, "the layouts must differ"
        exe.run(startup)
        with caplog.at_level(logging.INFO, logger="paddle_ema"):
            paddle_ema.load(main, prefix)
        assert "stacked otherwise" in caplog.text and "starts fresh" not in caplog.text
        np.testing.assert_array_equal(read(new._plan.step), [3])
        with new.apply(exe):
            for name, value in read_all(new.parameter_names).items():
                np.testing.assert_array_equal(value, applied[name], err_msg=name)


def _edit_checkpoint(prefix, edit):
    """Apply ``edit`` to the checkpoint's non-parameter arrays (.pdopt) and write them back."""
    with open(prefix + ".pdopt", "rb") as f:
        others = pickle.load(f)
    edit(others)
    with open(prefix + ".pdopt", "wb") as f:
        pickle.dump(others, f, protocol=2)


def _stack_key(others):
    return next(k for k in others if ".stack_" in k and k.endswith(".average"))


@pytest.mark.parametrize("edit, says", [
    (lambda s: s.update({"ema_0.bias_correction": np.array([0.0])}), r"0\.0(, which| after) 3 update"),
    (lambda s: s.update({"ema_0.bias_correction": np.array([1.5])}), r"1\.5(, which| after) 3 update"),
    (lambda s: s.update({"ema_0.bias_correction": np.array([np.nan])}), r"nan(, which| after) 3 update"),
    (lambda s: s.update({"ema_0.step": np.array([-7], np.int64)}), "negative update count"),
    (lambda s: s.update({"ema_0.step": np.array([0], np.int64)}), "before the first update"),
], ids=["c 0 after 3 steps", "c 1.5", "c NaN", "step -7", "step 0 with c"])
def test_a_checkpoint_with_counts_no_training_makes_is_refused(exe, rng, tmp_path, edit, says):
    prefix = str(tmp_path / "edited")
    save_trained(exe, rng, prefix, with_ema=True)
    _edit_checkpoint(prefix, edit)
    assert_load_refused(exe, prefix, prefix, ValueError, f"ema_0.bias_correction.*({says})")
    with pytest.raises(ValueError, match=says):
        paddle_ema.load_averages(prefix)


def test_load_averages_refuses_a_stack_of_the_wrong_length(programs, exe, rng, tmp_path):
    prefix = str(tmp_path / "longer")
    save_trained(exe, rng, prefix, with_ema=True)
    _edit_checkpoint(prefix, lambda s: s.update({_stack_key(s): np.append(s[_stack_key(s)], np.float32(1))}))
    with pytest.raises(ValueError, match=r"stack_\w+\.average has 7 rows, its members .* 6"):
        paddle_ema.load_averages(prefix)


def test_load_into_another_program_while_an_ema_of_its_parameters_is_applied_raises(exe, rng, tmp_path):
    prefix = str(tmp_path / "trained")
    save_trained(exe, rng, prefix, with_ema=True)
    stack, main, net, ema = resume(exe, prefix)
    with stack:
        paddle.static.load(main, prefix)
        exe.run(main, feed={"x": batch(rng)}, fetch_list=[net.loss])
        ema.apply(exe, need_restore=False)
        evaluation = paddle.static.Program()
        with paddle.static.program_guard(evaluation, paddle.static.Program()):
            build_net(evaluation, optimizer="adam")  # the same parameters, no EMA
        applied = read_all(ema.parameter_names)
        with pytest.raises(RuntimeError, match="applied in the current scope; call ema.restore"):
            paddle_ema.load(evaluation, prefix)
        for name, value in read_all(ema.parameter_names).items():
            np.testing.assert_array_equal(value, applied[name], err_msg=name)
        ema.restore(exe)


def test_counters_of_one_name_in_two_programs_restart_at_their_own_begin(exe, rng, tmp_path, caplog):
    prefix = str(tmp_path / "no_counter")
    save_trained(exe, rng, prefix, with_ema=False)
    programs = {}
    for begin in (5, 0):  # two programs, each under its own guard: both counters are global_step_0
        stack, main, startup = fresh_world()
        with stack:
            net = build_net(main, optimizer="adam")
            step = paddle_ema.global_step_counter(begin=begin)
            ema = paddle_ema.ExponentialMovingAverage(0.99, thres_steps=step)
            ema.update()
        programs[begin] = (main, startup, net, step, ema)
    main, startup, net, step, _ = programs[5]
    with paddle.static.scope_guard(paddle.static.Scope()):
        exe.run(startup)
        with caplog.at_level(logging.WARNING, logger="paddle_ema"):
            paddle_ema.load(main, prefix)
        assert "global_step_0 starts at 5" in caplog.text
        (value,) = exe.run(main, feed={"x": batch(rng)}, fetch_list=[step])
        assert int(np.asarray(value).reshape(-1)[0]) == 5


@pytest.mark.parametrize("call, error, says", [
    (lambda p: paddle_ema.load(None, p), TypeError, "program must be a paddle.static.Program"),
    (lambda p: paddle_ema.load(paddle.static.default_main_program(), None), TypeError,
     "path_prefix must be a str"),
    (lambda p: paddle_ema.load_averages(None), TypeError, "path_prefix must be a str"),
    (lambda p: paddle_ema.load_averages(p, name=5), TypeError, "name must be a non-empty str"),
    (lambda p: paddle_ema.global_step_counter(name=3), TypeError, "name must be a non-empty str"),
], ids=["load program", "load path", "load_averages path", "load_averages name", "counter name"])
def test_checkpoint_functions_name_a_bad_argument(exe, rng, tmp_path, call, error, says):
    prefix = str(tmp_path / "ok")
    save_trained(exe, rng, prefix, with_ema=True)
    with pytest.raises(error, match=says):
        call(prefix)
