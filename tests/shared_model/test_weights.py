import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from shared_model.config import load_config
from shared_model.encoders import PRESETS, build_encoder
from shared_model.ssl import build_ssl_model, federated_keys
from shared_model.weights import (
    WeightsError,
    arrays_to_state_dict,
    load_into,
    load_safetensors,
    save_safetensors,
    select_prefix,
    state_dict_to_arrays,
    strip_opacus,
)


@pytest.fixture(scope="module")
def ssl_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_ssl_model(load_config("demo-cpu"))


def test_arrays_round_trip_is_exact(ssl_model: torch.nn.Module) -> None:
    keys = federated_keys(ssl_model)
    state = ssl_model.state_dict()
    arrays = state_dict_to_arrays(state, keys)
    back = arrays_to_state_dict(arrays, keys, reference=state)
    assert list(back) == keys
    for key in keys:
        assert torch.equal(back[key], state[key])
    assert all(isinstance(a, np.ndarray) and a.flags["C_CONTIGUOUS"] for a in arrays)
    # Arrays are copies: training the model afterwards does not change what was sent.
    with torch.no_grad():
        ssl_model.encoder.pos_embed.add_(1.0)
    assert not np.array_equal(arrays[keys.index("encoder.pos_embed")],
                              ssl_model.state_dict()["encoder.pos_embed"].numpy())
    with torch.no_grad():
        ssl_model.encoder.pos_embed.sub_(1.0)


def test_float64_aggregate_is_cast_back_to_model_dtype(ssl_model: torch.nn.Module) -> None:
    keys = federated_keys(ssl_model)
    state = ssl_model.state_dict()
    wide = [a.astype(np.float64) for a in state_dict_to_arrays(state, keys)]
    back = arrays_to_state_dict(wide, keys, reference=state)
    assert all(back[k].dtype == torch.float32 for k in keys)


def test_shape_and_count_mismatches_are_errors(ssl_model: torch.nn.Module) -> None:
    keys = federated_keys(ssl_model)
    state = ssl_model.state_dict()
    arrays = state_dict_to_arrays(state, keys)
    with pytest.raises(WeightsError, match="expected"):
        arrays_to_state_dict(arrays[:-1], keys, reference=state)
    arrays[0] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(WeightsError, match=keys[0]):
        arrays_to_state_dict(arrays, keys, reference=state)


def test_encoder_selection_and_opacus_prefix(ssl_model: torch.nn.Module) -> None:
    encoder = select_prefix(ssl_model.state_dict(), "encoder.")
    assert set(encoder) == set(ssl_model.encoder.state_dict())
    wrapped = {f"_module.{k}": v for k, v in encoder.items()}
    assert set(strip_opacus(wrapped)) == set(encoder)
    with pytest.raises(WeightsError):
        select_prefix(encoder, "nothing.")


def test_safetensors_round_trip(tmp_path: Path, ssl_model: torch.nn.Module) -> None:
    state = {k: v.clone() for k, v in ssl_model.state_dict().items()}
    path = save_safetensors(tmp_path / "w.safetensors", state, {"round": 3, "name": "x"})
    loaded, meta = load_safetensors(path)
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert meta["round"] == "3" and meta["name"] == "x"


def test_corrupt_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(WeightsError, match="broken.safetensors"):
        load_safetensors(path)


def test_load_into_names_missing_keys() -> None:
    encoder = build_encoder("vit-tiny-p8-64")
    partial = dict(list(encoder.state_dict().items())[:-2])
    with pytest.raises(WeightsError, match="missing"):
        load_into(encoder, partial)


@pytest.mark.parametrize("preset", ["vit-tiny-p8-64", "vit-tiny-p8-96", "vit-small-p8-224"])
def test_saved_encoder_loads_with_plain_timm(tmp_path: Path, preset: str) -> None:
    # Prepare: an encoder with non-default weights, saved the way a release saves it.
    torch.manual_seed(1)
    encoder = build_encoder(preset)
    with torch.no_grad():
        encoder.pos_embed.add_(0.5)
    path = save_safetensors(tmp_path / "encoder.safetensors", encoder.state_dict())
    # Execute: exactly the call the issue promises to users.
    loaded = timm.create_model(PRESETS[preset].timm_name, in_chans=1, num_classes=0,
                               checkpoint_path=str(path))
    # Assert: same weights, same embeddings.
    x = torch.randn(2, 1, PRESETS[preset].image_size, PRESETS[preset].image_size)
    encoder.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), encoder(x)[:, 0], atol=1e-6)  # CLS embedding


@pytest.mark.parametrize("preset", ["hybrid-tiny-p8-96", "hybrid-tiny-p16-96", "hybrid-unet-p16-96"])
def test_hybrid_encoders_load_in_plain_timm_and_give_skips(tmp_path, preset) -> None:
    import timm

    from shared_model.encoders import build_encoder, get_preset

    torch.manual_seed(0)
    encoder = build_encoder(preset)
    images = torch.rand(2, 1, 96, 96)
    ours = encoder(images)
    p = get_preset(preset)
    first = 0 if p.stem_full_res else 1  # a U-Net-shaped stem starts at 1/2
    assert [s.shape[-1] for s in encoder.skips] == [96 // 2**(i + first)
                                                    for i in range(int(math.log2(p.patch_size)) - first)]
    save_safetensors(tmp_path / "encoder.safetensors", encoder.state_dict())
    plain = timm.create_model(p.timm_name, in_chans=1, num_classes=0,
                              checkpoint_path=str(tmp_path / "encoder.safetensors"))
    plain.eval(), encoder.eval()
    assert torch.allclose(plain.forward_features(images), encoder(images), atol=1e-5)
    assert ours.shape == (2, 1 + (96 // p.patch_size) ** 2, p.embed_dim)
