"""Similar-image search over model embeddings.

- :mod:`.index`: ``SimilarityIndex`` (exact search, optional faiss approximate backend)
- :mod:`.kernels`: the exact top-k and float16 scan kernels
- :mod:`.quantisers`: the faiss IVF parts of the approximate backend, made and trained
- :mod:`.files`: the index directory on disk (atomic write, checked read)
- :mod:`.build`: an index of a dataset or folder made with a model, and opening one for queries
"""

from .build import add_to_index, build_index, embed_store, open_index
from .files import INDEX_FORMAT, INDEX_VERSION, IndexFileError, faiss_available
from .index import SimilarityIndex
from .kernels import normalize_rows

__all__ = ["SimilarityIndex", "IndexFileError", "add_to_index", "normalize_rows", "faiss_available", "build_index", "embed_store",
           "open_index", "INDEX_FORMAT", "INDEX_VERSION"]
