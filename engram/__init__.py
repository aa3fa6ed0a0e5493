"""engram: hashed N-gram memory tables on DRAM and SSD for PyTorch models. This is the public API."""

import importlib
from typing import TYPE_CHECKING, Any

from .compression import Compression as Compression
from .corpus import CorpusStats as CorpusStats
from .corpus import corpus_stats as corpus_stats
from .corpus import tokenize_files as tokenize_files
from .errors import CorruptTableError as CorruptTableError
from .errors import EngramError as EngramError
from .errors import InputError as InputError
from .errors import MissingFileError as MissingFileError
from .errors import ShardMismatchError as ShardMismatchError
from .errors import SpecError as SpecError
from .errors import SpecMismatchError as SpecMismatchError
from .errors import TableExistsError as TableExistsError
from .errors import TableNotFoundError as TableNotFoundError
from .errors import TokenIdError as TokenIdError
from .hashing import NgramHasher as NgramHasher
from .history import NgramHistory as NgramHistory
from .hotrows import HotRowPlan as HotRowPlan
from .spec import TableSpec as TableSpec
from .stats import LookupStats as LookupStats

if TYPE_CHECKING:
    from .build import build_table as build_table
    from .checkpoint import Checkpoint as Checkpoint
    from .checkpoint import open_checkpoint as open_checkpoint
    from .conversion import ConvertReport as ConvertReport
    from .conversion import convert as convert
    from .memory import EngramMemory as EngramMemory
    from .memory_v41 import EngramMemoryV41 as EngramMemoryV41
    from .module_cache import EngramCache as EngramCache
    from .opening import lookup as lookup
    from .opening import open as open
    from .prefetch import Prefetch as Prefetch
    from .table import Table as Table
    from .training import export_rows as export_rows
    from .training import param_groups as param_groups

# Names whose modules import torch load on first use, so `import engram` stays fast.
_LAZY = {"EngramMemory": ".memory", "EngramMemoryV41": ".memory_v41", "Table": ".table", "build_table": ".build",
         "lookup": ".opening", "open": ".opening", "export_rows": ".training", "param_groups": ".training",
         "open_checkpoint": ".checkpoint", "Checkpoint": ".checkpoint", "Prefetch": ".prefetch",
         "convert": ".conversion", "ConvertReport": ".conversion", "EngramCache": ".module_cache"}


def __getattr__(name: str) -> Any:
    if name == "distributed":            # the subpackage, imported on first use (it imports torch.distributed)
        return importlib.import_module(".distributed", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engram' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "Compression",
    "ConvertReport",
    "CorpusStats",
    "CorruptTableError",
    "EngramCache",
    "EngramError",
    "EngramMemory",
    "EngramMemoryV41",
    "HotRowPlan",
    "InputError",
    "LookupStats",
    "MissingFileError",
    "NgramHasher",
    "NgramHistory",
    "Prefetch",
    "ShardMismatchError",
    "SpecError",
    "SpecMismatchError",
    "Table",
    "TableExistsError",
    "TableNotFoundError",
    "TableSpec",
    "TokenIdError",
    "build_table",
    "convert",
    "corpus_stats",
    "export_rows",
    "lookup",
    "open_checkpoint",
    "open",
    "param_groups",
    "tokenize_files",
]
