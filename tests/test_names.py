"""paddle_ema._names reads back every name it makes, and nothing else."""

from __future__ import annotations

import hashlib

from paddle_ema import _names


def test_state_names_are_read_back_from_a_checkpoint_s_keys():
    stack = _names.stack_name(["fc.b_0", "bn.w_0"])
    keys = [
        _names.step("ema_0"), _names.bias_correction("ema_0"), _names.average("ema_0", "fc.w_0"),
        _names.average("ema_0", stack), _names.step("ema_10"), _names.bias_correction("ema_10"),
        _names.average("ema_10", "fc.w_0"), "fc.w_0", "ema_0.fc.w_0.moment", "ema_0x.fc.w_0.average",
    ]
    made = ["ema_0.step", "ema_0.bias_correction", "ema_0.fc.w_0.average", f"ema_0.{stack}.average"]
    assert keys[:4] == made
    assert _names.ema_prefixes(reversed(keys)) == ["ema_0", "ema_10"]
    assert _names.averages_of("ema_0", keys) == {"fc.w_0": keys[2], stack: keys[3]}
    assert _names.averages_of("ema_1", keys) == {}


def test_a_stack_is_named_by_the_digest_of_its_sorted_members():
    expected = "stack_" + hashlib.sha1(b"a.w_0\nb.w_0\nc.w_0").hexdigest()[:12]
    assert _names.stack_name(["c.w_0", "a.w_0", "b.w_0"]) == expected
    assert _names.stack_name(["a.w_0", "b.w_0"]) != expected


def test_an_ema_s_name_finds_its_unique_prefixes_only():
    assert _names.is_prefix_of("ema_0", "ema") and _names.is_prefix_of("ema_12", "ema")
    assert _names.is_prefix_of("ema_0", "ema_0"), "the full prefix names it too"
    for other in ("ema2_0", "ema_", "ema_0_1", "xema_0", "ema_a"):
        assert not _names.is_prefix_of(other, "ema"), other


def test_paddle_class_averages_are_found_under_their_name_prefix():
    keys = ["fc_0.w_0_ema_0", "emafc_0.w_0_ema_3", "fc_0.w_0", "fc_0.w_0_ema_x", _names.PADDLE_STEP]
    assert _names.paddle_class_prefixes(keys, "fc_0.w_0") == ["", "ema"]
    assert _names.paddle_class_averages(keys, "ema", "fc_0.w_0") == ["emafc_0.w_0_ema_3"]
    assert _names.paddle_class_averages(keys, "", "fc_0.w_0") == ["fc_0.w_0_ema_0"]
    assert _names.paddle_class_averages(keys, "", "fc_0.b_0") == []


def test_past_stacking_limits_come_first_and_the_current_one_last():
    assert _names.stack_limits() == (1024, _names.stack_max_numel())
