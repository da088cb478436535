"""The ZOO_* environment switches (zoo_kernels._env), on CPU: every switch is checked where it is read, and a value it
does not take raises a ValueError naming the variable, the value and what it takes (it was a bare int() traceback
inside a decode step, or a spelling taken silently: ZOO_DECODE_PDL=false kept PDL on). Unset and empty variables
keep their defaults; booleans take 1/true/yes/on and 0/false/no/off. Switches read when a module is imported are
checked in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from zoo_kernels._env import env_flag, env_int


def _import_with(env: dict[str, str], code: str, args: list[str] | None = None) -> subprocess.CompletedProcess:
    """Runs `code` (or the command line `args`) in a fresh interpreter with `env` added (for the switches read at
    import), and no other ZOO_* switch of this process's environment (ZOO_SSD_AUTOTUNE=0 for quick tests made the
    defaults expected below fail)."""
    own = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
    full = {**own, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels")]), "OMP_NUM_THREADS": "1"}
    full.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *(args or ["-c", code])], env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("Yes", True), ("ON", True), (" 1 ", True),
                                            ("0", False), ("false", False), ("No", False), ("off", False)])
def test_flag_spellings(value, expected, monkeypatch):
    monkeypatch.setenv("ZOO_TEST_FLAG", value)
    assert env_flag("ZOO_TEST_FLAG", not expected) is expected


@pytest.mark.parametrize("default", [True, False])
def test_flag_unset_or_empty_is_the_default(default, monkeypatch):
    monkeypatch.delenv("ZOO_TEST_FLAG", raising=False)
    assert env_flag("ZOO_TEST_FLAG", default) is default
    monkeypatch.setenv("ZOO_TEST_FLAG", "")
    assert env_flag("ZOO_TEST_FLAG", default) is default


@pytest.mark.parametrize("value", ["2", "maybe", "-1", "tru"])
def test_flag_refuses_other_values(value, monkeypatch):
    monkeypatch.setenv("ZOO_TEST_FLAG", value)
    with pytest.raises(ValueError, match=rf"\$ZOO_TEST_FLAG='{value}': expected 1/true/yes/on or 0/false/no/off"):
        env_flag("ZOO_TEST_FLAG", True)


def test_flags_read_at_each_call_are_checked(monkeypatch):
    """The switches that the kernels and the Mamba mixer read at each call refuse a bad value on any device (they
    used to read it as on, or never read it off CUDA), and take the new spellings."""
    from zoo_kernels import add_norm
    from zoo_kernels import pdl_linear as pl
    from zoo_kernels.selective_scan import fused_step

    from zoo.mixers.mamba import Mamba

    monkeypatch.setenv("ZOO_DECODE_PDL", "nope")
    with pytest.raises(ValueError, match=r"\$ZOO_DECODE_PDL='nope'"):
        add_norm._pdl(torch.device("cpu"))
    monkeypatch.setenv("ZOO_DECODE_PDL", "false")
    assert add_norm._pdl(torch.device("cpu")) is False

    w, x = torch.zeros(32, 64, dtype=torch.bfloat16), torch.zeros(2, 64, dtype=torch.bfloat16)
    monkeypatch.setenv("ZOO_PDL_LINEAR_PDL", "2")
    with pytest.raises(ValueError, match=r"\$ZOO_PDL_LINEAR_PDL='2'"):
        pl.pdl_linear(x, w)
    monkeypatch.setenv("ZOO_PDL_LINEAR_PDL", "off")
    with pytest.raises(RuntimeError, match="needs CUDA"):  # a good value: on to the device check
        pl.pdl_linear(x, w)

    monkeypatch.setenv("ZOO_MAMBA_STEP_PDL", "y")
    xs = torch.zeros(1, 64)
    with pytest.raises(ValueError, match=r"\$ZOO_MAMBA_STEP_PDL='y'"):
        fused_step.mamba_step(xs, xs, torch.zeros(1, 64, 3), torch.zeros(64, 4), None, torch.zeros(40, 64),
                              torch.zeros(64, 8), None, torch.zeros(64, 16), None, torch.zeros(1, 64, 16))

    mixer = Mamba(64, d_state=16, dt_rank=8)
    monkeypatch.setenv("ZOO_MAMBA_FUSED_STEP", "disable")
    with pytest.raises(ValueError, match=r"\$ZOO_MAMBA_FUSED_STEP='disable'"):
        mixer._may_fuse(xs, "ref")
    monkeypatch.setenv("ZOO_MAMBA_FUSED_STEP", "no")
    assert mixer._may_fuse(xs, "ref") is False


def test_a_bad_kernels_verbose_is_refused_not_taken_for_an_unavailable_kernel(monkeypatch):
    """$ZOO_KERNELS_VERBOSE (print the JIT build's commands) was read inside the build, whose every error makes the
    extension unavailable for the process: a bad value is refused when the extension is first asked for."""
    from zoo_kernels.selective_scan.cuda import _CSRC, _HEADERS, _SOURCES, JitExtension

    monkeypatch.setenv("ZOO_KERNELS_VERBOSE", "loud")
    ext = JitExtension("test extension", _SOURCES, _HEADERS, _CSRC, "zoo_test", (99, 0), "never built:")
    with pytest.raises(ValueError, match=r"\$ZOO_KERNELS_VERBOSE='loud'"):
        ext.available()
    monkeypatch.setenv("ZOO_KERNELS_VERBOSE", "1")
    assert ext.available() is False  # a good value: on to the device checks
    assert "no CUDA device" in ext.why_unavailable() or "never built" in ext.why_unavailable()


def test_switches_read_at_import_take_the_usual_spellings():
    code = ("import zoo.layers as l, zoo.decode as d, zoo_kernels.ssd.triton_ssd as s; "
            "print(l.DECODE_LINEAR, l.DECODE_PDL, d.ARGMAX_KERNEL, s._AUTOTUNE, l.PDL_MAX_ROWS, s._TARGET_PROGRAMS)")
    done = _import_with({"ZOO_DECODE_LINEAR": "false", "ZOO_DECODE_PDL": "off", "ZOO_DECODE_ARGMAX": "no",
                         "ZOO_SSD_AUTOTUNE": "False", "ZOO_PDL_MAX_ROWS": "16", "ZOO_SSD_TARGET_PROGRAMS": " 512"},
                        code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False"] * 4 + ["16", "512"]
    done = _import_with({"ZOO_DECODE_LINEAR": "", "ZOO_DECODE_PDL": "1", "ZOO_DECODE_ARGMAX": "yes",
                         "ZOO_PDL_MAX_ROWS": "", "ZOO_SSD_TARGET_PROGRAMS": ""}, code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True"] * 4 + ["32", "1024"]


@pytest.mark.parametrize("name,module", [("ZOO_DECODE_ARGMAX", "zoo.decode"),
                                         ("ZOO_SSD_AUTOTUNE", "zoo_kernels.ssd.triton_ssd")])
def test_flags_read_at_import_refuse_a_bad_value(name, module):
    done = _import_with({name: "sometimes"}, f"import {module}")
    assert done.returncode != 0
    assert done.stderr.startswith(f"python: ${name}='sometimes': expected 1/true/yes/on or 0/false/no/off")


@pytest.mark.parametrize("name,value,module,expected", [
    ("ZOO_PDL_MAX_ROWS", "abc", "zoo.layers", "an int from 0 to 64"),
    ("ZOO_PDL_MAX_ROWS", "65", "zoo.layers", "an int from 0 to 64"),  # the kernel takes 64: 65 was 64 silently
    ("ZOO_SSD_TARGET_PROGRAMS", "0", "zoo_kernels.ssd.triton_ssd", "a positive int"),
], ids=["rows-abc", "rows-65", "programs-0"])
def test_numbers_read_at_import_refuse_a_bad_value(name, value, module, expected):
    done = _import_with({name: value}, f"import {module}")
    assert done.returncode != 0
    assert done.stderr.startswith(f"python: ${name}='{value}': expected {expected}")


# the console script pip writes for `zoo = "zoo.cli:main"`: it imports zoo before main can catch anything
CONSOLE_SCRIPT = """import re
import sys
from zoo.cli import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""
BAD_ROWS = ("$ZOO_PDL_MAX_ROWS='abc': expected an int from 0 to 64 (rows up to which decode projections take the PDL "
            "kernel)")


@pytest.mark.parametrize("command", ["zoo", "python -m zoo", "python -m zoo.cli", "scripts/train.py",
                                     "scripts/train_synthetic.py"])
def test_a_bad_switch_read_at_import_ends_a_command_in_one_line(command, tmp_path):
    """A bad switch that zoo reads when it is imported ($ZOO_PDL_MAX_ROWS, zoo.layers) stopped `zoo info`, `python -m
    zoo.cli` and the scripts in a traceback through zoo/__init__, modeling and layers: the import fails before the
    command's own error handling runs. It is one line naming the command, and a non-zero exit status."""
    if command == "zoo":
        (tmp_path / "zoo").write_text(CONSOLE_SCRIPT)
        args, prog = [str(tmp_path / "zoo"), "info", "jamba-tiny"], "zoo"
    elif command.startswith("python -m"):
        module = command.split()[-1]
        args, prog = ["-m", module, "info", "jamba-tiny"], "zoo" if module == "zoo" else "zoo.cli"
    else:
        args, prog = [str(ROOT / command), "some.yaml"], command.split("/")[1]
    done = _import_with({"ZOO_PDL_MAX_ROWS": "abc"}, "", args)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"{prog}: {BAD_ROWS}\n"


def test_a_bad_switch_read_at_import_keeps_its_traceback_under_zoo_traceback(tmp_path):
    (tmp_path / "zoo").write_text(CONSOLE_SCRIPT)
    done = _import_with({"ZOO_PDL_MAX_ROWS": "abc", "ZOO_TRACEBACK": "1"}, "", [str(tmp_path / "zoo"), "info", "x"])
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):") and 'zoo/layers.py", line' in done.stderr
    assert done.stderr.endswith(f"SwitchError: {BAD_ROWS}\n")


def test_a_caught_bad_switch_read_at_import_leaves_other_errors_alone():
    """The one-line report is for that error only, when nothing catches it: a caller that catches it (a ValueError)
    goes on, and its other uncaught errors keep their traceback."""
    code = ("try:\n    import zoo\nexcept ValueError as e:\n    print('caught', e)\n"
            "raise RuntimeError('another error')")
    done = _import_with({"ZOO_PDL_MAX_ROWS": "abc"}, code)
    assert done.returncode == 1 and done.stdout == f"caught {BAD_ROWS}\n"
    assert "Traceback (most recent call last)" in done.stderr and done.stderr.endswith("RuntimeError: another error\n")


def test_int_bounds_choices_and_default(monkeypatch):
    monkeypatch.delenv("ZOO_TEST_INT", raising=False)
    assert env_int("ZOO_TEST_INT", 7, low=1) == 7 and env_int("ZOO_TEST_INT", None, low=1) is None
    for value, number in (("", 7), ("3", 3), (" 12 ", 12)):
        monkeypatch.setenv("ZOO_TEST_INT", value)
        assert env_int("ZOO_TEST_INT", 7, low=1, high=12) == number
    for value in ("0", "13", "2.5", "twelve", "0x10"):
        monkeypatch.setenv("ZOO_TEST_INT", value)
        with pytest.raises(ValueError, match=rf"\$ZOO_TEST_INT='{value}': expected an int from 1 to 12 \(things\)"):
            env_int("ZOO_TEST_INT", 7, low=1, high=12, what="things")
    monkeypatch.setenv("ZOO_TEST_INT", "3")
    with pytest.raises(ValueError, match=r"\$ZOO_TEST_INT='3': expected one of 0, 1, 2, 4, 8$"):
        env_int("ZOO_TEST_INT", 0, choices=(0, 1, 2, 4, 8))


@pytest.mark.parametrize("value", ["3", "-1", "16", "four"])
def test_mamba_step_rows_refuses_what_the_kernel_does_not_take(value, monkeypatch):
    """$ZOO_MAMBA_STEP_ROWS went through int() into the extension: 3 or 16 reached its TORCH_CHECK (or passed
    `supported`, which takes any forced rows), a word a bare int() traceback. Refused before the extension."""
    from zoo_kernels.selective_scan import fused_step

    monkeypatch.delenv("ZOO_MAMBA_STEP_KERNEL", raising=False)
    monkeypatch.setenv("ZOO_MAMBA_STEP_ROWS", value)
    xs = torch.zeros(1, 64)
    with pytest.raises(ValueError, match=rf"\$ZOO_MAMBA_STEP_ROWS='{value}': expected one of 0, 1, 2, 4, 8"):
        fused_step.mamba_step(xs, xs, torch.zeros(1, 64, 3), torch.zeros(64, 4), None, torch.zeros(40, 64),
                              torch.zeros(64, 8), None, torch.zeros(64, 16), None, torch.zeros(1, 64, 16))
    for good in ("1", "2", "4", "8"):
        monkeypatch.setenv("ZOO_MAMBA_STEP_ROWS", good)
        assert fused_step._forced_rows() == int(good)
    monkeypatch.setenv("ZOO_MAMBA_STEP_ROWS", "")
    assert fused_step._forced_rows() == 0


def test_pdl_linear_trigger_and_config_name_the_variable(monkeypatch):
    """$ZOO_PDL_LINEAR_TRIGGER took any word but "early" for the late trigger (a typo of early measured late); a
    tiling forced by $ZOO_PDL_LINEAR_CONFIG that the kernel does not take was refused as a `config` argument that
    the caller never passed."""
    from zoo_kernels import pdl_linear as pl

    x, w = torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(48, 64, dtype=torch.bfloat16)
    monkeypatch.delenv("ZOO_PDL_LINEAR_PDL", raising=False)
    monkeypatch.delenv("ZOO_PDL_LINEAR_CONFIG", raising=False)
    monkeypatch.setenv("ZOO_PDL_LINEAR_TRIGGER", "erly")
    with pytest.raises(ValueError, match=r"\$ZOO_PDL_LINEAR_TRIGGER='erly': expected one of late, early"):
        pl.pdl_linear(x, w)
    for good in ("early", "Late", ""):
        monkeypatch.setenv("ZOO_PDL_LINEAR_TRIGGER", good)
        with pytest.raises(RuntimeError, match="needs CUDA"):
            pl.pdl_linear(x, w)
    monkeypatch.delenv("ZOO_PDL_LINEAR_TRIGGER")
    for bad in ("3,1", "1,16", "2", "a,b", "1,2,4"):
        monkeypatch.setenv("ZOO_PDL_LINEAR_CONFIG", bad)
        with pytest.raises(ValueError, match=rf"\$ZOO_PDL_LINEAR_CONFIG='{bad}': expected 'feature_tiles,cluster' "
                                             r"with feature tiles in \(1, 2, 4, 8\) and cluster in \(1, 2, 4, 8\)"):
            pl.pdl_linear(x, w)
    monkeypatch.setenv("ZOO_PDL_LINEAR_CONFIG", "2,1")  # legal, but N = 48 is no multiple of 32
    with pytest.raises(ValueError, match=r"N = 48 must be a multiple of 32 .*\(set by \$ZOO_PDL_LINEAR_CONFIG\)"):
        pl.pdl_linear(x, w)
    with pytest.raises(ValueError, match=r"N = 48 must be a multiple of 32 with at most 65535 tiles$"):
        pl.pdl_linear(x, w, config=(2, 1))  # an argument wins, and is named as one
    monkeypatch.setenv("ZOO_PDL_LINEAR_CONFIG", "1,2")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        pl.pdl_linear(x, w)


def test_mamba_step_kernel_is_checked_with_its_rows(monkeypatch):
    """$ZOO_MAMBA_STEP_KERNEL names the kernel (any case); the register-rows kernel takes 2 or 4 rows per CTA, and
    $ZOO_MAMBA_STEP_ROWS=1 or 8 with it reached the extension's refusal (a message that formats numbers: the one
    that crashed the process on the GPU machine's image) instead of a ValueError."""
    from zoo_kernels.selective_scan import fused_step

    xs = torch.zeros(1, 64)
    args = (xs, xs, torch.zeros(1, 64, 3), torch.zeros(64, 4), None, torch.zeros(40, 64), torch.zeros(64, 8), None,
            torch.zeros(64, 16), None, torch.zeros(1, 64, 16))
    monkeypatch.delenv("ZOO_MAMBA_STEP_ROWS", raising=False)
    monkeypatch.setenv("ZOO_MAMBA_STEP_KERNEL", "rows")
    for rows in ("1", "8"):
        monkeypatch.setenv("ZOO_MAMBA_STEP_ROWS", rows)
        with pytest.raises(ValueError, match=rf"\$ZOO_MAMBA_STEP_ROWS={rows} with \$ZOO_MAMBA_STEP_KERNEL=rows: "
                                             "the register-rows kernel takes 2 or 4"):
            fused_step.mamba_step(*args)
    monkeypatch.setenv("ZOO_MAMBA_STEP_KERNEL", "Rows")
    assert fused_step._forced_kernel() == fused_step.KERNELS["rows"]
    monkeypatch.setenv("ZOO_MAMBA_STEP_KERNEL", "registers")
    monkeypatch.delenv("ZOO_MAMBA_STEP_ROWS")
    with pytest.raises(ValueError, match=r"\$ZOO_MAMBA_STEP_KERNEL='registers': expected one of slots, rows"):
        fused_step.mamba_step(*args)
    monkeypatch.setenv("ZOO_MAMBA_STEP_KERNEL", "rows")
    monkeypatch.setenv("ZOO_MAMBA_STEP_ROWS", "4")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="unavailable"):  # good values: on to the extension
            fused_step.mamba_step(*args)
    monkeypatch.setenv("ZOO_MAMBA_STEP_KERNEL", "slots")
    monkeypatch.setenv("ZOO_MAMBA_STEP_ROWS", "8")
    assert (fused_step._forced_kernel(), fused_step._forced_rows()) == (fused_step.KERNELS["slots"], 8)
