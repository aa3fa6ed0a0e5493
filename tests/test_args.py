"""The shared argument checks: ints and reals, never bools, named in the error."""

import numpy as np
import pytest

from engram import InputError, SpecError
from engram.args import check_int, check_real, is_int, is_real


def test_ints_and_reals_exclude_bools():
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert is_real(0.5) and is_real(2) and is_real(np.float32(0.5)) and not is_real(False) and not is_real("1")


def test_check_int_names_the_argument_value_and_bound():
    check_int("n", np.int32(4), 1)
    with pytest.raises(InputError, match=r"^n=True is invalid: expected an int >= 1 \(rows\)$"):
        check_int("n", True, 1, " (rows)")
    with pytest.raises(SpecError, match=r"^vocab_size=0 is invalid: expected an int >= 1$"):
        check_int("vocab_size", 0, 1, error=SpecError)


def test_check_real_refuses_nan_and_values_below_the_bound():
    check_real("lr", 0, 0)
    for bad in (float("nan"), -0.1, "0.1", True):
        with pytest.raises(InputError, match=r"^lr=.* is invalid: expected a float >= 0$"):
            check_real("lr", bad, 0)
