"""One of five sites attacks (rounds without SecAgg+, default settings): the global update stays
within the stated tolerance of the honest sites' mean (server.validation)."""

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays

from server.metrics import RoundStatus
from tests.server.test_server_units import GLOBAL, _fit_res, _Proxy, _strategy


def _honest(rng: np.random.Generator) -> list[np.ndarray]:
    # an update of norm ~0.7 from the global model (zeros and ones)
    return [GLOBAL[0] + rng.normal(0.1, 0.01, GLOBAL[0].shape).astype(np.float32),
            GLOBAL[1] + rng.normal(0.1, 0.01, GLOBAL[1].shape).astype(np.float32)]


def _update(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([(a - g).ravel() for a, g in zip(arrays, GLOBAL, strict=True)])


ATTACKS = {  # name: (update -> attacker's update, claimed examples, excluded)
    "scaled 1e6 x": (lambda u: 1e6 * u, 10, True),
    "scaled 100 x (under the absolute bound)": (lambda u: 100 * u, 10, True),
    "sign-flipped": (lambda u: -u, 10, False),
    "claims 10,000,000 examples": (lambda u: u, 10_000_000, False),
    "claims 10,000,000 examples, scaled 2.9 x": (lambda u: 2.9 * u, 10_000_000, False),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.reliability(6)
def test_one_attacker_of_five_stays_within_the_stated_tolerance(attack: str) -> None:
    # Prepare: four honest sites, one attacker sending a transformed honest update
    change, claimed, excluded = ATTACKS[attack]
    rng = np.random.default_rng(0)
    honest = [_honest(rng) for _ in range(4)]
    own = _update(_honest(rng))
    sizes = [a.size for a in GLOBAL]
    parts = np.split(change(own), np.cumsum(sizes)[:-1])
    attacker = [(g + p.reshape(g.shape)).astype(np.float32) for g, p in zip(GLOBAL, parts, strict=True)]
    replies = [(_Proxy(i), _fit_res(a, i)) for i, a in enumerate(honest)]
    replies.append((_Proxy(4), _fit_res(attacker, 4, examples=claimed)))
    records: list = []
    strategy, _ = _strategy(records, ["federation.max_update_norm=100"])

    # Execute
    params, _ = strategy.aggregate_fit(1, replies, [])

    # Assert: excluded when it should be, and within w * (ratio + 1) median norms of the honest mean
    assert records[-1].status == RoundStatus.aggregated
    assert ("site-4" in records[-1].excluded) == excluded
    result = _update(parameters_to_ndarrays(params))
    honest_mean = np.mean([_update(h) for h in honest], axis=0)
    median = float(np.median([np.linalg.norm(_update(h)) for h in honest]))
    fed = strategy.cfg.federation
    weight = fed.max_examples_ratio / (fed.max_examples_ratio + 4)
    tolerance = weight * (fed.max_update_norm_ratio + 1) * median
    assert float(np.linalg.norm(result - honest_mean)) <= tolerance
    assert tolerance < 1.4 * median  # the stated figure: at most 1.33 median norms
