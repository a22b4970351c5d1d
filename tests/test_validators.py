"""causal_ie.validators: config values checked with errors that name the key."""

from __future__ import annotations

import math

import pytest

from causal_ie import validators


def test_number_and_its_ranges():
    assert validators.number("attack.eps", "0.5") == 0.5
    assert validators.number("x", 0, 0.0) == 0.0
    cases = [
        (("attack.eps", True), "attack.eps must be a number, got True"),
        (("attack.eps", "big"), "attack.eps must be a number, got 'big'"),
        (("attack.eps", math.nan), "attack.eps must be a finite number, got nan"),
        (("attack.eps", -0.1, 0.0), "attack.eps must be a finite number >= 0, got -0.1"),
        (("alpha", 0.0, 0.0, math.inf, True), "alpha must be a finite number > 0, got 0.0"),
        (("eps", 1.5, 0.0, 1.0), r"eps must be a finite number in \[0, 1\], got 1.5"),
        (("eps", math.inf, 0.0), "eps must be a finite number >= 0, got inf"),
    ]
    for args, message in cases:
        low_open = len(args) > 4 and args[4]
        with pytest.raises(ValueError, match=f"^{message}$"):
            validators.number(*args[:4], low_open=low_open)


def test_count_share_choice_norm():
    assert validators.count("steps", 3.0) == 3
    for bad in (0, 2.5, True, "ten"):
        with pytest.raises(ValueError, match="^steps must be a"):
            validators.count("steps", bad)
    assert validators.count("n", 0, minimum=0) == 0
    assert validators.share("ratio", 1) == 1.0
    with pytest.raises(ValueError, match=r"^model.adv_train.ratio must be a finite number in \[0, 1\], got 1.5$"):
        validators.share("model.adv_train.ratio", 1.5)
    assert validators.choice("data.readers", "any", ("any", "majority")) == "any"
    with pytest.raises(ValueError, match="^data.readers='all': expected one of any, majority$"):
        validators.choice("data.readers", "all", ("any", "majority"))
    assert [validators.norm("norm", n) for n in ("linf", "Linf", "INF", "l2", "L2")] == ["Linf"] * 3 + ["L2"] * 2
    for bad in ("L1", None, 2):
        with pytest.raises(ValueError, match="expected Linf or L2"):
            validators.norm("attack.norm", bad)


def test_subset_takes_one_or_several_choices_and_names_the_key():
    from causal_ie.validators import subset

    assert subset("data.views", "PA", ("PA", "AP")) == ["PA"]
    assert subset("data.views", ["PA", "AP"], ("PA", "AP")) == ["PA", "AP"]
    assert subset("data.views", ["*"], ("PA", "AP")) == ["*"]
    with pytest.raises(ValueError, match=r"data.views=\['PA', 'LL'\]: each must be one of PA, AP, \*"):
        subset("data.views", ["PA", "LL"], ("PA", "AP"))
    with pytest.raises(ValueError, match=r"data.views=\[\]"):
        subset("data.views", [], ("PA", "AP"))
