"""What a training epoch draws (``dicomnode train --sampling``, :mod:`ml.sampling`).

Specification: by slices (the default, and the order every earlier training used), each epoch cycles through every
training slice in a seeded shuffle; by subjects, each subject is drawn equally often whatever its slice count, and
within a subject no slice comes back before every other slice of it has been drawn.  Both orders depend on the seed
and the epoch alone and shard by rank without overlap.  The choice is part of the recipe: recorded in the
checkpoint, and a resumed run cannot change it; the CycleGAN refuses it.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ml.sampling import Sampling, epoch_order, parse_sampling  # noqa: E402
from test_ml_quality import _cfg  # noqa: E402  (the small recipe-B-like training)
from test_ml_cli import _make_paired  # noqa: E402

# a 1 mm subject of 150 slices beside a clinical scan of 40 and another of 10
GROUPS = [0] * 150 + [1] * 40 + [2] * 10


def test_by_slices_every_slice_comes_once_before_any_comes_twice() -> None:
    order = epoch_order(GROUPS, epoch=0, seed=0, rank=0, world=1, steps=25, batch=16)  # 400 draws, 2 cycles
    assert sorted(order[:200]) == list(range(200)) and sorted(order[200:]) == list(range(200))
    subjects = Counter(GROUPS[i] for i in order)
    assert subjects[0] == 300 and subjects[2] == 20  # a subject weighs its slice count


def test_by_slices_is_the_order_earlier_trainings_drew() -> None:
    rng = np.random.default_rng([3, 5])  # (seed, epoch): one permutation per pass over the slices
    expected = np.concatenate([rng.permutation(200), rng.permutation(200)])[:320].tolist()
    assert epoch_order(GROUPS, epoch=5, seed=3, rank=0, world=1, steps=20, batch=16) == expected


def test_by_subjects_every_subject_is_drawn_equally_often() -> None:
    order = epoch_order(GROUPS, epoch=0, seed=0, rank=0, world=1, steps=30, batch=16, sampling=Sampling.SUBJECTS)
    assert len(order) == 480
    assert Counter(GROUPS[i] for i in order) == {0: 160, 1: 160, 2: 160}


def test_by_subjects_a_slice_comes_back_only_after_the_rest_of_its_subject() -> None:
    order = epoch_order(GROUPS, epoch=1, seed=2, rank=0, world=1, steps=30, batch=16, sampling=Sampling.SUBJECTS)
    small = [i for i in order if GROUPS[i] == 2]  # 160 draws of a 10-slice subject: 16 full cycles
    for c in range(16):
        assert sorted(small[10 * c:10 * (c + 1)]) == list(range(190, 200))
    large = [i for i in order if GROUPS[i] == 0]  # 160 draws of 150 slices: each once, then 10 of a new cycle
    assert sorted(large[:150]) == list(range(150))


@pytest.mark.parametrize("sampling", list(Sampling))
def test_the_order_depends_on_seed_and_epoch_alone_and_ranks_share_it_without_overlap(sampling: Sampling) -> None:
    def order(**kw: int) -> list[int]:
        args = dict(epoch=2, seed=7, rank=0, world=1, steps=10, batch=8) | kw
        return epoch_order(GROUPS, sampling=sampling, **args)

    whole = order()
    assert order() == whole and order(epoch=3) != whole and order(seed=8) != whole
    halves = [order(rank=r, world=2, steps=5) for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(whole)
    assert halves[0] == whole[0::2] and halves[1] == whole[1::2]


def test_an_unknown_sampling_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="slices, subjects"):
        parse_sampling("voxels")


def test_the_sampling_is_recorded_and_a_resume_cannot_change_it(tmp_path: Path) -> None:
    from ml.train import TrainError, train

    data = _make_paired(tmp_path / "mri")
    result = train(_cfg(data, tmp_path / "ck", epochs=1, sampling="subjects", time_budget=1e-6))
    assert not result.finished
    with pytest.raises(TrainError, match="another recipe"):
        train(_cfg(data, tmp_path / "ck", epochs=1, resume=True))  # by slices, the default
    assert train(_cfg(data, tmp_path / "ck", epochs=1, sampling="subjects", resume=True)).finished
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["training"]["sampling"] == "subjects"


def test_a_training_by_slices_records_nothing_new(tmp_path: Path) -> None:
    from ml.train import train

    data = _make_paired(tmp_path / "mri")
    train(_cfg(data, tmp_path / "ck", epochs=1))
    assert "sampling" not in json.loads((tmp_path / "ck" / "model.json").read_text())["training"]


def test_the_cyclegan_refuses_sampling_by_subject(tmp_path: Path) -> None:
    from ml.train import TrainError, train

    with pytest.raises(TrainError, match="--sampling"):
        train(_cfg(_make_paired(tmp_path / "mri"), tmp_path / "ck", model="cyclegan", sampling="subjects"))
