import pytest
from language_stand_ins import save_tiny_lm, save_tiny_vlm
from pretrained import save_encoding_models


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny VAEs and text encoders (pretrained.save_encoding_models), shared read-only."""
    return save_encoding_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("vlm"))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("lm"))
