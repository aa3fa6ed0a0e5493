"""engram: hashed N-gram memory tables on DRAM and SSD for PyTorch models. This is the public API."""

from .compression import Compression as Compression
from .errors import CorruptTableError as CorruptTableError
from .errors import EngramError as EngramError
from .errors import InputError as InputError
from .errors import SpecError as SpecError
from .errors import SpecMismatchError as SpecMismatchError
from .errors import TableExistsError as TableExistsError
from .errors import TableNotFoundError as TableNotFoundError
from .errors import TokenIdError as TokenIdError
from .hashing import NgramHasher as NgramHasher
from .spec import TableSpec as TableSpec

__version__ = "0.1.0"

__all__ = [
    "Compression",
    "CorruptTableError",
    "EngramError",
    "InputError",
    "NgramHasher",
    "SpecError",
    "SpecMismatchError",
    "TableExistsError",
    "TableNotFoundError",
    "TableSpec",
    "TokenIdError",
]
