"""Recipe values are coerced to the schema's types or refused with the key named."""

import pytest

from privasr.config import load_config
from privasr.errors import ConfigError


def test_optional_floats_and_yaml_exponents_become_floats():
    c = load_config(None, ["privacy.delta=1e-5", "optim.lr=3e-4", "privacy.target_epsilon=8"])
    assert c.privacy.delta == 1e-5 and isinstance(c.privacy.delta, float)   # YAML: '1e-5'
    assert c.optim.lr == 3e-4 and c.privacy.target_epsilon == 8.0
    assert load_config(None, ["privacy.delta=null"]).privacy.delta is None


@pytest.mark.parametrize("override, message", [
    ("privacy.delta=abc", "privacy.delta: expected float"),
    ("optim.betas=0.9", "optim.betas: expected a list"),
    ("augment.speed_perturb=0.9,1.1", "augment.speed_perturb: expected a list"),
])
def test_values_of_the_wrong_shape_are_refused_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
