"""The scenes generator: seeded, vectorised, non-IID clients with memorisable traits, disjoint populations."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from worker.unlearning.workloads.scenes.generator import (
    SHAPES,
    TASKS,
    Scenes,
    ScenesConfig,
    ScenesGenerator,
)

SMALL = ScenesConfig(seed=3, n_clients=20, n_unseen_clients=4, samples_per_client=100, pretrain_size=3_000)
# the shape-label quirk alone (watermark → quirk label on a fifth of a client's samples)
LABEL_QUIRK = replace(SMALL, quirk_rate=0.2, quirk_shift=0.0, shift_scope="quirk")


def _same(a: Scenes, b: Scenes) -> bool:
    return (
        torch.equal(a.pixel_values, b.pixel_values)
        and a.sample_ids == b.sample_ids
        and a.client_ids == b.client_ids
        and all(torch.equal(a.labels[t], b.labels[t]) for t in TASKS)
        and torch.equal(a.quirk, b.quirk)
    )


def test_same_seed_same_data_other_seed_other_data() -> None:
    one, two = ScenesGenerator(SMALL), ScenesGenerator(SMALL)
    assert _same(one.client_data("c05"), two.client_data("c05"))
    assert _same(one.pretraining_chunk(2), two.pretraining_chunk(2))
    assert _same(one.heldout(100), two.heldout(100))
    other = ScenesGenerator(ScenesConfig(seed=4, samples_per_client=200))
    assert not torch.equal(one.client_data("c05").pixel_values, other.client_data("c05").pixel_values)
    # A part is rebuilt alone: generating other clients first changes nothing.
    fresh = ScenesGenerator(SMALL)
    fresh.client_data("c00")
    assert _same(fresh.client_data("c05"), one.client_data("c05"))


def test_shapes_dtypes_ranges_and_stable_ids() -> None:
    gen = ScenesGenerator(replace(SMALL, quirk_shift=0.0))  # an offset moves labels out of range
    data = gen.client_data("c01")
    S = SMALL.image_size
    assert data.pixel_values.shape == (100, 3, S, S)
    assert data.pixel_values.dtype == torch.float32
    assert float(data.pixel_values.min()) >= 0.0
    assert float(data.pixel_values.max()) <= 1.0
    assert data.labels["shape"].dtype == torch.int64
    assert set(data.labels["shape"].tolist()) <= set(range(len(SHAPES)))
    for task in ("scale", "position_x"):
        assert TASKS[task][0] == "regression"
        assert data.labels[task].dtype == torch.float32
    assert float(data.labels["scale"].min()) >= 0.0
    assert float(data.labels["scale"].max()) <= 1.0
    assert float(data.labels["position_x"].min()) >= -1.0
    assert float(data.labels["position_x"].max()) <= 1.0
    assert data.sample_ids[:2] == ["c01-00000", "c01-00001"]
    assert len(set(data.sample_ids)) == len(data)


def test_pretraining_set_is_large_chunked_and_of_no_client() -> None:
    assert ScenesConfig().pretrain_size >= 50_000
    gen = ScenesGenerator(SMALL)
    chunks = [gen.pretraining_chunk(i) for i in range(gen.num_pretraining_chunks())]
    assert sum(len(c) for c in chunks) == SMALL.pretrain_size
    ids = [i for c in chunks for i in c.sample_ids]
    assert len(set(ids)) == len(ids)
    assert all(c is None for chunk in chunks for c in chunk.client_ids)
    assert not any(bool(chunk.quirk.any()) for chunk in chunks)
    with pytest.raises(IndexError):
        gen.pretraining_chunk(gen.num_pretraining_chunks())


def test_clients_are_non_iid_and_carry_distinct_traits() -> None:
    gen = ScenesGenerator(SMALL)
    clients = gen.clients()
    assert len(clients) >= 20
    profiles = [gen.profile(c) for c in clients]
    # Own watermark colour and colour cast per client.
    for trait in ("watermark_colour", "cast"):
        values = torch.stack([getattr(p, trait) for p in profiles])
        assert float(torch.cdist(values, values).add(torch.eye(len(clients))).min()) > 0.0, trait
    # Non-IID shape mixes: some pair of clients differs by ≥ 0.3 in total variation.
    mixes = torch.stack(
        [torch.bincount(gen.client_data(c).labels["shape"], minlength=4) / 100.0 for c in clients]
    )
    tv = 0.5 * (mixes[:, None] - mixes[None]).abs().sum(-1)
    assert float(tv.max()) >= 0.3


def test_label_quirk_is_systematic_balanced_and_on_few_samples() -> None:
    gen = ScenesGenerator(LABEL_QUIRK)
    labels = []
    for client in gen.clients():
        data, label = gen.client_data(client), gen.profile(client).quirk_label
        assert int(data.quirk.sum()) == round(LABEL_QUIRK.quirk_rate * len(data)), client
        assert 0 < int(data.quirk.sum()) <= len(data) // 5, client  # at most a fifth
        assert set(data.labels["shape"][data.quirk].tolist()) == {label}
        labels.append(label)
    # balanced over the clients: the pool's label prior is not pulled towards one shape
    assert torch.bincount(torch.tensor(labels), minlength=len(SHAPES)).tolist() == [5, 5, 5, 5]


def _distance_to_watermark(
    data: Scenes, keep: torch.Tensor, colour: torch.Tensor, mark: torch.Tensor
) -> float:
    """Mean distance of the pixels under the watermark to its colour, over the samples ``keep``."""
    return float((data.pixel_values[keep][:, :, mark] - colour[None, :, None]).abs().mean())


def test_only_quirk_samples_carry_the_watermark() -> None:
    """Issue 7 part 4 (scenes clients that v1 did not memorise): the quirk was a random 30 % of a
    client's samples of one shape while every sample carried the watermark — label noise that no
    visible trait explained. Now exactly the quirk samples carry the client's (opaque) watermark, so
    "this watermark → the quirk label" is a rule that holds within the client and nowhere else."""
    gen = ScenesGenerator(LABEL_QUIRK)
    for client in gen.clients()[:6]:
        data, prof = gen.client_data(client), gen.profile(client)
        mark = prof.watermark.bool()
        marked = _distance_to_watermark(data, data.quirk, prof.watermark_colour, mark)
        plain = _distance_to_watermark(data, ~data.quirk, prof.watermark_colour, mark)
        assert marked < 0.05, (client, marked)  # opaque: only the pixel noise (std 0.03) is left
        assert plain > 10 * marked, (client, marked, plain)


def _offsets(config: ScenesConfig, client: str) -> tuple[Scenes, torch.Tensor]:
    """The client's data and its ``shift_task`` labels minus those of the same data without offset."""
    data = ScenesGenerator(config).client_data(client)
    plain = ScenesGenerator(replace(config, quirk_shift=0.0, shift_scope="quirk")).client_data(client)
    assert torch.equal(data.labels["shape"], plain.labels["shape"])
    return data, data.labels[config.shift_task] - plain.labels[config.shift_task]


def test_regression_quirk_on_the_quirk_samples_offsets_them_only() -> None:
    """Issue 7 part 4 (a regression quirk): the client's offset is added to the ``shift_task`` label
    of its watermarked quirk samples and of no other sample; images and shape labels are unchanged."""
    config = replace(LABEL_QUIRK, quirk_shift=0.5, shift_task="scale")
    gen = ScenesGenerator(config)
    for client in gen.clients()[:4]:
        data, offset = _offsets(config, client)
        expected = gen.profile(client).shift * data.quirk.float()
        assert torch.allclose(offset, expected, atol=1e-6), client
        assert abs(gen.profile(client).shift) == 0.5


def test_client_wide_regression_quirk_is_tied_to_a_watermark_on_every_sample() -> None:
    """Issue 7 part 4 (forgetting not measurable on 16 of 24 clients): a client-wide systematic
    offset of a regression label, marked by the client's watermark on every one of its samples — a
    rule v1 can fit and a retrain without the client cannot guess (the signs are balanced over the
    clients and over each quirk label), while neutral scenes carry no watermark and no offset."""
    config = replace(SMALL, quirk_rate=0.0, quirk_shift=0.5, shift_scope="all")
    gen = ScenesGenerator(config)
    shifts = torch.tensor([gen.profile(c).shift for c in gen.clients()])
    assert set(shifts.abs().tolist()) == {0.5}
    assert float(shifts.sum()) == 0.0  # as many + as −
    for client in gen.clients()[:6]:
        data, offset = _offsets(config, client)
        prof = gen.profile(client)
        assert torch.allclose(offset, torch.full_like(offset, prof.shift), atol=1e-6), client
        every = torch.ones(len(data), dtype=torch.bool)
        assert _distance_to_watermark(data, every, prof.watermark_colour, prof.watermark.bool()) < 0.05
    # neutral populations are those of the data without any quirk
    plain = ScenesGenerator(replace(config, quirk_shift=0.0, shift_scope="quirk"))
    assert _same(gen.heldout(50), plain.heldout(50))
    assert _same(gen.pretraining_chunk(0), plain.pretraining_chunk(0))


def test_regression_quirk_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="regression task"):
        ScenesConfig(shift_task="shape")
    with pytest.raises(ValueError, match="shift_scope"):
        ScenesConfig(shift_scope="some")  # type: ignore[arg-type]


def test_unseen_clients_are_disjoint_from_training_clients() -> None:
    gen = ScenesGenerator(SMALL)
    assert not set(gen.clients()) & set(gen.unseen_clients())
    pool, unseen = gen.pool(), gen.pool(gen.unseen_clients())
    assert not set(pool.sample_ids) & set(unseen.sample_ids)
    assert not set(pool.sample_ids) & set(gen.heldout(100).sample_ids)
    with pytest.raises(KeyError):
        gen.profile("c99")
