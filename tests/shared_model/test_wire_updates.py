"""SecAgg+ update encoding: what a node sends fits SecAgg+'s range whatever its weights are, and
the server's decoded mean equals plain FedAvg within SecAgg+'s quantisation."""

import numpy as np
import pytest
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from shared_model.config import load_config
from shared_model.wire import decode_update, encode_update, update_scale

RANGE, LEVELS = 8.0, 4194304  # Flower's defaults, also the project's


def _secagg_mean(sent: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Equal-weight mean as Flower's SecAgg+ computes it: quantise, sum, dequantise, offset."""
    total = [sum(parts) for parts in zip(*(quantize(s, RANGE, LEVELS) for s in sent), strict=True)]
    mean = dequantize(total, RANGE, LEVELS)
    return [(m - (len(sent) - 1) * RANGE) / len(sent) for m in mean]


@pytest.mark.reliability(7)
def test_trained_weights_beyond_the_clipping_range_aggregate_like_plain_fedavg() -> None:
    # Prepare: a global model with weights up to +-20 (a trained model's norms and biases reach
    # past +-8) and three sites' local models a round of training away from it
    rng = np.random.default_rng(0)
    global_arrays = [rng.normal(0, 6, (64, 32)).astype(np.float32), np.full(32, 19.5, np.float32)]
    local = [[(g + rng.normal(0, 1e-3, g.shape)).astype(np.float32) for g in global_arrays]
             for _ in range(3)]
    scale = update_scale(load_config("demo-cpu").federation.secagg.max_weight_change, RANGE)

    # Execute
    sent = [encode_update(site, global_arrays, scale, 100.0, RANGE) for site in local]
    merged = decode_update(_secagg_mean([s.arrays for s in sent]), global_arrays, scale)

    # Assert: nothing was shrunk, everything sent lies in the range, and the result is the plain
    # mean within the number of sites times the quantisation step (in weight units)
    assert all(s.shrink == 1.0 for s in sent)
    assert all(np.abs(a).max() <= RANGE for s in sent for a in s.arrays)
    plain = [np.mean([site[i].astype(np.float64) for site in local], axis=0) for i in range(2)]
    step = 2 * RANGE / LEVELS * scale
    worst = max(float(np.abs(m.astype(np.float64) - p).max()) for m, p in zip(merged, plain))
    assert worst <= 3 * step + 2e-6  # plus float32 rounding of weights near 20
    assert all(m.dtype == np.float32 for m in merged)


@pytest.mark.reliability(7)
def test_an_update_past_the_norm_bound_is_clipped_to_it_keeping_its_direction() -> None:
    global_arrays = [np.zeros(100, np.float32)]
    update = np.random.default_rng(1).normal(0, 1, 100).astype(np.float32)
    update *= 50 / np.linalg.norm(update)

    encoded = encode_update([update], global_arrays, 1.0, 5.0, RANGE)  # up to 8 per weight
    back = decode_update(encoded.arrays, global_arrays, 1.0)[0]

    assert encoded.norm == pytest.approx(50, rel=1e-5)
    assert np.linalg.norm(back) == pytest.approx(5.0, rel=1e-5)
    assert np.allclose(back / np.linalg.norm(back), update / 50, atol=1e-6)


@pytest.mark.reliability(7)
def test_a_change_larger_than_the_plan_allows_per_weight_is_shrunk_to_fit() -> None:
    global_arrays = [np.zeros(10, np.float32)]
    update = np.zeros(10, np.float32)
    update[3], update[7] = 5.0, -2.5  # 5 x the default max_weight_change

    encoded = encode_update([update], global_arrays, 1.0 / RANGE, 100.0, RANGE)

    assert encoded.shrink == pytest.approx(0.2)
    assert float(np.abs(encoded.arrays[0]).max()) == pytest.approx(RANGE)
    assert decode_update(encoded.arrays, global_arrays, 1.0 / RANGE)[0][7] == pytest.approx(-0.5)


@pytest.mark.reliability(5)
def test_a_non_finite_update_is_never_sent() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_update([np.array([np.nan], np.float32)], [np.zeros(1, np.float32)], 0.125, 1.0, RANGE)
