"""Params profiles: every shipped profile validates; bad ones fail naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from entity_tracking.config import ProfileError, find_repo_root, load_profile

REPO = find_repo_root(Path(__file__).parent)
PROFILES = sorted(p.stem for p in (REPO / "params").glob("*.yaml"))


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture
def ci_dict() -> dict:
    return yaml.safe_load((REPO / "params" / "ci.yaml").read_text())


@pytest.mark.parametrize("name", PROFILES)
def test_shipped_profiles_validate(name):
    prof = load_profile(name, REPO)
    assert prof.name == name
    assert prof.base_model.role == "base"


def test_required_profiles_exist():
    assert {"ci", "default"} <= set(PROFILES)


class TestErrors:
    def test_unknown_top_level_key(self, tmp_path, ci_dict):
        ci_dict["colour"] = "blue"
        p = _write(tmp_path, ci_dict)
        with pytest.raises(ProfileError) as e:
            load_profile(p, REPO)
        assert str(p) in str(e.value) and "'colour'" in str(e.value) and "unknown key" in str(e.value)

    def test_unknown_nested_key_is_dotted(self, tmp_path, ci_dict):
        ci_dict["data"]["num_boxs"] = 7
        with pytest.raises(ProfileError, match=r"key 'data\.num_boxs': unknown key"):
            load_profile(_write(tmp_path, ci_dict), REPO)

    def test_wrong_type(self, tmp_path, ci_dict):
        ci_dict["data"]["n_eval"] = "many"
        with pytest.raises(ProfileError, match=r"key 'data\.n_eval'"):
            load_profile(_write(tmp_path, ci_dict), REPO)

    def test_missing_local_model_dir(self, tmp_path, ci_dict):
        ci_dict["models"][0] = {"name": "x", "local_path": "./no/such/model"}
        with pytest.raises(ProfileError, match=r"key 'models\.0\.local_path': no such file"):
            load_profile(_write(tmp_path, ci_dict), REPO)

    def test_model_needs_exactly_one_source(self, tmp_path, ci_dict):
        ci_dict["models"][0] = {"name": "x", "hub_id": "a/b", "local_path": "."}
        with pytest.raises(ProfileError, match="exactly one of hub_id, local_path, build"):
            load_profile(_write(tmp_path, ci_dict), REPO)

    def test_extension_candidates_name_only_extension_groups(self, tmp_path, ci_dict):
        ci_dict["circuit"]["extension_candidates"] = {"value_fetcher": 3}
        with pytest.raises(ProfileError, match=r"key 'circuit\.extension_candidates': .*unknown extension group\(s\) "
                                               r"\['value_fetcher'\]; extension groups are \['object_writer'\]"):
            load_profile(_write(tmp_path, ci_dict), REPO)
        ci_dict["circuit"]["extension_candidates"] = {"object_writer": 0}
        with pytest.raises(ProfileError, match=r"key 'circuit\.extension_candidates': .*at least 1 head"):
            load_profile(_write(tmp_path, ci_dict), REPO)
        ci_dict["circuit"]["extension_candidates"] = {"object_writer": "four"}
        with pytest.raises(ProfileError, match=r"key 'circuit\.extension_candidates\.object_writer'"):
            load_profile(_write(tmp_path, ci_dict), REPO)
        ci_dict["circuit"]["extension_candidates"] = {}
        with pytest.raises(ProfileError, match=r"key 'circuit\.extension_candidates': .*name at least one extension group"):
            load_profile(_write(tmp_path, ci_dict), REPO)
        del ci_dict["circuit"]["extension_candidates"]
        assert load_profile(_write(tmp_path, ci_dict), REPO).circuit.extension_candidates == {"object_writer": 4}

    def test_missing_profile_lists_available(self):
        with pytest.raises(ProfileError, match="no such profile.*ci"):
            load_profile("no-such-profile", REPO)

    def test_not_a_mapping(self, tmp_path):
        p = tmp_path / "list.yaml"
        p.write_text("- 1\n- 2\n")
        with pytest.raises(ProfileError, match="must be a mapping"):
            load_profile(p, REPO)

    def test_no_secret_keys_in_schema(self):
        from entity_tracking.config import ModelSpec, Profile

        fields = set(Profile.model_fields) | set(ModelSpec.model_fields)
        assert not {f for f in fields if any(s in f.lower() for s in ("token_", "key", "secret", "password"))}
