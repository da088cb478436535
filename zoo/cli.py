"""`zoo` console script: demo | compare | train | finetune | eval | convert | graft | info | generate."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

# subcommand -> (module, function, help); modules are imported only when their command runs
COMMANDS = {
    "demo": ("zoo.demo", "main", "train a tiny hybrid on MQAR on CPU (about a minute)"),
    "compare": ("zoo.compare", "main", "fair comparison: budget-matched models, one recipe, a table and plots"),
    "train": ("zoo.train", "main", "pretrain a model from a run config under accelerate"),
    "convert": ("zoo.convert", "main", "convert checkpoints into/out of the zoo (transformers, mamba_ssm)"),
    "graft": ("zoo.surgery", "main", "build a hybrid from a Transformer++ and a Mamba/Mamba-2 checkpoint"),
    "finetune": ("zoo.finetune", "main", "LoRA-finetune a checkpoint with PEFT; saves adapter and merged checkpoint"),
    "info": ("zoo.cli", "info", "parameters, state size and layers of model configs"),
    "generate": ("zoo.cli", "generate", "generate text from a saved model folder"),
}
EVAL_COMMANDS = {
    "synthetic": "zoo.eval.synthetic",
    "passkey": "zoo.eval.passkey",
    "length": "zoo.eval.length",
    "state": "zoo.eval.state",
}


def info(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from zoo.compare import mixer_state_size

    p = argparse.ArgumentParser(prog="zoo info", description="Parameter counts of model configs.")
    p.add_argument("configs", nargs="+", help="zoo model YAML configs (or packaged ones' names, e.g. jamba-tiny) or "
                                              "saved zoo model folders (config.json)")
    p.add_argument("--seq-len", type=int, default=2048, help="length at which to report the state size (default 2048)")
    args = p.parse_args(argv)
    if args.seq_len < 1:
        p.error(f"--seq-len must be at least 1, got {args.seq_len}")
    configs = [(path, _info_config(path)) for path in args.configs]  # every config's errors before the table
    with torch.device("meta"):  # and every model's: a dotted mixer path is imported (or refused) only here
        models = [AutoModelForCausalLM.from_config(cfg) for _, cfg in configs]
    print("| config | layers | d_model | parameters | without embeddings | state floats/seq @ L |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (path, cfg), model in zip(configs, models):
        n = sum(p.numel() for p in model.parameters())
        emb = model.get_input_embeddings().weight.numel()
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            emb += head.weight.numel()  # an untied LM head is an embedding too (as zoo compare's non_embedding)
        state = sum(mixer_state_size(b.mixer)(args.seq_len) for b in model.model.layers)
        name = os.path.basename(os.path.normpath(path)).removesuffix(".yaml")
        print(f"| {name} | {cfg.num_hidden_layers} | {cfg.d_model} | {n / 1e6:.1f}M | {(n - emb) / 1e6:.1f}M "
              f"| {state / 1e6:.2f}M |")


def _info_config(path: str):
    """The ZooConfig of a YAML config or of a saved model folder (its config.json); ValueError for a folder that is
    not a zoo model folder."""
    import json
    from pathlib import Path

    from zoo.config import ZooConfig
    from zoo.hub import check_model_ref

    folder = Path(path).expanduser()
    if not folder.is_dir():
        return ZooConfig.from_yaml(path)
    check_model_ref(path, what="config")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type != "zoo":
        raise ValueError(f"config: {path!r} holds a {model_type!r} model, not a zoo model; give a zoo model folder "
                         f"or YAML (zoo convert brings transformers and mamba_ssm checkpoints into the zoo)")
    return ZooConfig.from_pretrained(folder)


def generate(argv: list[str] | None = None) -> None:
    import torch
    from transformers import TextStreamer

    import zoo  # noqa: F401  (registers the Auto classes)
    from zoo.decode import continues_chunks_exactly
    from zoo.eval.common import (
        DTYPES,
        check_fed_special_ids,
        encode_with_bos,
        resolve_device,
        tokenizer_name,
        trained_with_bos,
    )
    from zoo.eval.passkey import greedy_overrides
    from zoo.hub import check_model_ref, load_causal_lm, load_folder_tokenizer, require_tokenizer, tokenizer_source
    from zoo.train import position_table

    p = argparse.ArgumentParser(
        prog="zoo generate", description="Generate from a saved model folder.",
        epilog="Of the checkpoint's generation_config.json this command keeps its eos token id(s) and cache "
               "settings; with --sample its temperature, top-k, top-p (where not given) and other sampling cut-offs "
               "(min_p, typical_p, ...); with --num-beams its length_penalty and early_stopping; its "
               "prefill_chunk_size where the model continues a chunk from its cache exactly (not transformers' Mamba, "
               "FalconMamba or Jamba). The rest its options own: the decoding method (greedy, --sample, --num-beams), "
               "one text per prompt (no num_return_sequences, return_dict_in_generate), --max-new-tokens (no "
               "max_time), --stop (its stop_strings replaced), and no repetition penalty, n-gram ban, minimum length, "
               "forced or suppressed tokens.")
    p.add_argument("model", help="a saved model folder (zoo, or any transformers causal LM) or hub id, or a PEFT "
                                 "adapter (folder or hub id; loaded by PEFT onto its base model)")
    p.add_argument("prompt", nargs="?", help="the text to continue (or give --prompt / --prompts-file)")
    p.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT", default=[],
                   help="another prompt (repeatable): several prompts run as one batch, left-padded")
    p.add_argument("--prompts-file", metavar="FILE",
                   help="a text file of prompts, one per line (blank lines skipped), run as one batch with any "
                        "other prompts")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the tokenizer's chat template (with the "
                        "assistant's turn opened) and print the reply alone")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="with --sample (default: the model's generation config, 1.0)")
    p.add_argument("--top-k", type=int, help="with --sample (default: the generation config's, 50; 0: no top-k "
                                              "filtering, as generate's top_k=0)")
    p.add_argument("--top-p", type=float, help="with --sample (default: the generation config's, 1.0)")
    p.add_argument("--seed", type=int, help="with --sample: the same seed gives the same text")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default 1: none)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="decode with each step replayed from a CUDA graph (zoo models on CUDA, no beams): "
                        "generate(cuda_graph=True)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop once the text ends with TEXT (repeatable; \\n and \\t are a newline and a tab): "
                        "generate's stop_strings")
    p.add_argument("--tokenizer", help="'byte' or a tokenizer folder / hub id (default: the model folder's; a PEFT "
                                       "adapter without one: its base model's)")
    p.add_argument("--device", help="where to run, e.g. cpu, cuda, cuda:1 (default: cuda when a GPU is visible)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="the weights' dtype (default: the checkpoint's)")
    # intermixed: the prompt may follow options (`zoo generate DIR --device cpu "text"`); parse_args matched the
    # optional positional empty at the model and refused the prompt after the options as an unrecognized argument
    args = p.parse_intermixed_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        p.error(f"--num-beams must be at least 1, got {args.num_beams}")
    prompts = ([args.prompt] if args.prompt is not None else []) + args.prompts
    if args.prompts_file is not None:
        try:
            # (utf-8-sig: the byte-order mark an editor may write at the top went into the first prompt)
            with open(args.prompts_file, encoding="utf-8-sig") as f:
                prompts += [line.rstrip("\r\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--prompts-file {args.prompts_file!r}: {e}")
        if len(prompts) == (args.prompt is not None) + len(args.prompts):
            p.error(f"--prompts-file {args.prompts_file!r} holds no prompt (one per line)")
    if not prompts:
        p.error("no prompt: give one after the model, or --prompt TEXT (repeatable) or --prompts-file FILE")
    if any(not text for text in prompts):
        p.error("the prompt is empty; give at least one character")
    for i, text in enumerate(prompts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # bytes of the command line that are not UTF-8 (a Latin-1 'caf\xe9' under a UTF-8 locale) reach Python as
            # lone surrogates ('\udce9'), which failed in the tokenizer after the model had loaded ('TypeError:
            # TextEncodeInput must be Union[TextInputSequence, ...]')
            raw = text.encode("utf-8", "surrogateescape")
            what = "the prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            p.error(f"{what} is not UTF-8 text ({raw!r}); give it in UTF-8 (or in a UTF-8 --prompts-file)")
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p))
                if v is not None}
    given = [f"--{k.replace('_', '-')}" for k in sampling] + (["--seed"] if args.seed is not None else [])
    if given and not args.sample:
        p.error(f"{', '.join(given)}: sampling options; add --sample (greedy decoding would ignore them)")
    if args.temperature is not None and not args.temperature > 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:  # (0 turns top-k filtering off, as generate's top_k=0)
        p.error(f"--top-k must be at least 0 (0: no top-k filtering), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not -2**63 <= args.seed < 2**64:
        # torch.manual_seed's range: past it the run failed after loading the model, 'Overflow when unpacking long long'
        p.error(f"--seed must be an integer in [-2**63, 2**64), got {args.seed}")
    if args.cuda_graph and args.num_beams > 1:
        p.error("--cuda-graph decodes greedily or samples; beam search (--num-beams) runs without it")
    try:  # (after the options' own checks, which hold on any machine)
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.cuda_graph and device.type != "cuda":
        p.error(f"--cuda-graph: CUDA graphs need a CUDA device, and this run is on {device}")
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop or []]
    if any(not s for s in stops):
        p.error("--stop: an empty string would stop at once; give at least one character")
    for stop in stops:
        try:
            stop.encode("utf-8")
        except UnicodeEncodeError:  # (as a prompt's, above: it failed mid-run, after the prompt had been printed)
            p.error(f"--stop {stop.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text; give it in UTF-8")
    check_model_ref(args.model, adapter_ok=True)
    # a PEFT adapter without tokenizer files: its base model's tokenizer, as PEFT's users load it (the adapter's folder
    # was refused as holding none)
    source = args.tokenizer or tokenizer_source(args.model)
    # (a --tokenizer folder without tokenizer files is refused as such, not blamed on the model)
    tok = require_tokenizer(source) if args.tokenizer else load_folder_tokenizer(source)
    if tok is None:
        what = f"{args.model} holds no tokenizer files" if source == args.model else \
            f"{args.model} is a PEFT adapter without tokenizer files, and its base model {source} holds none either"
        p.error(f"{what}; pass --tokenizer (byte, or a tokenizer folder or hub id)")
    which = tokenizer_name(args.tokenizer, args.model)  # (as messages name it)
    if args.chat and not getattr(tok, "chat_template", None):
        p.error(f"--chat: {which} has no chat template (tokenizer_config.json's chat_template or "
                f"chat_template.jinja); run without --chat, or pass --tokenizer with one that has it")
    if args.chat:  # (before the model loads: a template that refuses a lone user message ended in a traceback after it)
        from jinja2.exceptions import TemplateError

        try:
            chats = [tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True) for text in prompts]
        except TemplateError as e:  # (the template's raise_exception: "a system message must come first")
                p.error(f"--chat: {which}'s chat template refuses a prompt as a lone user message: {e}; run without "
                    f"--chat, or pass --tokenizer with another chat template")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if len(prompts) > 1 and pad_id is None:
        p.error(f"{len(prompts)} prompts run as one left-padded batch, and the tokenizer has neither a pad nor an "
                f"eos token to pad with; give one prompt per call")
    kwargs = {"dtype": DTYPES[args.dtype]} if args.dtype else {}
    model = load_causal_lm(args.model, **kwargs).to(device).eval()  # an adapter through PEFT: DoRA kept
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tok) > n_embed:  # a prompt token past them failed in the embedding as 'IndexError: index out of range'
        p.error(f"{which} has {len(tok)} tokens, more than the model's {n_embed} embeddings; give the tokenizer "
                f"the model was trained with")
    if args.cuda_graph and not isinstance(model, zoo.ZooForCausalLM):
        p.error(f"--cuda-graph: {args.model} is a {type(model).__name__}, not a zoo model; run without it")
    if args.chat:  # the template writes the special tokens (bos included) itself
        rows = [tok(chat, add_special_tokens=False)["input_ids"] for chat in chats]
    else:
        # zoo models train on <bos> + text: the prompt starts with it as the evaluations' prompts do, unless the
        # model was trained without it (data.add_bos false, recorded in its config)
        rows = [encode_with_bos(tok, text, trained_with_bos(model.config)) for text in prompts]
    if empty := [i for i, row in enumerate(rows) if not row]:
        # a text the tokenizer drops whole (spaces to a whitespace-splitting word tokenizer without a bos token): one
        # such prompt failed in the embedding ('Expected tensor for argument #1 'indices' to have one of the following
        # scalar types: Long, Int; but got torch.FloatTensor'), and one of several generated from its pads alone
        what = "the prompt" if len(prompts) == 1 else f"prompt {empty[0] + 1}"
        p.error(f"{what} ({prompts[empty[0]]!r}) encodes to no tokens with {which} (and no bos token goes "
                f"in front of it); give text it encodes")
    # a tokenizer whose ids have gaps (<pad> at 600 in one of 29 tokens) passes the check of its size. The ids the
    # embedding reads must be rows of it: every prompt token (a <bos> put in front) and, with several prompts, the pad
    # (each row's left padding, and its tokens once it has ended): several prompts left-padded with such a pad failed
    # in the embedding, 'IndexError: index out of range in self'. A special id that none of them is (one prompt's
    # pad, an eos the model never produces) is warned about: it was refused, and one prompt could not run at all
    fed = {t for row in rows for t in row} | ({pad_id} if len(prompts) > 1 else set())

    def fix(name: str) -> str:
        padded = "several prompts are left-padded with it: give one prompt per call, or" \
            if len(prompts) > 1 and getattr(tok, name) == pad_id else "give"
        return f"{padded} the tokenizer the model was trained with"

    try:
        check_fed_special_ids(tok, n_embed, fed, which, fix)
    except ValueError as e:
        p.error(str(e))
    if past := sorted(t for t in fed if not 0 <= t < n_embed):
        # another token of the tokenizer's with an id in its gaps (a <sep> at 600), written in a prompt, failed in the
        # embedding, 'IndexError: index out of range in self'
        text = tok.convert_ids_to_tokens(past[0]) if hasattr(tok, "convert_ids_to_tokens") else None
        p.error(f"{which}: the prompt holds token id {past[0]}{f' ({text!r})' if isinstance(text, str) else ''}, "
                f"outside the model's vocabulary (vocab_size {n_embed}: ids 0..{n_embed - 1}), though the tokenizer "
                f"has {len(tok)} tokens (its ids have gaps); give the tokenizer the model was trained with")
    width = max(len(row) for row in rows)  # left padding: every row's last prompt token is the batch's last
    if (table := position_table(model)) is not None and width + args.max_new_tokens - 1 > table[1]:
        # a model of learned absolute positions (GPT-2's wpe) has no row for a position past them: the prompt and the
        # text ran into them and failed in that embedding, 'IndexError: index out of range in self' (after the
        # streamer had printed part of the text). The last new token is never fed back: it takes no position (one
        # more than the positions was refused, which generated)
        longest = "the prompt has" if len(rows) == 1 else "the longest prompt has"
        room = table[1] - width + 1
        fix = f"lower --max-new-tokens to <= {room}" if room >= 1 else "give a shorter prompt"
        p.error(f"{longest} {width} tokens and --max-new-tokens is {args.max_new_tokens}, but {args.model} learns "
                f"{table[1]} absolute positions ({table[0]}, config max_position_embeddings); {fix}")
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    ids = {"input_ids": input_ids, "attention_mask": attention_mask}
    if args.seed is not None:
        torch.manual_seed(args.seed)
    # the text appears as it is generated (transformers' streamer, one row; beam search has no single text until it
    # ends); --chat shows the reply alone
    streamer = TextStreamer(tok, skip_prompt=args.chat, skip_special_tokens=True) \
        if args.num_beams == 1 and len(prompts) == 1 else None
    # the checkpoint's generation_config.json applies to every generate() call (transformers merges it under the
    # arguments): the settings this command's flags own are passed explicitly, so that it cannot change them. Its
    # num_return_sequences > 1 failed greedy decoding ('Greedy methods ... do not support num_return_sequences') and
    # the one-row streamer with --sample, and printed the rows against the wrong prompts; its max_time cut the text
    # short without a word (--max-new-tokens is this command's length); its stop_strings failed without --stop
    # ('could not locate a tokenizer'), and --stop's are the ones the printed texts are cut at. Its repetition
    # penalties, n-gram bans, minimum lengths, ... (passkey's GREEDY) changed the tokens: greedy decoding was not
    owned = {**greedy_overrides(model), "num_beams": args.num_beams, "stop_strings": stops or None,
             # its return_dict_in_generate made generate return an output object, not the token ids printed below
             "return_dict_in_generate": False}
    if getattr(model.generation_config, "prefill_chunk_size", None) is not None and not continues_chunks_exactly(model):
        # transformers' Mamba / Jamba prefilled the prompt in the checkpoint's chunks, each dropping the state of the
        # ones before (other logits, silently); the prompt is one forward for them, as without the setting
        owned["prefill_chunk_size"] = None
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             pad_token_id=pad_id if len(prompts) > 1 else tok.pad_token_id,
                             streamer=streamer, **owned, **sampling,
                             **({"tokenizer": tok} if stops else {}),
                             **({"cuda_graph": True} if args.cuda_graph else {}))
    if streamer is not None:
        return
    if stops and len(prompts) > 1:
        # transformers pads a row that met a stop string only where there is an eos_token_id: without one it ran on
        # while the other rows decoded, and its text was printed past the stop. Each row ends at its first stop, as
        # its own call ends
        from transformers.generation.stopping_criteria import StopStringCriteria

        met = StopStringCriteria(tokenizer=tok, stop_strings=stops)
        out = [next((row[:k] for k in range(width + 1, len(row) + 1) if met(row[None, :k], None)[0]), row)
               for row in out.cpu()]
    for i, row in enumerate(out):
        start = width if args.chat else width - len(rows[i])  # the reply alone, or the prompt without its pads
        if len(prompts) > 1:
            print(f"==> prompt {i + 1} <==")
        print(tok.decode(row[start:], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: zoo {" + ",".join([*COMMANDS, "eval"]) + "} ..."
    if not argv or argv[0] in ("-h", "--help"):
        lines = [usage, *(f"  {name:10s} {text}" for name, (_, _, text) in COMMANDS.items()),
                 f"  {'eval':10s} {' | '.join(EVAL_COMMANDS)}: research evaluations"]
        # (through _run: `zoo --help | head -1` ended in a BrokenPipeError traceback)
        _exit(_run("zoo", lambda _: print("\n".join(lines)), []))
        return
    cmd, rest = argv[0], argv[1:]
    if cmd == "eval":
        eval_usage = f"usage: zoo eval {{{','.join(EVAL_COMMANDS)}}} ... (zoo eval NAME -h for its options)"
        if rest and rest[0] in ("-h", "--help"):
            _exit(_run("zoo eval", lambda _: print(eval_usage), []))
            return
        if not rest or rest[0] not in EVAL_COMMANDS:
            close = difflib.get_close_matches(rest[0], EVAL_COMMANDS, n=1) if rest else []
            _usage_error((f"zoo eval: unknown evaluation {rest[0]!r}" + (f"; did you mean {close[0]!r}?" if close
                          else "") + "\n" if rest else "") + eval_usage)
        _exit(_run(f"zoo eval {rest[0]}", _lazy(EVAL_COMMANDS[rest[0]], "main"), rest[1:]))
        return
    if cmd not in COMMANDS:
        close = difflib.get_close_matches(cmd, [*COMMANDS, "eval"], n=1)
        _usage_error(f"zoo: unknown command {cmd!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                     + f"\n{usage}")
    module_name, fn, _ = COMMANDS[cmd]
    _exit(_run(f"zoo {cmd}", _lazy(module_name, fn), rest))


def _lazy(module_name: str, fn: str):
    """The command's function, its module imported when it is called: inside `_run`, so a Ctrl-C during the
    seconds that importing torch and transformers takes ends as one line and 130 too."""
    return lambda argv: getattr(importlib.import_module(module_name), fn)(argv)


def _usage_error(message: str) -> None:
    """Bad command-line usage: the message on stderr and exit status 2, as argparse does."""
    print(message, file=sys.stderr)
    sys.exit(2)


def _user_error(e: BaseException) -> bool:
    """Errors that report bad input (a config field, a missing or wrong folder, a full cache, a missing backend,
    a device this machine does not have) and read best as one line; anything else keeps its traceback."""
    import yaml

    message = str(e)
    return (isinstance(e, (ValueError, OSError, yaml.YAMLError))
            or type(e).__name__ in ("KVCacheFull", "BackendUnavailable")
            or (isinstance(e, AssertionError) and "not compiled with CUDA" in message)  # torch, --device cuda
            or (isinstance(e, RuntimeError) and ("device string" in message or "no NVIDIA driver" in message
                                                 # torch built without the backend: --device mps on Linux
                                                 or "is not linked with support for" in message)))


def _run(prog: str, fn, argv: list[str]):
    """Run a command: bad input ends in one line `prog: message` and exit status 2, an interruption in 130
    ($ZOO_TRACEBACK=1 keeps the traceback)."""
    from zoo_kernels._env import env_flag

    try:
        traceback = env_flag("ZOO_TRACEBACK", False)  # (read first: a bad value is refused before any work)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    try:
        return fn(argv)
    except KeyboardInterrupt as e:
        if traceback:
            raise
        if os.environ.get("RANK", "0") == "0":  # the launch's processes stop together: its first one says so
            print(f"{prog}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)  # (where it saved, if it did)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return 141  # the reader of the output left (`zoo info ... | head -1`): as a shell reports SIGPIPE, no message
    except Exception as e:
        if traceback or not _user_error(e):
            raise
        # (a missing model folder is named by zoo.hub.check_model_ref where each command loads its model)
        print(f"{prog}: {e}{_packaged_name_hint(prog, e, argv)}\n(ZOO_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2


def _packaged_name_hint(prog: str, e: BaseException, argv: list[str]) -> str:
    """For a failed hub load (an OSError, or the ValueError zoo train wraps one in) of a bare name that is a packaged
    model config's (`--model jamba-tiny`, `model: jamba-tiny`) by a command whose model may be a zoo YAML: it takes
    the config with `.yaml`; the bare name went to the hub, which offline reported only a failed connection."""
    takes_yaml = prog in ("zoo train", "zoo finetune") or prog.startswith("zoo eval")
    if not takes_yaml or not (isinstance(e, OSError) or isinstance(e.__cause__, OSError)):
        return ""
    from zoo.config_files import packaged_names

    given = [item.split("=", 1)[-1] for item in argv]
    bare = next((name for name in packaged_names("models") if (name in given or f"{name!r}" in str(e))
                 and not os.path.exists(os.path.expanduser(name))), None)
    return "" if bare is None else (f"\n({bare!r} was read as a hub id: a model argument takes a packaged model config "
                                    f"with its .yaml, {bare}.yaml)")


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone; stdout then writes to /dev/null, so that the flush at exit does
    not fail again ('Exception ignored ... BrokenPipeError')."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        closed = any(events & select.POLLERR for _, events in poller.poll(0))  # a pipe without a reader
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or a stdout without a file
        return False
    if closed:
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return closed


def _exit(rc) -> None:
    """Pass a command's integer return code (errors, 130 on interruption) on to the shell."""
    if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
        sys.exit(rc)


if __name__ == "__main__":
    main()
