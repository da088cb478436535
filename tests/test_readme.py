"""What README.md tells a user to type: the names it shows exist where it says they are."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from helpers import ROOT

README = (ROOT / "README.md").read_text()


def test_every_zoo_name_in_the_readme_resolves_after_the_imports_it_names():
    """The README built a Trainer on `zoo.train.NoWeightDecayMixin` with only `import zoo` in sight, which does not
    import zoo.train: AttributeError. Each `zoo.<module>.<name>` it shows must resolve, and a module that `import zoo`
    leaves unloaded must come with its `import zoo.<module>` (as `zoo.finetune.wrap_lora` does)."""
    names = sorted(set(re.findall(r"`[^`]*?\b(zoo(?:\.[A-Za-z_][A-Za-z0-9_]*)+)", README)))
    assert "zoo.finetune.wrap_lora" in names and "zoo.train.NoWeightDecayMixin" in names
    probe = ("import importlib, json, sys\nimport zoo\nloaded = {m for m in sys.modules if m.startswith('zoo.')}\n"
             "out = {}\nfor name in json.loads(sys.argv[1]):\n"
             "    parts, obj = name.split('.'), None\n"
             "    for i in range(len(parts), 0, -1):\n"
             "        try:\n            obj = importlib.import_module('.'.join(parts[:i]))\n            break\n"
             "        except ImportError:\n            continue\n"
             "    try:\n        for attr in parts[i:]:\n            obj = getattr(obj, attr)\n"
             "        module = '.'.join(parts[:i])\n"
             "        out[name] = [module, module == 'zoo' or module in loaded or i == len(parts)]\n"
             "    except AttributeError as e:\n        out[name] = [None, str(e)]\n"
             "print(json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", probe, json.dumps(names)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    missing = {name: why for name, (module, why) in found.items() if module is None}
    assert not missing, f"README names what does not exist: {missing}"
    unimported = {name: module for name, (module, loaded) in found.items()
                  if not loaded and f"import {module}`" not in README}
    assert not unimported, f"`import zoo` does not load these modules and the README does not say to import them: " \
                           f"{unimported}"


def test_the_lora_section_the_readme_lists_is_the_one_zoo_finetune_takes():
    """The README listed the `lora:` keys of zoo finetune without `check_forward`, which turns off the wrap-time check
    the paragraph before it promises; each key it lists must be a field, and each field listed."""
    import dataclasses

    from zoo.finetune import LoraSection

    sentence = re.search(r"The config's `lora:` section takes (.*?)\.\n", README, re.S)
    assert sentence, "the README no longer lists the lora: section's keys"
    listed = set(re.findall(r"`([a-z_]+)`", sentence.group(1)))
    assert listed == {f.name for f in dataclasses.fields(LoraSection)}
