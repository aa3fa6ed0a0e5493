"""engram: hashed N-gram memory tables on DRAM and SSD for PyTorch models. This is the public API.

Every name below is imported on first use (the errors excepted), so `import engram` stays fast;
`dir(engram)` lists them all. The architecture (which subpackage owns what) is in docs/architecture.md.
"""

import importlib
from typing import TYPE_CHECKING, Any

from engram.errors import CorruptTableError as CorruptTableError
from engram.errors import EngramError as EngramError
from engram.errors import IncompleteSaveError as IncompleteSaveError
from engram.errors import InputError as InputError
from engram.errors import MissingFileError as MissingFileError
from engram.errors import QualityGateError as QualityGateError
from engram.errors import RankFailureError as RankFailureError
from engram.errors import ShardMismatchError as ShardMismatchError
from engram.errors import SpecError as SpecError
from engram.errors import SpecMismatchError as SpecMismatchError
from engram.errors import TableExistsError as TableExistsError
from engram.errors import TableNotFoundError as TableNotFoundError
from engram.errors import TokenIdError as TokenIdError

__version__ = "0.1.0"

# Public name -> the module that defines it.
_LAZY = {
    "Compression": "addressing.compression", "TableSpec": "addressing.spec", "NgramHasher": "addressing.hashing",
    "NgramHistory": "addressing.history", "Table": "serving.table", "LookupStats": "serving.stats",
    "Prefetch": "serving.prefetch", "HotRowPlan": "serving.hotrows", "open": "opening", "lookup": "opening",
    "build_table": "making.build", "convert": "making.conversion", "ConvertReport": "making.conversion",
    "open_checkpoint": "making.checkpoint", "Checkpoint": "making.checkpoint", "CorpusStats": "making.corpus",
    "corpus_stats": "making.corpus", "tokenize_files": "making.corpus", "EngramMemory": "layers.memory",
    "EngramMemoryV41": "layers.memory_v41", "EngramCache": "layers.module_cache", "export_rows": "layers.training",
    "param_groups": "layers.training", "OffloadedRows": "offload.rows", "OffloadStats": "offload.stats",
}
_SUBPACKAGES = ("distributed", "data", "quality")   # imported on first use too (distributed imports torch.distributed)

if TYPE_CHECKING:
    from engram import data as data
    from engram import distributed as distributed
    from engram import quality as quality
    from engram.addressing.compression import Compression as Compression
    from engram.addressing.hashing import NgramHasher as NgramHasher
    from engram.addressing.history import NgramHistory as NgramHistory
    from engram.addressing.spec import TableSpec as TableSpec
    from engram.layers.memory import EngramMemory as EngramMemory
    from engram.layers.memory_v41 import EngramMemoryV41 as EngramMemoryV41
    from engram.layers.module_cache import EngramCache as EngramCache
    from engram.layers.training import export_rows as export_rows
    from engram.layers.training import param_groups as param_groups
    from engram.making.build import build_table as build_table
    from engram.making.checkpoint import Checkpoint as Checkpoint
    from engram.making.checkpoint import open_checkpoint as open_checkpoint
    from engram.making.conversion import ConvertReport as ConvertReport
    from engram.making.conversion import convert as convert
    from engram.making.corpus import CorpusStats as CorpusStats
    from engram.making.corpus import corpus_stats as corpus_stats
    from engram.making.corpus import tokenize_files as tokenize_files
    from engram.offload.rows import OffloadedRows as OffloadedRows
    from engram.offload.stats import OffloadStats as OffloadStats
    from engram.opening import lookup as lookup
    from engram.opening import open as open
    from engram.serving.hotrows import HotRowPlan as HotRowPlan
    from engram.serving.prefetch import Prefetch as Prefetch
    from engram.serving.stats import LookupStats as LookupStats
    from engram.serving.table import Table as Table


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"engram.{name}")
    if name in _LAZY:
        value = getattr(importlib.import_module(f"engram.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engram' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))


__all__ = sorted([*_LAZY, "CorruptTableError", "EngramError", "IncompleteSaveError", "InputError", "MissingFileError",
                  "QualityGateError", "RankFailureError",
                  "ShardMismatchError",
                  "SpecError", "SpecMismatchError", "TableExistsError", "TableNotFoundError", "TokenIdError"])
