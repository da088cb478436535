"""Importing fla for its GLA ops must not swap transformers' own Mamba for fla's in the Auto mappings.

fla's package init registers its configs for "mamba", "mamba2" and "bitnet" with AutoConfig (exist_ok=True); on
the GPU machine, after zoo had loaded fla for GLA, `AutoModelForCausalLM.from_config(AutoConfig.for_model("mamba"))`
built fla's MambaForCausalLM, whose Triton norm then failed on CPU tensors (and benchmarks/generate.py's
"transformers MambaForCausalLM" baseline was fla's model). The fake package below does what fla's init does.
"""

import sys

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, MambaConfig, MambaForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from zoo_kernels.gla.fast import import_fla

FAKE = '''
from transformers import AutoConfig, PretrainedConfig


class MambaConfig(PretrainedConfig):
    model_type = "mamba"


class FakeOwnConfig(PretrainedConfig):
    model_type = "{own}"


AutoConfig.register("mamba", MambaConfig, exist_ok=True)
AutoConfig.register("{own}", FakeOwnConfig)
registered = True
'''


@pytest.fixture
def fake_fla(tmp_path, monkeypatch):
    name, own = "fake_fla_pkg", "fake-fla-own-model"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text(FAKE.format(own=own))
    monkeypatch.syspath_prepend(str(tmp_path))
    # start from transformers' own "mamba" even where the real fla was imported plainly before (its registration
    # would count as one made before, and be kept); put the registry back as it was afterwards
    saved = dict(CONFIG_MAPPING._extra_content)
    CONFIG_MAPPING._extra_content.pop("mamba", None)
    yield name, own
    sys.modules.pop(name, None)
    CONFIG_MAPPING._extra_content.clear()
    CONFIG_MAPPING._extra_content.update(saved)


def test_import_fla_keeps_transformers_mamba(fake_fla):
    name, own = fake_fla
    module = import_fla(name)
    assert module.registered  # the package did register its own Mamba config
    config = AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=1, state_size=4, vocab_size=64)
    assert type(config) is MambaConfig
    assert type(AutoModelForCausalLM.from_config(config)) is MambaForCausalLM
    # a model type transformers does not ship stays registered
    assert isinstance(AutoConfig.for_model(own), PretrainedConfig)
    assert type(AutoConfig.for_model(own)).__module__ == name


def test_import_fla_keeps_a_registration_made_before(fake_fla):
    """A user's own registration for a built-in type, made before fla's import, is the user's choice: kept."""
    name, _ = fake_fla

    class UserMambaConfig(MambaConfig):
        pass

    AutoConfig.register("mamba", UserMambaConfig, exist_ok=True)
    import_fla(name)
    assert type(AutoConfig.for_model("mamba")) is UserMambaConfig


def test_the_real_fla_leaves_transformers_model_types_alone():
    """In a fresh interpreter: zoo loading fla for GLA keeps transformers' Mamba, Mamba-2 and BitNet configs."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("fla") is None:
        pytest.skip("fla-core is not installed")
    code = ("from zoo_kernels.gla.fast import _fla_chunk_gla\n"
            "from transformers import AutoConfig\n"
            "assert _fla_chunk_gla() is not None, 'fla.ops.gla did not import'\n"
            "print(*(type(AutoConfig.for_model(t)).__module__ for t in ('mamba', 'mamba2', 'bitnet')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(m.startswith("transformers.") for m in out.stdout.split()), out.stdout


def test_an_import_that_fails_halfway_leaves_no_registration(fake_fla, tmp_path):
    name, _ = fake_fla
    init = tmp_path / name / "__init__.py"
    init.write_text(init.read_text() + "\nraise ImportError('fails after registering, as on an unsupported Triton')\n")
    with pytest.raises(ImportError, match="fails after registering"):
        import_fla(name)
    assert type(AutoConfig.for_model("mamba")) is MambaConfig
