"""Caps on the sizes that drive work or memory before anything is checked against a file.

A spec or table from elsewhere is read before it can be trusted: these bounds are checked first,
so a hostile or mistyped value is refused at once instead of computing primes for minutes or
reserving memory it cannot have. Each lies far above any real table (DeepSeek-V4.1: a 129,280-id
vocabulary, 8 heads of ~48M rows per order, 3 orders, 2 layers, rows of 256 values).
"""

from __future__ import annotations

__all__ = ["MAX_VOCAB_SIZE", "MAX_BASE_SIZE", "MAX_NGRAM_SIZE", "MAX_HEADS", "MAX_HEAD_DIM", "MAX_LAYER_ID",
           "MAX_SEED", "MAX_CONFIG_BYTES", "MAX_INDEX_BYTES", "MAX_TOKENIZER_BYTES", "MAX_SPEC_BYTES",
           "MAX_SAFETENSORS_HEADER_BYTES", "MAX_JSON_DEPTH"]

MAX_VOCAB_SIZE = 1 << 27      # raw and compressed token ids (a 1 GiB int64 compression lookup)
MAX_BASE_SIZE = 1 << 40       # engram_vocab_size: rows of one head's table
MAX_NGRAM_SIZE = 32           # N, the largest n-gram order
MAX_HEADS = 4096              # heads of every layer together: each gets a prime computed at open
MAX_HEAD_DIM = 1 << 16        # D, values per row
MAX_LAYER_ID = (1 << 31) - 1  # a model layer index
MAX_SEED = (1 << 63) - 1      # the hash seed (an int64)

# Files of a checkpoint folder (and files named on the command line) read whole: each is refused
# above its cap before a byte is read. Each cap lies far above what models ship: a config.json
# holds kilobytes, an index one short line per tensor, a tokenizer.json some megabytes.
MAX_CONFIG_BYTES = 8 << 20               # config.json
MAX_INDEX_BYTES = 128 << 20              # model.safetensors.index.json
MAX_TOKENIZER_BYTES = 256 << 20          # tokenizer.json (Hugging Face tokenizers)
MAX_SPEC_BYTES = 1 << 20                 # a TableSpec as JSON (`engram build --spec`): a few hundred bytes
MAX_SAFETENSORS_HEADER_BYTES = 100_000_000   # the safetensors library's own cap on a header (MAX_HEADER_SIZE)
MAX_JSON_DEPTH = 64                      # nesting of any JSON read from elsewhere (real files: under 10)
