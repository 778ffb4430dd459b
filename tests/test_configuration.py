import json

import pytest

from caduceus.configuration import CaduceusModelConfig
from tests.conftest import FIXTURES, REFERENCE_MODELS


@pytest.mark.parametrize("name", REFERENCE_MODELS)
def test_upstream_config_json_round_trips(name):
    path = FIXTURES / name / "config.json"
    upstream = json.loads(path.read_text())
    config = CaduceusModelConfig.from_json_file(path)
    assert config.to_dict() == upstream


def test_published_defaults_and_padding():
    config = CaduceusModelConfig(vocab_size=12)
    assert config.vocab_size == 16
    assert config.complement_map[7] == 10 and config.complement_map[15] == 15
    assert (config.d_model, config.n_layer, config.d_inner, config.dt_rank) == (118, 4, 236, 8)
    assert config.ssm_cfg["d_state"] == 16 and config.fused_add_norm and not config.residual_in_fp32


def test_string_keys_are_ordered_by_id_not_insertion():
    cmap = {"9": 8, "8": 9, "7": 10, "10": 7}
    config = CaduceusModelConfig(complement_map=cmap)
    assert list(config.complement_map) == list(range(16)) and config.complement_map[10] == 7


def test_bad_values():
    with pytest.raises(ValueError, match="bidirectional_strategy"):
        CaduceusModelConfig(bidirectional_strategy="concat")
    with pytest.raises(ValueError, match="d_model"):
        CaduceusModelConfig(d_model=0)


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{\n  "d_model": 32,\n  oops\n}')
    with pytest.raises(ValueError, match=r"config.json.*line 3"):
        CaduceusModelConfig.from_json_file(path)
