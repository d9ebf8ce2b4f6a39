"""The Genesis pretraining data pipeline: a YAML mixture in, packed `(batch, seq_len)` batches out.

- `load_mixture(name_or_path)`: the mixture (`"default"`: the embedded corpus, prose + code; `"genesis-1b"`: the
  ~60B-token Genesis 1B mixture of Hub datasets; or any YAML file), see `genesis_hf.data.mixture`.
- `build_pretrain_loader(...)`: the infinite, rank-split, exactly resumable loader, streaming from the sources or
  reading a pre-tokenized directory, see `genesis_hf.data.loader`; in a `torch.distributed` run the ranks share the
  streaming tokenization, see `genesis_hf.data.sharing`.
- `build_validation_batches(...)`: batches of held-out documents.
- `genesis-hf data prepare` / `genesis-hf data merge`: pre-tokenize (one SLURM array task per `--shard i/N`), see
  `genesis_hf.data.prepare`.
"""

from genesis_hf.data.loader import PackedLoader, build_pretrain_loader, build_validation_batches
from genesis_hf.data.mixture import MixtureConfig, SourceConfig, load_mixture
from genesis_hf.data.prepare import prepare_tokenized
from genesis_hf.data.tokenized import merge_tokenized

__all__ = [
    "MixtureConfig",
    "PackedLoader",
    "SourceConfig",
    "build_pretrain_loader",
    "build_validation_batches",
    "load_mixture",
    "merge_tokenized",
    "prepare_tokenized",
]
