"""Per-sample randomness and the split of a global batch (step.MicroBatch, loop.DataOrder): a
step's items and each sample's draws are the same however the batch is split into micro-batches
or shared between processes, so 1 and N processes train the same model (test_distributed.py)."""

import torch

from ldmkit.models.conditioning import ClassConditioner
from ldmkit.models.unet import UNet, UNetConfig
from ldmkit.recipe import DiffusionConfig, TrainConfig
from ldmkit.training.loop import DataOrder
from ldmkit.training.stages import diffusion_stage


def test_each_rank_takes_its_share_of_every_global_batch():
    """However many processes and micro-batches, a step's items are the same, each once."""
    for accum in (1, 2):
        whole = DataOrder(20, 8, accum, seed=3, key="k")
        for step in (0, 1, 2, 7):
            ref = torch.cat([m.indices for m in whole.micro_batches(step)])
            for size in (2, 4):
                shares = [whole.micro_batches(step, r, size) for r in range(size)]
                slots = torch.cat([m.slots for r in range(size) for m in shares[r]])
                assert sorted(slots.tolist()) == list(range(8))
                got = {int(s): int(i) for r in range(size) for m in shares[r]
                       for s, i in zip(m.slots, m.indices)}  # fmt: skip
                assert [got[s] for s in range(8)] == ref.tolist()


def test_a_samples_randomness_does_not_depend_on_the_split():
    order = DataOrder(20, 8, 1, seed=3, key="diffusion/1")
    (whole,) = order.micro_batches(5)
    halves = [order.micro_batches(5, r, 2)[0] for r in (0, 1)]
    drop = ClassConditioner(5, dropout=0.5)
    labels = torch.arange(8) % 5

    def draws(mb):
        return (
            mb.randn(2, 3),
            mb.timesteps(1000, "uniform"),
            mb.timesteps(1000, "stratified"),
            mb.per_sample(lambda rows, g: drop.training_kwargs(labels[mb.slots][rows], g, "cpu")),
        )

    w, h0, h1 = draws(whole), draws(halves[0]), draws(halves[1])
    for a, b0, b1 in zip(w[:3], h0[:3], h1[:3]):
        assert torch.equal(a, torch.cat([b0, b1]))
    assert torch.equal(w[3]["class_labels"], torch.cat([h0[3]["class_labels"], h1[3]["class_labels"]]))  # fmt: skip
    assert (w[3]["class_labels"] == 5).any() and (w[3]["class_labels"] < 5).any()  # some dropped
    # stratified: one offset for the whole batch, so the 8 steps are spread over [0, T)
    assert sorted((w[2] // 125).tolist()) == list(range(8))
    # another step draws other numbers
    (other,) = order.micro_batches(6)
    assert not torch.equal(other.randn(2, 3), whole.randn(2, 3))


def test_the_diffusion_loss_of_a_batch_is_the_mean_of_its_shares():
    """What DDP averages (each rank's share of a micro-batch) is what one process computes."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                           attention_resolutions=(), norm_num_groups=4, head_dim=8,
                           num_res_blocks=1, mid_attention=False, num_classes=3))  # fmt: skip
    moments = torch.randn(20, 4, 8, 8)
    labels = torch.arange(20) % 3
    cond = ClassConditioner(3, dropout=0.3)
    st = diffusion_stage(unet, moments, cond, labels, 0.8, DiffusionConfig(), TrainConfig(batch_size=8), torch.device("cpu"))  # fmt: skip
    order = DataOrder(20, 8, 1, seed=0, key="diffusion/0")
    (whole,) = order.micro_batches(3)
    shares = [order.micro_batches(3, r, 4)[0] for r in range(4)]
    with torch.no_grad():
        full = st.loss(whole)[0]
        mean = sum(st.loss(mb)[0] for mb in shares) / 4
    torch.testing.assert_close(full, mean, rtol=1e-6, atol=0)
