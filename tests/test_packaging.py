"""A non-editable install works from any working directory: the wheel carries the configs (inside the zoo package)
and the CUDA sources, and a config argument that is not a file is looked up among the packaged configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from zoo import cli
from zoo.config_files import find_config, packaged_names, packaged_root

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "mamba-tiny.yaml"
BUILD_INPUTS = ("zoo", "kernels", "configs", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (so that no build/ or egg-info lands in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (found,) = (tmp / "dist").glob("hybrid_zoo-*.whl")
    return found


def test_the_wheel_carries_every_config_inside_the_package_and_the_cuda_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"zoo/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert "zoo/configs/models/jamba-tiny.yaml" in configs  # zoo demo's default
    assert configs <= names, sorted(configs - names)
    demo = yaml.safe_load((ROOT / "configs" / "compare" / "demo.yaml").read_text())
    for spec in demo["models"].values():  # the models zoo compare demo names
        path = spec["config"] if isinstance(spec, dict) else spec
        assert f"zoo/{path}" in names
    sources = {f"zoo_kernels/{p.relative_to(ROOT / 'kernels' / 'zoo_kernels').as_posix()}"
               for p in (ROOT / "kernels" / "zoo_kernels").rglob("csrc/*") if p.is_file()}
    assert len(sources) >= 20 and sources <= names, sorted(sources - names)
    assert not any(n.startswith(("configs/", "tests/", "benchmarks/", "scripts/")) for n in names)


def test_the_unpacked_wheel_finds_its_configs_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import zoo, zoo.config_files as f; from zoo.compare import load_compare_config;"
            "print(zoo.__file__); print(f.packaged_root());"
            "c = zoo.ZooConfig.from_yaml('configs/models/jamba-tiny.yaml'); print(c.layers);"
            "print(zoo.ZooConfig.from_yaml('mamba-tiny').d_model);"
            "cfg, folder = load_compare_config('configs/compare/demo.yaml'); print(folder);"
            "from zoo.compare import _find; print(_find(cfg.models['mamba'], folder, 'models.mamba'))")
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    inside = str(site / "zoo")
    assert lines[0].startswith(inside)  # the unpacked wheel, not the checkout
    assert lines[1] == str(site / "zoo" / "configs")
    assert lines[4] == str(site / "zoo" / "configs" / "compare")
    assert lines[5] == str(site / "zoo" / "configs" / "models" / "mamba-tiny.yaml")


def test_an_existing_path_is_taken_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert find_config("configs/models/mamba-tiny.yaml", "models") == Path("configs/models/mamba-tiny.yaml")
    own = tmp_path / "jamba-tiny.yaml"  # a file of the packaged name wins over the packaged config
    own.write_text("d_model: 32\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("jamba-tiny.yaml", "models") == Path("jamba-tiny.yaml")
    assert find_config(own, "models") == own


@pytest.mark.parametrize("text", ["configs/models/mamba-tiny.yaml", "models/mamba-tiny.yaml", "models/mamba-tiny",
                                  "mamba-tiny.yaml", "mamba-tiny"])
def test_other_arguments_name_a_packaged_config(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    assert find_config(text, "models") == packaged_root() / "models" / "mamba-tiny.yaml"


def test_a_bare_name_is_looked_up_in_the_folder_of_its_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config("demo", "compare") == packaged_root() / "compare" / "demo.yaml"
    assert find_config("demo", "train") == packaged_root() / "train" / "demo.yaml"
    assert find_config("compare/demo", "train") == packaged_root() / "compare" / "demo.yaml"
    assert "jamba-tiny" in packaged_names("models") and "demo" in packaged_names("compare")


def test_a_folder_given_as_a_config_is_named_a_folder_with_the_yaml_files_it_holds(tmp_path, monkeypatch, capsys):
    # a run folder given for its config (`zoo train runs/x`) was refused as "no such file 'runs/x'", though it is there
    from zoo import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "runs" / "x" / "train_config.yaml").write_text("model: mamba-tiny.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"^'runs/x' is a folder, not a config file; it holds "
                                                r"train_config.yaml: give the file, as 'runs/x/train_config.yaml'$"):
        find_config("runs/x", "train")
    with pytest.raises(FileNotFoundError, match=r"^'runs' is a folder, not a config file$"):
        find_config("runs", "models")
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "runs/x"])
    assert e.value.code == 2 and "zoo train: error: config: 'runs/x' is a folder" in capsys.readouterr().err


def test_a_name_found_nowhere_lists_the_packaged_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no such file 'jamba-tiiny'.*packaged models configs: .*jamba-tiny"):
        find_config("jamba-tiiny", "models")
    with pytest.raises(FileNotFoundError, match="packaged models configs"):
        find_config(tmp_path / "nope.yaml", "models")  # an absolute path is never looked up, only listed against
    with pytest.raises(ValueError, match=r"^config: no such file 'nope'.*packaged compare configs: 130m, demo"):
        from zoo.compare import load_compare_config

        load_compare_config("nope")


def test_the_commands_take_packaged_names_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli.main(["info", "jamba-tiny", "configs/models/mamba-tiny.yaml"])
    out = capsys.readouterr().out
    assert "| jamba-tiny | 8 |" in out and "| mamba-tiny | 4 |" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "mamba-tinny"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo info: no such file 'mamba-tinny'") and "mamba-tiny" in err and "Traceback" not in err
    from zoo.eval.common import check_model_path
    from zoo.train import load_config

    check_model_path("configs/models/mamba-tiny.yaml")
    with pytest.raises(ValueError, match=r"--model nope\.yaml: no such zoo model YAML"):
        check_model_path("nope.yaml")
    assert load_config("demo").model == "configs/models/mamba-tiny.yaml"  # configs/train/demo.yaml


def test_kernel_builds_go_to_a_user_cache_folder(tmp_path, monkeypatch):
    from zoo_kernels.selective_scan.cuda import cache_dir

    monkeypatch.delenv("ZOO_KERNELS_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert cache_dir() == tmp_path / "home" / ".cache" / "hybrid-zoo"
    monkeypatch.setenv("ZOO_KERNELS_CACHE", "")  # empty: unset, not the working directory
    assert cache_dir() == tmp_path / "home" / ".cache" / "hybrid-zoo"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "hybrid-zoo"
    monkeypatch.setenv("ZOO_KERNELS_CACHE", "~/zk")  # as an env file sets it, unexpanded
    assert cache_dir() == tmp_path / "home" / "zk"
    monkeypatch.setenv("ZOO_KERNELS_CACHE", "zk")
    assert cache_dir() == tmp_path / "zk"
