"""The dataset directory: its paths, posts.jsonl and ``--import``, the vocabulary, the one image loader and
captions. Nothing here imports Keras."""
