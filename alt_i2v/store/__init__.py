"""The training store: ``DATA/store/``, decoded, resized uint8 images with their labels in LevelDB.

One LevelDB (the default, ``--shards 1``), or N shards written and read by one process each::

    DATA/store/                          one LevelDB (records.py has its keys), or
    DATA/store/meta.json                 {version, shards, image_size, resize, vocab_sha256, num_tags, split}
    DATA/store/shard-00000-of-0000N/ ... one LevelDB each, the same format

``records`` is the format, ``reader`` the :class:`Store` that reads either layout, ``build`` the
``--build`` stage, ``shards`` the sharded layout (docs/feeding.md).
"""

from ..data.layout import STORE_DIR
from .build import PRUNE_SHARE, BuildResult, _finish_swap, build_shard, build_store
from .reader import Store, is_sharded, open_store, store_lock, store_path
from .records import (IDX, LAYOUT_FILE, META_KEY, REC, SPLITS, STORE_VERSION, check_meta, check_record,
                      encode_record, multi_hot, pack, split_of, unpack)
from .shards import ShardedStore, build_sharded, shard_name, shard_of, shards_for_process

__all__ = ["Store", "ShardedStore", "open_store", "build_store", "BuildResult", "split_of", "multi_hot",
           "encode_record", "pack", "unpack", "check_meta", "check_record", "SPLITS", "shard_of", "shard_name",
           "shards_for_process", "store_lock", "store_path", "is_sharded", "build_shard", "build_sharded",
           "PRUNE_SHARE", "LAYOUT_FILE", "STORE_VERSION", "META_KEY", "REC", "IDX", "STORE_DIR", "_finish_swap"]
