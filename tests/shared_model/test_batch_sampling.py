"""Foreground oversampling: a class few frames hold is in every batch, reproducibly."""

import torch

from shared_model.train import BatchSampler, ForegroundBatchSampler, TensorBatches, make_generator


def _batches(sampler: BatchSampler, count: int) -> list[torch.Tensor]:
    return [sampler.next() for _ in range(count)]


def test_a_rare_class_is_drawn_into_every_batch() -> None:
    # Prepare: 200 frames; one class held by frames 7 and 150 only, another by half the frames
    rare, common = torch.tensor([7, 150]), torch.arange(0, 200, 2)
    sampler = ForegroundBatchSampler(200, 12, make_generator(0), [rare, common, torch.tensor([])], 1 / 3)
    batches = _batches(sampler, 300)
    # Check: 4 of 12 items forced (the empty group is never picked), batch size unchanged
    assert all(b.numel() == 12 for b in batches)
    forced = torch.stack([b[-4:] for b in batches])
    assert bool(torch.isin(forced, torch.cat([rare, common])).all())
    rare_per_batch = torch.isin(torch.stack(batches), rare).sum(1).float().mean()
    # about 2 per batch (half the forced draws), where uniform sampling gives 12 * 2/200 = 0.12
    assert 1.5 < float(rare_per_batch) < 2.5
    # the uniform part still walks whole epochs: each frame once per 200 uniform draws
    uniform = torch.cat([b[:8] for b in batches[:25]])
    assert sorted(uniform.tolist()) == list(range(200))


def test_same_generator_same_batches_and_no_groups_is_plain_shuffling() -> None:
    groups = [torch.tensor([1, 2]), torch.tensor([5])]
    first = _batches(ForegroundBatchSampler(30, 8, make_generator(3), groups, 0.33), 20)
    again = _batches(ForegroundBatchSampler(30, 8, make_generator(3), groups, 0.33), 20)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    plain = TensorBatches([torch.zeros(30)], 8, make_generator(3), [], 0.33).sampler
    assert type(plain) is BatchSampler
    off = TensorBatches([torch.zeros(30)], 8, make_generator(3), groups, 0.0).sampler
    assert type(off) is BatchSampler
