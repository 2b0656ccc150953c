"""Every profile in configs/ loads and validates; lookup by name and by path."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.core.errors import ConfigError, ProfileNotFound
from worker.core.profiles import available_profiles, load_profile

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_is_commented(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem
    assert profile.trust_remote_code is False and profile.use_safetensors is True
    assert path.read_text().lstrip().startswith("#"), "every config file opens with a comment"
    assert load_profile(path.stem).name == profile.name


def test_expected_profiles_exist() -> None:
    assert {"qwen2.5-7b-medical", "qwen2.5-0.5b-instruct", "tiny-random"} <= set(available_profiles())
    medical = load_profile("qwen2.5-7b-medical")
    assert medical.base == "Qwen/Qwen2.5-7B-Instruct"
    assert medical.adapter == "ttennant/qwen2.5-7b-medical-lora"


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(ProfileNotFound, match=r"unknown profile 'nope'.*tiny-random"):
        load_profile("nope")


def test_bad_profile_names_file_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("# bad\nbase: x\nlimits:\n  max_new_tokens: -3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: field 'limits.max_new_tokens'"):
        load_profile(bad)


def test_adapter_only_profile_is_valid(tmp_path: Path) -> None:
    p = tmp_path / "only-adapter.yaml"
    p.write_text("# adapter only\nadapter: someone/lora\n")
    assert load_profile(p).base is None
