"""Config files: a path, or one of the configs that ship with zoo, by name.

The rule, for every command's and function's config argument: a path that names an existing file is that file,
exactly as before. Any other is looked up among the packaged configs (the repository's configs/: in a checkout or
an editable install the folder itself, in an installed wheel its copy inside the zoo package), so that the
repository's spelling works from any working directory:

    configs/models/jamba-tiny.yaml   models/jamba-tiny.yaml   models/jamba-tiny   jamba-tiny.yaml   jamba-tiny

the last two in the folder of the argument's kind (models/ for a model config, train/ for a run or finetune
config, compare/ for a comparison). A name found nowhere raises FileNotFoundError listing that folder's names.
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("models", "train", "compare", "accelerate")
_HERE = Path(__file__).resolve().parent


def packaged_root() -> Path:
    """The packaged configs/ folder: zoo/configs/ in a wheel (setup.py copies it there), else the checkout's."""
    inside = _HERE / "configs"
    return inside if inside.is_dir() else _HERE.parent / "configs"


def packaged_names(kind: str) -> list[str]:
    """The names of the packaged configs of `kind` (file stems of configs/<kind>/*.yaml)."""
    return sorted(p.stem for p in (packaged_root() / kind).glob("*.yaml"))


def find_config(path: str | Path, kind: str) -> Path:
    """`path` when it is a file, else the packaged config it names (the module's rule); kind: one of KINDS.

    Raises FileNotFoundError naming `path` and listing the packaged configs of `kind` (or, for a folder, the YAML
    files in it)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if not given.is_absolute():
        root = packaged_root()
        parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
        candidates = [root.joinpath(*parts)] if parts else []
        if len(parts) == 1:
            candidates.append(root / kind / parts[0])
        for candidate in candidates:
            for file in (candidate, candidate.with_name(candidate.name + ".yaml")):
                if file.suffix in (".yaml", ".yml") and file.is_file():
                    return file
    if given.is_dir():  # (reported as "no such file", though it is there: a run folder given for the config in it)
        held = sorted(f.name for f in given.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
        which = f"; it holds {', '.join(held)}: give the file, as {str(Path(path) / held[0])!r}" if held else ""
        raise FileNotFoundError(f"{str(path)!r} is a folder, not a config file{which}")
    names = packaged_names(kind)
    listed = f"packaged {kind} configs: {', '.join(names)}" if names else f"no packaged configs at {packaged_root()}"
    raise FileNotFoundError(f"no such file {str(path)!r}, nor a packaged config of that name ({listed})")
