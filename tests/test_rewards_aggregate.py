"""compute_advantages / spatial_advantages against numbers worked out by hand.

The main case: 2 groups of 3 samples, 2 rewards, weights (1, 0.5).

    group 0: r0 = [1, 2, 3], r1 = [4, 0, 2]  -> totals [3, 2, 4], mean 3, std 1
    group 1: r0 = [0, 0, 3], r1 = [2, 2, 2]  -> totals [1, 1, 4], mean 2, std sqrt(3)

(std with Bessel's correction, as TRL.)
"""

import math

import pytest
import torch

from refiner_rl.scoring.aggregate import compute_advantages, spatial_advantages

NAN = float("nan")
EPS = 1e-4
R = torch.tensor([[1.0, 4.0], [2.0, 0.0], [3.0, 2.0], [0.0, 2.0], [0.0, 2.0], [3.0, 2.0]])
W = torch.tensor([1.0, 0.5])
G = torch.tensor([0, 0, 0, 1, 1, 1])
S3 = math.sqrt(3.0)


def _close(t, expected, tol=1e-6):
    assert t.tolist() == pytest.approx(expected, abs=tol)


def test_sum_then_normalize_group():
    res = compute_advantages(R, W, G, names=["pix", "sim"])
    _close(res.total_reward, [3, 2, 4, 1, 1, 4])
    _close(res.advantages, [0, -1 / (1 + EPS), 1 / (1 + EPS), -1 / (S3 + EPS), -1 / (S3 + EPS), 2 / (S3 + EPS)])
    assert res.valid.all()
    m = res.metrics
    assert m["reward"] == pytest.approx(15 / 6)
    assert m["reward_std"] == pytest.approx((1 + S3) / 2)
    assert m["frac_reward_zero_std"] == 0.0 and m["reward_failed_frac"] == 0.0
    assert m["rewards/pix/mean"] == pytest.approx(9 / 6)
    # r0 = [1,2,3,0,0,3]: mean 1.5, squared deviations .25+.25+2.25+2.25+2.25+2.25 = 9.5, /5
    assert m["rewards/pix/std"] == pytest.approx(math.sqrt(9.5 / 5))
    assert m["rewards/sim/mean"] == pytest.approx(2.0)
    assert m["rewards/sim/failed_frac"] == 0.0


def test_scale_rewards_batch_and_none():
    # batch std of totals [3,2,4,1,1,4]: mean 2.5, squared deviations sum 9.5 -> std sqrt(9.5/5)
    sb = math.sqrt(9.5 / 5)
    res = compute_advantages(R, W, G, scale_rewards="batch")
    _close(res.advantages, [0, -1 / (sb + EPS), 1 / (sb + EPS), -1 / (sb + EPS), -1 / (sb + EPS), 2 / (sb + EPS)])
    res = compute_advantages(R, W, G, scale_rewards="none")
    _close(res.advantages, [0, -1, 1, -1, -1, 2])


def test_normalize_then_sum_gdpo_differs_from_sum():
    # per-reward group normalisation:
    #   r0 g0 [1,2,3]: mean 2, std 1       -> [-1, 0, 1] / (1 + eps)
    #   r1 g0 [4,0,2]: mean 2, std 2       -> [2, -2, 0] / (2 + eps)
    #   r0 g1 [0,0,3]: mean 1, std sqrt(3) -> [-1, -1, 2] / (sqrt(3) + eps)
    #   r1 g1 [2,2,2]: std 0               -> [0, 0, 0]
    s = [
        -1 / (1 + EPS) + 0.5 * 2 / (2 + EPS),
        0 + 0.5 * -2 / (2 + EPS),
        1 / (1 + EPS) + 0,
        -1 / (S3 + EPS),
        -1 / (S3 + EPS),
        2 / (S3 + EPS),
    ]
    mean = sum(s) / 6
    std = math.sqrt(sum((v - mean) ** 2 for v in s) / 5)
    expected = [(v - mean) / (std + EPS) for v in s]
    res = compute_advantages(R, W, G, aggregation="normalize_then_sum")
    _close(res.advantages, expected)
    _close(res.total_reward, [3, 2, 4, 1, 1, 4])  # the logged total is the same weighted sum
    # and it is not the sum-then-normalise answer: sample 0 is 0 there, clearly negative here
    summed = compute_advantages(R, W, G).advantages
    assert summed[0].item() == pytest.approx(0.0, abs=1e-9)
    assert res.advantages[0].item() == pytest.approx(expected[0]) and expected[0] < -0.5
    res_none = compute_advantages(R, W, G, aggregation="normalize_then_sum", scale_rewards="none")
    _close(res_none.advantages, [v - mean for v in s])


def test_failed_rewards_are_excluded_not_zeroed():
    r = torch.tensor(
        [
            [1.0, 4.0],
            [NAN, NAN],  # nothing scored sample 1: invalid
            [3.0, 2.0],
            [NAN, 2.0],  # only reward 1 scored: total 0.5 * 2 = 1
            [0.0, 2.0],
            [3.0, 2.0],
        ]
    )
    res = compute_advantages(r, W, G, names=["pix", "sim"])
    assert res.valid.tolist() == [True, False, True, True, True, True]
    total = res.total_reward.tolist()
    assert math.isnan(total[1]) and total[0] == 3 and total[2] == 4 and total[3] == 1
    # group 0 over the valid totals [3, 4]: mean 3.5, std 1/sqrt(2); the invalid sample gets 0
    s2 = 1 / math.sqrt(2)
    _close(res.advantages[:3], [-0.5 / (s2 + EPS), 0.0, 0.5 / (s2 + EPS)])
    _close(res.advantages[3:], [-1 / (S3 + EPS), -1 / (S3 + EPS), 2 / (S3 + EPS)])
    m = res.metrics
    assert m["reward_failed_frac"] == pytest.approx(1 / 6)
    assert m["rewards/pix/failed_frac"] == pytest.approx(2 / 6)
    assert m["rewards/sim/failed_frac"] == pytest.approx(1 / 6)
    assert m["rewards/pix/mean"] == pytest.approx((1 + 3 + 0 + 3) / 4)
    assert m["reward"] == pytest.approx((3 + 4 + 1 + 1 + 4) / 5)
    # had the failure been turned into 0.0, sample 1 would have received a large negative advantage
    zeroed = compute_advantages(torch.nan_to_num(r), W, G).advantages
    assert zeroed[1].item() < -0.5


def test_zero_std_groups_and_single_valid_sample():
    r = torch.tensor([[1.0], [2.0], [5.0], [5.0], [NAN], [7.0], [NAN]])
    g = torch.tensor([10, 10, 20, 20, 30, 30, 40])  # ids need not be contiguous
    res = compute_advantages(r, torch.tensor([1.0]), g)
    # group 20: equal rewards -> std 0 -> advantage 0; group 30: one valid sample -> no baseline -> 0;
    # group 40: nothing valid. Zero-std groups: 20, 30, 40 of 4.
    _close(res.advantages, [-0.5 / (1 / math.sqrt(2) + EPS), 0.5 / (1 / math.sqrt(2) + EPS), 0, 0, 0, 0, 0])
    assert res.metrics["frac_reward_zero_std"] == pytest.approx(3 / 4)
    assert res.metrics["reward_std"] == pytest.approx((1 / math.sqrt(2) + 0.0) / 2)
    assert not torch.isnan(res.advantages).any()


def test_group_ids_not_positions_define_groups():
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    res = compute_advantages(R[perm], W, G[perm])
    ref = compute_advantages(R, W, G)
    _close(res.advantages, ref.advantages[perm].tolist())


def test_advantage_clip():
    res = compute_advantages(R, W, G, scale_rewards="none", adv_clip_max=1.5)
    _close(res.advantages, [0, -1, 1, -1, -1, 1.5])
    assert res.metrics["adv_clipped_frac"] == pytest.approx(1 / 6)


def test_argument_errors():
    with pytest.raises(ValueError, match="2 reward columns but 1 weights"):
        compute_advantages(R, [1.0], G)
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages(R, W, G, scale_rewards="groups")
    with pytest.raises(ValueError, match="6 samples but 2 group ids"):
        compute_advantages(R, W, [0, 1])


def test_spatial_advantages_per_patch_position():
    maps = torch.tensor(
        [
            [[1.0, NAN]],
            [[2.0, 5.0]],
            [[3.0, 7.0]],
            [[4.0, 1.0]],  # group 1: alone -> no baseline
        ]
    )
    out = spatial_advantages(maps, [0, 0, 0, 1])
    assert out.shape == maps.shape
    # position 0, group 0: [1,2,3] mean 2 std 1; position 1: [5,7] mean 6 std sqrt(2)
    s2 = math.sqrt(2)
    assert out[:3, 0, 0].tolist() == pytest.approx([-1 / (1 + EPS), 0, 1 / (1 + EPS)])
    assert math.isnan(out[0, 0, 1].item())
    assert out[1:3, 0, 1].tolist() == pytest.approx([-1 / (s2 + EPS), 1 / (s2 + EPS)])
    assert torch.isnan(out[3]).all()
    filled = spatial_advantages(maps, [0, 0, 0, 1], fill=0.0)
    assert not torch.isnan(filled).any() and filled[3].abs().sum() == 0
