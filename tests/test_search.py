"""SimilarityIndex (exact, approximate, on-disk format) and --index / --similar on a tiny trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _inference_model import near_duplicate, shapes, trained_model
from alt_i2v.search import files as search_files
from alt_i2v.search import index as search_index
from alt_i2v.cli import main
from alt_i2v.search import IndexFileError, SimilarityIndex, faiss_available

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed (pip install alt-i2v[faiss])")


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :k]


def clustered(n: int, dim: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    return centers[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ exact


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_search_matches_brute_force_across_chunks_and_blocks(dtype, monkeypatch):
    monkeypatch.setattr(search_index, "_CHUNK_BYTES", 4096)  # many small chunks: exercises the running top-k
    x = clustered(700, seed=1)
    q = clustered(9, seed=2)
    index = SimilarityIndex.build(x[:300], [f"a{i}" for i in range(300)], dtype=dtype)
    index.add(x[300:], [f"a{i}" for i in range(300, 700)])  # a second block
    scores, pos = index.search_positions(q, 10)
    want = brute_force(x, q, 10)
    if dtype == "float32":
        assert (pos == want).all()
    else:  # float16 storage may swap near-ties
        assert np.mean([len(set(a) & set(b)) for a, b in zip(pos, want)]) >= 9.5
    assert (np.diff(scores, axis=1) <= 1e-6).all() and scores.dtype == np.float32
    assert index.vectors().dtype == np.dtype(dtype)


@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
def test_float16_kernel_equals_a_plain_float32_product(signed):
    """The integer-widening float16 scan (threads and all) scores exactly what NumPy's own float16 ->
    float32 conversion followed by a float32 matrix product scores, zeros and subnormals included."""
    from alt_i2v.search.kernels import _F16_SCALE, _f16_topk, normalize_rows

    rng = np.random.default_rng(5)
    n, dim, k = 20_000, 48, 7  # more rows than one thread's span: the threaded path runs
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x = x if signed else np.abs(x)
    x[:50, :10] = 0.0  # exact zeros
    x[50:60, 0] = 1e-6 * np.linalg.norm(x[50:60], axis=1)  # subnormal in float16 after normalising
    block = normalize_rows(x).astype(np.float16)
    q = normalize_rows(rng.standard_normal((5, dim)).astype(np.float32))

    want = block.astype(np.float32) @ q.T  # (n, Q) the plain way
    scores, pos = _f16_topk(block, np.ascontiguousarray(q.T * np.float32(_F16_SCALE)), k, 0, not signed)
    order = np.argsort(-scores, axis=1, kind="stable")
    scores, pos = np.take_along_axis(scores, order, 1)[:, :k], np.take_along_axis(pos, order, 1)[:, :k]
    np.testing.assert_allclose(scores, np.take_along_axis(want.T, pos, 1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(scores, -np.sort(-want.T, axis=1)[:, :k], rtol=1e-6, atol=1e-7)

    index = SimilarityIndex.build(block, dtype="float16")  # the same through the index
    got, where = index.search_positions(q, k)
    np.testing.assert_allclose(got, -np.sort(-want.T, axis=1)[:, :k], rtol=1e-6, atol=1e-7)


def test_results_ids_scores_and_shapes():
    x = clustered(50, seed=3)
    index = SimilarityIndex.build(x, [f"img{i}" for i in range(50)])
    one = index.search(x[7], k=3)
    assert isinstance(one, list) and one[0][0] == "img7" and one[0][1] == pytest.approx(1.0, abs=1e-5)
    assert all(isinstance(i, str) and isinstance(s, float) for i, s in one)
    batch = index.search(x[:4], k=2)
    assert [r[0][0] for r in batch] == ["img0", "img1", "img2", "img3"]
    assert len(index.search(x[0], k=500)) == 50  # k larger than the index
    with pytest.raises(IndexFileError, match="shape"):
        index.search(np.ones(31, np.float32))
    with pytest.raises(ValueError, match="duplicate"):
        index.add(x[:1], ["img3"])
    with pytest.raises(ValueError, match="zeros"):
        index.add(np.zeros((1, 32)), ["zero"])
    positional = SimilarityIndex.build(x)
    assert positional.search(x[5], 1)[0][0] == 5


def test_save_load_round_trip(tmp_path):
    x = clustered(120, seed=4)
    ids = [f"id{i}" for i in range(100)] + list(range(20))
    index = SimilarityIndex.build(x, ids, paths=[f"/p/{i}.png" for i in range(120)], dtype="float16",
                                  info={"model": {"path": "m"}})
    path = index.save(tmp_path / "idx")
    header = json.loads((path / "index.json").read_text())
    assert header["format"] == "alt-i2v-similarity-index" and header["version"] == 1
    assert header["count"] == 120 and header["dim"] == 32 and header["dtype"] == "float16"
    assert set(header["files"]) == {"vectors.npy", "ids.json"}
    assert np.load(path / "vectors.npy", allow_pickle=False).shape == (120, 32)  # plain .npy, no pickle
    for mmap in (False, True):
        back = SimilarityIndex.load(path, mmap=mmap)
        assert back.ids == ids and back.paths == index.paths and back.info == index.info
        assert np.array_equal(np.asarray(back.vectors()), index.vectors())
        assert back.search(x[3], 5) == index.search(x[3], 5)
    back.add(clustered(2, seed=9), ["new1", "new2"], paths=["/p/n1", "/p/n2"])  # a loaded (mapped) index grows
    assert back.search(clustered(2, seed=9)[1], 1)[0][0] == "new2"
    back.save(path)  # replacing an existing index is atomic (temp dir + rename)
    assert SimilarityIndex.load(path).count == 122
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="not an alt-i2v index"):
        index.save(tmp_path / "other")


def test_damaged_or_mismatched_index_is_a_clear_error(tmp_path):
    x = clustered(64, seed=5)
    path = SimilarityIndex.build(x, [str(i) for i in range(64)]).save(tmp_path / "idx")
    vec = path / "vectors.npy"
    good = vec.read_bytes()

    flipped = bytearray(good)
    flipped[-7] ^= 0xFF
    vec.write_bytes(bytes(flipped))
    with pytest.raises(IndexFileError, match="checksum mismatch"):
        SimilarityIndex.load(path)
    vec.write_bytes(good[:-100])
    with pytest.raises(IndexFileError, match="damaged"):
        SimilarityIndex.load(path)
    vec.write_bytes(good)

    header = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps({**header, "version": 99}))
    with pytest.raises(IndexFileError, match="newer"):
        SimilarityIndex.load(path)
    (path / "index.json").write_text(json.dumps({**header, "dim": 16}))
    with pytest.raises(IndexFileError, match="do not belong together"):
        SimilarityIndex.load(path)
    (path / "index.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="damaged index header .*; rebuild the index"):
        SimilarityIndex.load(path)
    (path / "index.json").write_text("[1, 2]")
    with pytest.raises(IndexFileError, match="must be a JSON object; rebuild the index"):
        SimilarityIndex.load(path)
    (path / "index.json").write_text(json.dumps(header))
    good_ids = (path / "ids.json").read_bytes()
    (path / "ids.json").write_text(json.dumps({"ids": ["1"], "paths": None}))
    with pytest.raises(IndexFileError, match="ids.json"):
        SimilarityIndex.load(path)
    (path / "ids.json").write_bytes(b'{"ids": ['.ljust(len(good_ids)))  # the size the header wants, cut JSON
    with pytest.raises(IndexFileError, match="ids.json: damaged id list .*; rebuild the index"):
        SimilarityIndex.load(path, verify=False)
    with pytest.raises(IndexFileError, match="no such index"):
        SimilarityIndex.load(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ approx


@needs_faiss
def test_approximate_backend_recall_and_round_trip(tmp_path, monkeypatch):
    x = clustered(4000, dim=64, clusters=40, seed=6)
    q = clustered(50, dim=64, clusters=40, seed=6)[::-1] + 0.05
    index = SimilarityIndex.build(x, approx=True, nlist=16)
    assert index.has_approx and index.approx_params["nlist"] == 16
    assert index.approx_params["recall10"] >= 0.95  # nprobe calibrated against exact search at build
    _, exact = index.search_positions(q, 10, approx=False)
    _, approx = index.search_positions(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)])
    assert recall >= 0.9
    path = index.save(tmp_path / "approx")
    assert "approx.faiss" in json.loads((path / "index.json").read_text())["files"]
    back = SimilarityIndex.load(path)
    assert back.has_approx and (back.search_positions(q, 10)[1] == approx).all()
    back.add(x[:1] * 3, [4000])  # positional ids continue; the approximate index grows too
    assert back.search(x[0] * 3, 2, approx=True)[0][1] == pytest.approx(1.0, abs=1e-4)

    monkeypatch.setattr(search_files, "faiss_available", lambda: False)  # faiss gone: exact search, with a note
    plain = SimilarityIndex.load(path)
    assert not plain.has_approx and (plain.search_positions(q, 10)[1] == exact).all()


def test_approx_without_faiss_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *a, **k):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(Exception, match=r"alt-i2v\[faiss\]"):
        SimilarityIndex.build(clustered(100), approx=True)


# ------------------------------------------------------------------------------------------------ model


@pytest.fixture(scope="module")
def model_dir(built_data, tmp_path_factory) -> Path:
    return trained_model(built_data, tmp_path_factory)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> tuple[Path, list[Path], list[Path]]:
    """30 unrelated shape pictures and, for 6 of them, a resized + JPEG re-encoded near-duplicate."""
    d = tmp_path_factory.mktemp("gallery")
    originals, dups = [], []
    for i, img in enumerate(shapes(30, seed=21)):
        p = d / f"img{i:02d}.png"
        img.save(p)
        originals.append(p)
        if i < 6:
            dp = d / f"dup{i:02d}.jpg"
            dp.write_bytes(near_duplicate(img, 90 if i % 2 else 48))
            dups.append(dp)
    return d, originals, dups


def test_nearest_is_itself_then_its_near_duplicate(model_dir, gallery):
    from alt_i2v.tagging.tagger import get_tagger

    d, originals, dups = gallery
    files = originals + dups
    tagger = get_tagger(model_dir)
    index = SimilarityIndex.build(tagger.embed([str(f) for f in files]), [f.name for f in files])
    for i, dup in enumerate(dups):
        hits = index.search(tagger.embed(str(originals[i])), k=5)
        assert hits[0][0] == originals[i].name and hits[0][1] == pytest.approx(1.0, abs=1e-4)
        assert hits[1][0] == dup.name, hits  # the re-encoded copy beats every unrelated picture
        back = index.search(tagger.embed(str(dup)), k=2)
        assert {h[0] for h in back} == {dup.name, originals[i].name}


def test_cli_index_and_similar(model_dir, gallery, tmp_path, capsys):
    d, originals, dups = gallery
    out = tmp_path / "gallery.index"
    assert main(["--index", "--model", str(model_dir), "--images", str(d), "--out", str(out), "-q"]) == 0
    info = json.loads((out / "index.json").read_text())
    assert info["count"] == 36 and info["info"]["model"]["path"] == str(model_dir.resolve())
    capsys.readouterr()
    assert main(["--similar", str(originals[1]), "--index", str(out), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "nearest to" in lines[0] and len(lines) == 5
    assert lines[1].split() == ["rank", "cosine", "file"]  # every column is labelled
    rank, score, name = lines[2].split()
    assert rank == "1" and float(score) == pytest.approx(1.0, abs=1e-3) and Path(name).name == "img01.png"
    assert Path(lines[3].split()[2]).name == "dup01.jpg"


def test_cli_index_from_a_dataset_store(model_dir, built_data, tmp_path, capsys):
    from alt_i2v.data.posts import post_image_path, read_posts

    out = tmp_path / "data.index"
    assert main(["--index", "--model", str(model_dir), "--data", str(built_data), "--out", str(out), "-q"]) == 0
    index = SimilarityIndex.load(out)
    posts = read_posts(built_data).posts
    assert len(index) == len(posts) and set(index.ids) == {p["id"] for p in posts}
    query = post_image_path(posts[3], built_data)
    capsys.readouterr()
    assert main(["--similar", str(query), "--index", str(out), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["rank", "cosine", "id", "file"]  # post ids are labelled as such
    first = lines[2].split()
    assert first[2] == str(posts[3]["id"]) and first[3] == str(query)


def test_cli_similar_refuses_an_index_of_another_model(model_dir, gallery, tmp_path, capsys):
    d, originals, _ = gallery
    out = tmp_path / "g.index"
    main(["--index", "--model", str(model_dir), "--images", str(d), "--out", str(out), "-q"])
    header = json.loads((out / "index.json").read_text())
    header["info"]["model"]["fingerprint"] = "0" * 64
    (out / "index.json").write_text(json.dumps(header))
    assert main(["--similar", str(originals[0]), "--index", str(out)]) == 1
    assert "different model" in capsys.readouterr().err
    assert main(["--similar", str(originals[0]), "--index", str(tmp_path / "none")]) == 1
    assert main(["--index", "--model", str(model_dir), "--out", str(out)]) == 2  # neither --data nor --images


# ------------------------------------------------------------------------------------------------ ivf-pq


def test_auto_index_type_by_size():
    from alt_i2v.search.kinds import choose_kind, pq_lists, pq_shape, pq_train_rows

    assert choose_kind(100_000, 2048) == "exact"
    assert choose_kind(400_000, 2048) == "ivf-sq8"
    assert choose_kind(10_000_000, 2048) == "ivf-pq"
    assert choose_kind(10_000_000, 128) == "ivf-pq" and choose_kind(1_000_000, 128) == "exact"
    assert pq_shape(2048) == (2048, 256) and pq_shape(128) == (128, 32) and pq_shape(100) == (100, 25)
    assert pq_lists(10_000_000) == 59880 and pq_lists(2_000_000) == 11976  # one list a 167 rows
    assert pq_lists(4000) == 23 and pq_lists(100) == 1 and pq_lists(20_000_000) == 65536
    assert pq_train_rows(59880, 10_000_000) == 718_560 and pq_train_rows(25, 1000) == 1000
    with pytest.raises(ValueError, match="index type"):
        SimilarityIndex.build(clustered(10), kind="hnsw")


def _chunks(x: np.ndarray, start: int = 0, step: int = 700):
    for s in range(0, len(x), step):
        yield x[s:s + step], [f"p{start + i}" for i in range(s, min(s + step, len(x)))], None


@needs_faiss
def test_ivfpq_is_built_streaming_and_searches_from_a_memory_mapped_file(tmp_path, monkeypatch):
    from alt_i2v.search.large import build_streaming

    x = clustered(4000, dim=64, clusters=40, seed=11)
    q = clustered(40, dim=64, clusters=40, seed=11)[::-1] + 0.05
    index = build_streaming(tmp_path / "pq", _chunks(x), dim=64, info={"model": {"path": "m"}})
    assert index.kind == "ivf-pq" and isinstance(index.vectors(), np.memmap)  # rows stay on disk
    p = index.approx_params
    assert p["m"] == 16 and p["nbits"] == 4 and p["fastscan"] and p["recall10"] >= 0.95 and not p["opq"]
    import faiss

    ivf = faiss.extract_index_ivf(index._approx)
    assert isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQFastScan) and ivf.code_size == 8  # 16 four-bit codes
    header = json.loads((tmp_path / "pq" / "index.json").read_text())
    assert header["version"] == 2 and "vectors.f16" in header["files"] and header["info"]["model"]["path"] == "m"
    assert (tmp_path / "pq" / "vectors.f16").stat().st_size == 4000 * 64 * 2
    _, exact = index.search_positions(q, 10, approx=False)
    _, approx = index.search_positions(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)]) >= 0.9
    scores = index.search_positions(q, 10)[0]  # re-ranked: true cosines of the float16 rows
    rows = index.vectors()[index.search_positions(q, 10)[1]].astype(np.float32)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", rows, qn), atol=1e-5)
    monkeypatch.setattr("alt_i2v.search.quantisers.OPQ_WIDTH", 256)  # wider than this: rotated (1024 by default)
    wide = SimilarityIndex.build(clustered(1200, dim=288, clusters=12, seed=3), kind="ivf-pq", nlist=4)
    assert wide.approx_params["opq"] and wide.approx_params["width"] == 288  # OPQ rotates, keeps every dimension
    assert wide.approx_params["recall10"] >= 0.9
    with pytest.raises(ValueError, match="at least"):
        SimilarityIndex.build(clustered(500), kind="ivf-pq")


@needs_faiss
def test_ivfpq_with_many_lists_finds_them_through_pq_codes_of_the_centroids(tmp_path, monkeypatch):
    """Above FLAT_LISTS lists the coarse quantiser scans 4-bit PQ codes of the centroids and re-ranks the
    best exactly: it returns the lists a flat search over the centroids returns, the index answers as one
    with a flat quantiser does, also after a reload."""
    import faiss

    x = clustered(6000, dim=64, clusters=40, seed=3)
    q = x[::150] + np.random.default_rng(4).normal(0, 0.02, (40, 64)).astype(np.float32)
    flat = SimilarityIndex.build(x, kind="ivf-pq", nlist=120, nprobe=6)
    assert isinstance(faiss.downcast_index(flat._ivf().quantizer), faiss.IndexFlatL2)
    monkeypatch.setattr("alt_i2v.search.quantisers.FLAT_LISTS", 16)  # small here: 1,024 by default
    index = SimilarityIndex.build(x, kind="ivf-pq", nlist=120, nprobe=6)
    coarse = faiss.downcast_index(index._ivf().quantizer)
    assert isinstance(coarse, faiss.IndexRefineFlat) and coarse.ntotal == 120 and coarse.k_factor == 16
    assert isinstance(faiss.downcast_index(coarse.base_index), faiss.IndexPQFastScan)
    centroids = faiss.IndexFlatL2(64)
    centroids.add(coarse.reconstruct_n(0, 120))
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    want = centroids.search(qn, 3)[1]
    got = coarse.search(qn, 3)[1]
    assert np.mean([len(set(a) & set(b)) / 3 for a, b in zip(got, want)]) >= 0.95
    _, exact = index.search_positions(q, 10, approx=False)
    recall = {name: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i.search_positions(q, 10)[1], exact)])
              for name, i in (("pq", index), ("flat", flat))}
    assert recall["pq"] >= 0.85 and abs(recall["pq"] - recall["flat"]) <= 0.02  # (8-byte codes cap both near 0.9)
    index.save(tmp_path / "i")
    again = SimilarityIndex.load(tmp_path / "i")
    assert isinstance(faiss.downcast_index(again._ivf().quantizer), faiss.IndexRefineFlat)
    np.testing.assert_array_equal(again.search_positions(q, 10)[1], index.search_positions(q, 10)[1])


@needs_faiss
@pytest.mark.parametrize("kind", ["exact", "ivf-sq8", "ivf-pq", "ivf-pq-many-lists"])
def test_adding_to_a_saved_index_equals_a_rebuilt_one(kind, tmp_path, monkeypatch):
    """A (saved), then B added to it on disk, answers every query as an index built from A + B at once.
    Every inverted list is visited and enough candidates re-ranked (a tenth of the index for ivf-pq, whose
    small test codes are coarse), so the approximate kinds differ only in the quantisers (trained on A
    alone or on A + B), which the exact re-rank of the candidates then makes irrelevant; the queries include
    rows of B, which only the added codes can bring up. "ivf-pq-many-lists": the same with the coarse
    quantiser on PQ codes of the centroids (used above FLAT_LISTS lists), which assigns the added rows."""
    from alt_i2v.search.large import build_streaming

    many = kind == "ivf-pq-many-lists"
    if many:
        monkeypatch.setattr("alt_i2v.search.quantisers.FLAT_LISTS", 8)  # 16 lists here: 1,024 by default
        kind = "ivf-pq"

    x = clustered(3000, dim=32, clusters=30, seed=12)
    a, b = x[:2000], x[2000:]
    q = np.concatenate([clustered(30, dim=32, clusters=30, seed=12) + 0.05, b[:10]])
    ids = [f"p{i}" for i in range(len(x))]
    kw = {} if kind == "exact" else {"nlist": 16, "nprobe": 16, "refine": 30 if kind == "ivf-pq" else 4}
    if kind == "ivf-pq":
        build_streaming(tmp_path / "grown", _chunks(a), dim=32, **kw)
        rebuilt = build_streaming(tmp_path / "whole", _chunks(x), dim=32, **kw)
    else:
        SimilarityIndex.build(a, ids[:2000], kind=kind, **kw).save(tmp_path / "grown")
        rebuilt = SimilarityIndex.build(x, ids, kind=kind, **kw)
    grown = SimilarityIndex.load(tmp_path / "grown")
    grown.add(b, ids[2000:])
    grown.save(tmp_path / "grown")
    grown = SimilarityIndex.load(tmp_path / "grown")
    assert len(grown) == 3000 and grown.ids == ids and grown.kind == kind
    got, want = grown.search(q, 10), rebuilt.search(q, 10)
    assert [[i for i, _ in r] for r in got] == [[i for i, _ in r] for r in want]
    np.testing.assert_allclose([[s for _, s in r] for r in got], [[s for _, s in r] for r in want], atol=1e-5)
    assert [r[0][0] for r in got[-10:]] == ids[2000:2010]  # the added rows are found through their codes
    if kind == "ivf-pq":  # the vectors file grew in place: the new rows follow the old ones
        assert (tmp_path / "grown" / "vectors.f16").stat().st_size == 3000 * 32 * 2
    if many:
        import faiss

        assert isinstance(faiss.downcast_index(grown._ivf().quantizer), faiss.IndexRefineFlat)


@needs_faiss
@pytest.mark.parametrize("kind", ["exact", "ivf-pq"])
def test_removed_ids_are_never_found_and_can_come_back(kind, tmp_path):
    x = clustered(3000, dim=64, clusters=30, seed=13)
    ids = [f"p{i}" for i in range(3000)]
    index = SimilarityIndex.build(x, ids, kind=kind)
    assert index.search(x[5], 1)[0][0] == "p5"
    assert index.remove(["p5", "p6"]) == 2 and len(index) == 2998
    with pytest.raises(KeyError, match="p5"):
        index.remove(["p5"])
    hits = [i for i, _ in index.search(x[5], 20)]
    assert "p5" not in hits and "p6" not in hits and len(hits) == 20
    index.save(tmp_path / "i")
    back = SimilarityIndex.load(tmp_path / "i")
    assert back.removed == [5, 6] and len(back) == 2998
    assert "p5" not in [i for i, _ in back.search(x[5], 20)]
    back.add(x[5:6], ["p5"])  # the id is free again: a new row
    assert back.search(x[5], 1)[0][0] == "p5" and back.position("p5") == 3000


@needs_faiss
def test_an_interrupted_add_leaves_the_index_whole(tmp_path):
    """Rows an interrupted add appended to vectors.f16 past the header's count are ignored, and the next
    add writes over them."""
    from alt_i2v.search.large import build_streaming

    x = clustered(3000, dim=64, clusters=30, seed=14)
    build_streaming(tmp_path / "i", _chunks(x[:2500]), dim=64)
    with open(tmp_path / "i" / "vectors.f16", "ab") as f:  # what a killed add leaves behind
        f.write(np.full((7, 64), 9, np.float16).tobytes())
    index = SimilarityIndex.load(tmp_path / "i")
    assert len(index) == 2500 and index.search(x[10], 1)[0][0] == "p10"
    index.add(x[2500:], [f"p{i}" for i in range(2500, 3000)])
    index.save(tmp_path / "i")
    back = SimilarityIndex.load(tmp_path / "i")
    assert (tmp_path / "i" / "vectors.f16").stat().st_size == 3000 * 64 * 2
    assert back.search(x[2500], 1)[0][0] == "p2500"
    np.testing.assert_allclose(back.vectors()[2500].astype(np.float32), x[2500] / np.linalg.norm(x[2500]),
                               atol=1e-3)
    (tmp_path / "i" / "vectors.f16").write_bytes(b"\0" * 100)
    with pytest.raises(IndexFileError, match="truncated"):
        SimilarityIndex.load(tmp_path / "i")


def test_cli_add_to_an_index_and_remove_from_it(model_dir, gallery, tmp_path, capsys):
    """--index --add embeds only the pictures the index lacks and refuses another model's index;
    --index --remove takes ids out."""
    import shutil

    from alt_i2v.search import build_index
    from alt_i2v.tagging.tagger import get_tagger

    _, originals, dups = gallery
    folder = tmp_path / "pics"
    folder.mkdir()
    for f in originals[:20]:
        shutil.copy(f, folder)
    out = tmp_path / "pics.index"
    assert main(["--index", "--model", str(model_dir), "--images", str(folder), "--out", str(out), "-q"]) == 0
    assert SimilarityIndex.load(out).kind == "exact"  # auto: a small collection is searched exactly
    for f in originals[20:] + dups:
        shutil.copy(f, folder)
    assert main(["--index", "--add", "--model", str(model_dir), "--images", str(folder), "--out", str(out)]) == 0
    grown = SimilarityIndex.load(out)
    assert len(grown) == 36 and len(set(grown.ids)) == 36
    rebuilt, _ = build_index(get_tagger(model_dir), images=folder)  # the same pictures at once
    q = rebuilt.vectors()[:8]
    assert [[i for i, _ in r] for r in grown.search(q, 5)] == [[i for i, _ in r] for r in rebuilt.search(q, 5)]
    assert main(["--index", "--add", "--model", str(model_dir), "--images", str(folder), "--out", str(out), "-q"]) == 0
    assert len(SimilarityIndex.load(out)) == 36  # nothing new: nothing added

    victim = str((folder / originals[3].name).resolve())
    assert main(["--index", "--remove", victim, "--out", str(out), "-q"]) == 0
    back = SimilarityIndex.load(out)
    assert len(back) == 35 and victim not in [i for i, _ in back.search(q, 36)[0]]
    assert main(["--index", "--remove", "no-such-id", "--out", str(out), "-q"]) == 2

    header = json.loads((out / "index.json").read_text())
    header["info"]["model"]["fingerprint"] = "0" * 64
    (out / "index.json").write_text(json.dumps(header))
    capsys.readouterr()
    assert main(["--index", "--add", "--model", str(model_dir), "--images", str(folder), "--out", str(out)]) == 1
    assert "different model" in capsys.readouterr().err
