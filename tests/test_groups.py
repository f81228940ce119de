"""Exclusive tag groups (training/groups.py) and the loss term that uses them (GroupSoftmaxBCE)."""

import math

import keras
import numpy as np
import pytest

from alt_i2v.config import ModelConfig, TrainConfig
from alt_i2v.model.backbones import resolve_config
from alt_i2v.model.build import build_model
from alt_i2v.model.losses import GroupSoftmaxBCE, get_loss
from alt_i2v.training.groups import exclusive_groups, label_matrix


def faces(n: int = 6000, seed: int = 0) -> np.ndarray:
    """Labels shaped like the real faces: one of 6 hair colours, one of 5 eye colours (hair colour i makes eye
    colour i likelier), a length tag that is independent of both, 10% of images with a second hair colour."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 13), dtype=bool)
    hair = rng.integers(0, 6, n)
    y[np.arange(n), hair] = True
    second = rng.random(n) < 0.1
    y[np.flatnonzero(second), rng.integers(0, 6, second.sum())] = True
    eyes = np.where(rng.random(n) < 0.4, np.minimum(hair, 4), rng.integers(0, 5, n))
    y[np.arange(n), 6 + eyes] = True
    y[:, 11] = rng.random(n) < 0.5  # long hair
    y[:, 12] = rng.random(n) < 0.3  # glasses
    return y


def test_groups_of_hair_and_eye_colours_are_found_and_kept_apart():
    groups = exclusive_groups(faces())
    assert sorted(sorted(g) for g in groups) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]


def test_independent_tags_make_no_group():
    rng = np.random.default_rng(1)
    for p in (0.05, 0.3):
        assert exclusive_groups(rng.random((20000, 60)) < p) == []


def test_single_label_data_is_one_group_and_rare_tags_are_left_out():
    y = np.eye(8, dtype=bool)[np.random.default_rng(2).integers(0, 8, 4000)]
    assert sorted(exclusive_groups(y)[0]) == list(range(8))
    assert exclusive_groups(y[:30]) == []  # too few positives per tag to say anything
    assert exclusive_groups(np.zeros((0, 4), bool)) == []


def test_label_matrix_from_index_lists():
    y = label_matrix([[0, 2], [], [1]], 3)
    assert y.tolist() == [[True, False, True], [False, False, False], [False, True, False]]


def test_group_loss_adds_a_softmax_term_per_group_with_a_positive():
    y = np.array([[1, 0, 0, 1], [0, 0, 0, 1], [1, 1, 0, 0]], dtype="float32")
    p = np.array([[0.7, 0.2, 0.1, 0.6], [0.3, 0.3, 0.3, 0.5], [0.5, 0.5, 0.2, 0.1]], dtype="float32")
    bce = GroupSoftmaxBCE([], label_smoothing=0.1, reduction=None)
    grouped = GroupSoftmaxBCE([[0, 1, 2]], weight=2.0, label_smoothing=0.1, reduction=None)
    base = keras.ops.convert_to_numpy(bce(y, p))
    ref = keras.losses.BinaryCrossentropy(label_smoothing=0.1, reduction=None)
    assert np.allclose(base, keras.ops.convert_to_numpy(ref(y, p)), atol=1e-5)
    got = keras.ops.convert_to_numpy(grouped(y, p)) - base
    z = np.log(p[:, :3]) - np.log1p(-p[:, :3])
    logsm = z - np.log(np.exp(z).sum(1, keepdims=True))
    want = [-logsm[0, 0], 0.0, -(logsm[2, 0] + logsm[2, 1]) / 2]  # row 1 has no tag of the group
    assert np.allclose(got, 2.0 * np.array(want) / 4, atol=1e-4)


def test_group_loss_round_trips_and_is_what_get_loss_gives():
    loss = get_loss("bce", label_smoothing=0.1, groups=[[0, 1], [2, 3, 4]], group_weight=1.0)
    assert isinstance(loss, GroupSoftmaxBCE)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert again.groups == [[0, 1], [2, 3, 4]] and again.weight == 1.0 and math.isclose(again.label_smoothing, 0.1)
    assert not isinstance(get_loss("bce", groups=[[0, 1]], group_weight=0.0), GroupSoftmaxBCE)
    assert not isinstance(get_loss("bce", groups=[], group_weight=1.0), GroupSoftmaxBCE)


def test_configs_recorded_before_the_options_keep_their_old_meaning():
    assert TrainConfig.from_config({"epochs": 3}).group_loss == 0.0
    assert ModelConfig.from_config({"backbone": "tiny", "trunk": "resnet", "num_tags": 3}).stem == 2
    assert ModelConfig.from_config({"backbone": "tiny", "num_tags": 3}).stem is None  # plain: no stem
    with pytest.raises(Exception, match="stem"):
        resolve_config(ModelConfig(backbone="tiny", num_tags=3, weights=None, trunk="plain", stem=1))


def test_stem_one_keeps_a_finer_map_and_ends_on_the_same_grid():
    two = build_model(5, 96, backbone="tiny", weights=None, stem=2).get_layer("tiny")
    one = build_model(5, 96, backbone="tiny", weights=None, stem=1).get_layer("tiny")
    assert tuple(two.output.shape[1:3]) == tuple(one.output.shape[1:3]) == (6, 6)
    sides = lambda m: [layer.output.shape[1] for layer in m.layers if layer.name.endswith("_conv")]  # noqa: E731
    assert sides(two)[:2] == [48, 24] and sides(one)[:3] == [48, 48, 24]
