"""The training store: ``DATA/store/``, decoded, resized uint8 images with their labels in LevelDB.

One LevelDB (the default, ``--shards 1``), or N shards written and read by one process each::

    DATA/store/                          one LevelDB (records.py has its keys), or
    DATA/store/meta.json                 {version, shards, image_size, resize, vocab_sha256, num_tags, split}
    DATA/store/shard-00000-of-0000N/ ... one LevelDB each, the same format

``records`` is the format and ``layout`` where a store is on disk (both halves use them). The reader
half: ``reader`` (:class:`Store`, :class:`ShardedStore`, :func:`open_store` for either layout) and
``views`` (a private view for one of several processes). The builder half: ``build`` (the ``--build``
stage), ``writer`` (one LevelDB) and ``build_shards`` (N of them, one process each). docs/feeding.md.
"""

from ..data.layout import STORE_DIR
from .build import BuildResult, build_store
from .layout import is_sharded, shard_name, shard_of, shards_for_process, store_lock, store_path
from .reader import ShardedStore, Store, open_store
from .records import (IDX, LAYOUT_FILE, META_KEY, REC, SPLITS, STORE_VERSION, check_meta, check_record,
                      encode_record, multi_hot, pack, split_of, unpack)
from .writer import PRUNE_SHARE, build_shard

__all__ = ["Store", "ShardedStore", "open_store", "build_store", "BuildResult", "split_of", "multi_hot",
           "encode_record", "pack", "unpack", "check_meta", "check_record", "SPLITS", "shard_of", "shard_name",
           "shards_for_process", "store_lock", "store_path", "is_sharded", "build_shard", "PRUNE_SHARE",
           "LAYOUT_FILE", "STORE_VERSION", "META_KEY", "REC", "IDX", "STORE_DIR"]
