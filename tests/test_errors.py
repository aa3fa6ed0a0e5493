"""The error hierarchy: every engram error is also the builtin a caller would naturally catch."""

from __future__ import annotations

import pytest

import engram


@pytest.mark.parametrize("error, builtins", [
    (engram.SpecError, (ValueError,)),
    (engram.SpecMismatchError, (ValueError,)),
    (engram.InputError, (ValueError,)),
    (engram.TokenIdError, (engram.InputError, ValueError)),
    (engram.MissingFileError, (FileNotFoundError, OSError)),
    (engram.TableNotFoundError, (engram.MissingFileError, FileNotFoundError)),
    (engram.TableExistsError, (FileExistsError,)),
    (engram.CorruptTableError, (OSError,)),
    (engram.RankFailureError, (RuntimeError,)),
    (engram.IncompleteSaveError, (engram.CorruptTableError, OSError)),
])
def test_every_error_is_an_engram_error_and_its_builtin(error, builtins):
    assert issubclass(error, engram.EngramError)
    for builtin in builtins:
        assert issubclass(error, builtin)


def test_missing_inputs_that_are_not_tables_are_not_table_errors(tmp_path):
    with pytest.raises(engram.MissingFileError, match="tokenizer file .* does not exist") as info:
        engram.Compression.from_tokenizer_file(tmp_path / "none.json")
    assert not isinstance(info.value, engram.TableNotFoundError)
    with pytest.raises(engram.TableNotFoundError):
        engram.open(tmp_path / "none.engram")
