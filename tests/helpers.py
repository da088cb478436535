"""Shared test helpers: tolerant comparison that prints the relative error; a test file run under Triton's
interpreter; a script of the repository (scripts/, benchmarks/) imported as a module; a hub repo served offline;
a trained LoRA/DoRA adapter."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: ‖out−ref‖/‖ref‖ = {err:.3e} > {tol:.1e}"


def run_in_interpreter(path: str, timeout: int = 300) -> None:
    """Runs the test file `path` as a script with TRITON_INTERPRET=1 (which must be set before triton is imported,
    hence a subprocess), on one CPU thread as the suite runs, and fails with the end of its output if it fails."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # conftest.py: why
    proc = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def patch_triton_interpreter() -> None:
    """Lets Triton 3.6's interpreter index loops with its size-1 arrays (it calls int() on them, which NumPy >= 2.3
    refuses: "only 0-dimensional arrays can be converted to Python scalars"; the GPU machine's image has that pair).
    Call it first in a file's interpreter main; later Tritons take it unchanged."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patch


ROOT = Path(__file__).resolve().parents[1]


def interrupt_after(monkeypatch, module, batches: int | None) -> tuple[list, list]:
    """Makes ``module.per_position_loss`` (zoo.eval.length's, called once per batch of documents) raise
    KeyboardInterrupt on its call after ``batches`` calls (stop[0]; None: never); returns (calls, stop): the rows of
    each call, for counting, and the count to rearm."""
    real = module.per_position_loss
    calls = []

    def step(model, input_ids, *args, **kwargs):
        if stop[0] is not None and len(calls) >= stop[0]:
            raise KeyboardInterrupt
        calls.append(input_ids.shape[0])
        return real(model, input_ids, *args, **kwargs)

    stop = [batches]
    monkeypatch.setattr(module, "per_position_loss", step)
    return calls, stop


def load_script(path: str):
    """The repository's script at `path` (e.g. "scripts/collapse.py") as a module, registered in sys.modules under
    its name (dataclasses resolve their annotations through it)."""
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# accelerate turns FSDP into plain DDP (MULTI_CPU) on CPU processes: its state takes FSDP only on accelerators. This
# launcher promotes the state to FSDP as it would be on GPUs, then runs the script, so accelerate's FSDP2 code
# (fully_shard over _no_split_modules, sharded save_state / load_state, get_state_dict) runs unchanged over gloo.
_FSDP_ON_CPU = '''
import runpy, sys
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _fsdp_on_cpu
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
'''


def accelerate_launch(config: str, *args: str) -> list[str]:
    """The command `accelerate launch --config_file configs/accelerate/CONFIG.yaml ARGS` with a free rendezvous
    port: two launches at once (pytest -n 2) would both take accelerate's default 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--main_process_port", str(port), *args]


def run_launch(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)`` for an `accelerate launch`,
    with the launcher and its processes in a process group of their own, killed whole on the timeout (or when the
    test stops): subprocess.run killed the launcher alone, then waited for the end of output pipes that its workers
    held open, so a worker stuck in its rendezvous held the test, and CI, until their time ran out."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group that ``proc`` leads (started with ``start_new_session=True``), where it lives."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def cpu_launch_env() -> dict[str, str]:
    """The environment of an `accelerate launch` whose processes run on the CPU (gloo): ACCELERATE_USE_CPU=1, one
    thread each, and no GPU visible. On a GPU machine accelerate (1.15) took each process's local rank for a GPU index
    in its barrier, and rank 1 failed where there is one GPU (the README's test command there: nine launches failed)."""
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def launch_fsdp_on_cpu(tmp_path: Path, script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml SCRIPT ARGS` (2 processes) on CPU (gloo), run
    as FSDP2 (see _FSDP_ON_CPU)."""
    launcher = tmp_path / "fsdp_on_cpu.py"
    launcher.write_text(_FSDP_ON_CPU)
    env = cpu_launch_env()
    return run_launch(accelerate_launch("fsdp", str(launcher), str(ROOT / script), *args), env, timeout)


class PositionwiseMixer(torch.nn.Module):
    """A custom mixer without a cache entry (`init_state` returns None): its output at a position reads that
    position's input alone."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_model, d_model)

    def init_state(self, batch_size, dtype, device, max_len=None):
        return None

    def forward(self, x, *, cache=None, seq_idx=None, position_ids=None, attention_mask=None):
        return self.proj(x)


def stream_reads(monkeypatch) -> list[str]:
    """The texts every datasets.IterableDataset iteration yields from now on (what the stream read)."""
    import datasets

    seen: list[str] = []
    iterate = datasets.IterableDataset.__iter__

    def counted(self):
        for example in iterate(self):
            seen.append(example["text"])
            yield example

    monkeypatch.setattr(datasets.IterableDataset, "__iter__", counted)
    return seen


def ctrl_c_on_call(fn, n: int):
    """fn, wrapped to raise KeyboardInterrupt (a second Ctrl-C) at its n-th call instead of running: a training loop's
    forward_backward stopped mid-step."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return fn(*args, **kwargs)

    return wrapped


def ctrl_c_on_step(lr_at, step: int):
    """A training loop's `lr_at(step, section)`, wrapped to raise KeyboardInterrupt (Ctrl-C) when asked for `step`:
    the run stopped before that step, after saving the ones before it."""

    def wrapped(at, section):
        if at == step:
            raise KeyboardInterrupt
        return lr_at(at, section)

    return wrapped


def offline_hub_repo(monkeypatch, cache: Path, repo_id: str) -> Path:
    """The snapshot folder of hub repo `repo_id` in a hub cache at `cache`, with huggingface_hub offline and reading
    that cache: whatever is saved into the folder is what transformers and PEFT download for `repo_id` (their
    hf_hub_download, as with HF_HUB_OFFLINE=1 and a filled cache), with no network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def save_trained_adapter(base: Path, folder: Path, use_dora: bool):
    """A LoRA (DoRA with use_dora) adapter of the tiny Jamba saved at `base`, its weights moved off their initial values
    as training moves them, saved by PEFT into `folder`; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from zoo.config import ZooConfig

    torch.manual_seed(0)
    yaml = Path(__file__).resolve().parents[1] / "configs" / "models" / "jamba-tiny.yaml"
    AutoModelForCausalLM.from_config(ZooConfig.from_yaml(yaml)).save_pretrained(base)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             LoraConfig(r=4, target_modules=["in_proj", "q_proj"], use_dora=use_dora,
                                        init_lora_weights=False))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:  # trained values: the magnitudes away from the weights' norms they start at
                p.mul_(1.5)
    adapted.save_pretrained(folder)
    return adapted.eval()



def adapter_without_tokenizer(tmp_path, monkeypatch, where: str) -> str:
    """A LoRA adapter of the tiny Jamba saved by PEFT (no tokenizer files), its base model saved with the byte
    tokenizer: both local folders, or both hub repos (the adapter naming its base by hub id). Returns the adapter's
    reference."""
    import json
    import shutil

    from zoo.data.text import ByteTokenizer

    if where == "folder":
        save_trained_adapter(tmp_path / "base", tmp_path / "adapter", use_dora=False)
        ByteTokenizer().save_pretrained(tmp_path / "base")
        return str(tmp_path / "adapter")
    adapter = offline_hub_repo(monkeypatch, tmp_path / "hub", "someone/tiny-jamba-lora")
    save_trained_adapter(tmp_path / "base", adapter, use_dora=False)
    ByteTokenizer().save_pretrained(tmp_path / "base")
    base = offline_hub_repo(monkeypatch, tmp_path / "hub", "someone/tiny-jamba")
    base.parent.mkdir()
    shutil.move(tmp_path / "base", base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "someone/tiny-jamba"}))
    return "someone/tiny-jamba-lora"


class Terminated(Exception):
    """What SIGTERM raises under `sigterm_raises_terminated` where the code under test sets no handler of its own."""


@contextlib.contextmanager
def sigterm_raises_terminated():
    """SIGTERM raises Terminated in the block (the default handler would end pytest); yields that handler, for checking
    that the code under test put it back."""
    def terminated(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_after(monkeypatch, module, batches: int) -> list:
    """Makes ``module.per_position_loss`` (zoo.eval.length's, called once per batch of documents) send this process
    SIGTERM, as `timeout` does, on its call after ``batches`` calls; returns the rows of each call."""
    real = module.per_position_loss
    calls = []

    def step(model, input_ids, *args, **kwargs):
        if len(calls) >= batches:
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(input_ids.shape[0])
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(module, "per_position_loss", step)
    return calls


def save_letter_tokenizer(folder: Path, **specials: tuple[str, int]) -> None:
    """Save a character tokenizer of the 26 lowercase letters (ids 0..25), <unk> (26) and a space (27), with the special
    tokens given as role=(token, id): save_letter_tokenizer(path, pad_token=("<pad>", 700)) makes a tokenizer of 29
    tokens whose pad id lies far past them (ids with gaps)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(97 + i): i for i in range(26)} | {"<unk>": 26, " ": 27} | dict(specials.values())
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            **{role: token for role, (token, _) in specials.items()}).save_pretrained(folder)
