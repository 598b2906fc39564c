from pathlib import Path

import pytest
from omegaconf import OmegaConf

from shared_model.config import (
    ConfigError,
    FedCMRConfig,
    SSLMethod,
    available_presets,
    config_from_yaml,
    config_to_yaml,
    load_config,
    save_resolved_config,
)


def test_presets_load_and_differ() -> None:
    # Prepare / Execute
    demo = load_config("demo-cpu")
    paper = load_config("paper-vit-s8")
    # Assert
    assert {"demo-cpu", "paper-vit-s8"} <= set(available_presets())
    assert demo.model.preset == "vit-tiny-p8-64"
    assert paper.model.preset == "vit-small-p8-224"
    assert isinstance(demo, FedCMRConfig) and demo.ssl.method is SSLMethod.mae


def test_overrides_apply_with_types() -> None:
    cfg = load_config("demo-cpu", ["federation.rounds=5", "ssl.lr=0.01", "device=cpu"])
    assert cfg.federation.rounds == 5 and cfg.ssl.lr == pytest.approx(0.01)
    assert cfg.device == "cpu"


@pytest.mark.parametrize("override, fragment", [
    ("ssl.lrr=0.1", "ssl.lrr"),                  # misspelled key
    ("federation.roundz=3", "federation.roundz"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("federation.rounds=many", "federation.rounds"),  # wrong type
    ("ssl.method=simclr", "ssl.method"),          # not a known method
    ("model.preset=vit-huge", "model.preset"),    # not a known preset
    ("ssl.mae.mask_ratio=1.5", "ssl.mae.mask_ratio"),
    ("device=tpu", "device"),
])
def test_bad_overrides_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config("demo-cpu", [override])


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config("demo-cpu", ["federation.rounds"])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("ssl:\n  local_stepz: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "bad.yaml" in str(info.value) and "ssl.local_stepz" in str(info.value)


def test_wrong_type_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("federation:\n  rounds: [1, 2]\n")
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config(path)


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(ConfigError, match="demo-cpu"):
        load_config("no-such-preset")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config("demo-cpu", ["seed=7", "federation.min_sites=2"])
    path = save_resolved_config(cfg, tmp_path)
    again = config_from_yaml(path.read_text(), source=str(path))
    assert again == cfg
    assert OmegaConf.create(config_to_yaml(cfg))["seed"] == 7


def test_fine_tuning_from_a_released_foundation_has_no_pretraining_rounds() -> None:
    base = ["federation.foundation=/srv/fedcmr/runs/r1/release", "tasks.names=[sax_seg]"]
    cfg = load_config("demo-cpu", [*base, "federation.rounds=0", "federation.finetune_rounds=2"])
    assert cfg.federation.rounds == 0
    with pytest.raises(ConfigError, match="must be 0 when fine-tuning starts"):
        load_config("demo-cpu", [*base, "federation.rounds=3", "federation.finetune_rounds=2"])
    with pytest.raises(ConfigError, match="what to fine-tune"):
        load_config("demo-cpu", [*base, "federation.rounds=0", "federation.finetune_rounds=0"])
    with pytest.raises(ConfigError, match="federation.rounds"):
        load_config("demo-cpu", ["federation.rounds=0"])  # without a foundation: pretraining


@pytest.mark.parametrize(("overrides", "local"), [
    ([], True),  # the token MAE decoder: used by pretraining alone
    (["ssl.mae.decoder=dense"], False),  # released; segmentation starts from it
    (["ssl.method=dino"], False),  # the prototypes every site shares
    (["ssl.mae.decoder=dense", "federation.ssl_head=local"], True),
    (["federation.ssl_head=aggregated"], False),
])
def test_the_ssl_head_travels_only_where_it_is_worth_its_bytes(overrides: list[str], local: bool) -> None:
    from shared_model.config import ssl_head_stays_local

    assert ssl_head_stays_local(load_config(None, ["ssl.method=mae", *overrides])) is local


def test_a_plan_text_is_parsed_once_and_every_caller_gets_its_own_copy() -> None:
    # Prepare: a node receives the same plan for every instruction of a run
    text = config_to_yaml(load_config("demo-cpu", ["seed=11"]))
    first = config_from_yaml(text, "server plan")

    # Execute: a caller changes its copy
    first.tasks.names.append("disease")
    first.federation.rounds = 99
    again = config_from_yaml(text, "server plan")

    # Assert: the next caller sees the plan as sent
    sent = load_config("demo-cpu")
    assert again.tasks.names == sent.tasks.names and again.federation.rounds == sent.federation.rounds
    assert again is not first and again.seed == 11


def test_a_bad_plan_text_fails_every_time() -> None:
    bad = config_to_yaml(load_config("demo-cpu")).replace("rounds:", "roundz:", 1)
    for _ in range(2):
        with pytest.raises(ConfigError, match="roundz"):
            config_from_yaml(bad, "server plan")
