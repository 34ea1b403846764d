"""``attnlab inspect MODEL_DIR --text ... | --file ...``: capture, analyse, write one HTML report + JSON.

Steps (each shown in a rich progress display on stderr, unless ``--quiet``):

1. load the model (:func:`attnlab.inspect.models.load_model`: safetensors directory or GGUF);
2. one forward pass over the text with :func:`attnlab.inspect.capture.capture` (streaming
   metrics, every layer and head unless ``--layers`` / ``--heads``), massive activations, and
   the attention maps of a window of ``--matrix-tokens`` tokens;
3. causal LMs only: retrieval scores on passkey prompts (:mod:`.retrieval`) and the
   StreamingLLM perplexities of the text (:mod:`.streaming`);
4. head importance and pruning curves on the text (:mod:`.importance`; ``--no-importance``);
5. ``<out>/report.html`` (self-contained, works offline) and ``<out>/report.json``.

:func:`collect` does steps 2-4 for a loaded model and returns the report data
(:mod:`.report`); :func:`run` is the command.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Sequence

import torch

DEFAULT_OUT = "attnlab-inspect"


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def parse_indices(text: str) -> List[int]:
    """``"0,2,5-7"`` -> ``[0, 2, 5, 6, 7]`` (ranges inclusive, sorted, duplicates removed)."""
    out = set()
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a > b:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected indices like 0,2,5-7 (non-negative ints, ranges a-b with "
                                             f"a <= b), got {text!r}") from None
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative indices like 0,2,5-7, got {text!r}")
    return sorted(out)


def _int_at_least(lowest: int):
    def conv(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {lowest}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected an int >= {lowest}, got {value}")
        return value

    conv.__name__ = f"int>={lowest}"
    return conv


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``attnlab inspect``."""
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="a Hugging Face model on disk: a directory with config.json and *.safetensors, a .gguf file, "
                        "or a directory holding one .gguf file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to inspect")
    src.add_argument("--file", help="read the text to inspect from this file (UTF-8)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory for report.html and report.json "
                                                      f"(default ./{DEFAULT_OUT})")
    p.add_argument("--layers", type=parse_indices, help="capture only these layers, e.g. 0,2,5-7 (default: all)")
    p.add_argument("--heads", type=parse_indices, help="capture only these query heads, e.g. 0-3 (default: all)")
    p.add_argument("--max-tokens", type=_int_at_least(2), default=512,
                   help="truncate the text to this many tokens (default 512)")
    p.add_argument("--matrix-tokens", type=_int_at_least(0), default=64,
                   help="attention matrices in the report cover this many tokens (default 64; 0: none)")
    p.add_argument("--matrix-start", type=_int_at_least(0), default=0,
                   help="first token of the matrix window (default 0)")
    p.add_argument("--no-importance", action="store_true", help="skip head importance and pruning curves")
    p.add_argument("--no-retrieval", action="store_true", help="skip retrieval-head detection (causal LMs)")
    p.add_argument("--no-streaming", action="store_true", help="skip the StreamingLLM perplexities (causal LMs)")
    p.add_argument("--retrieval-trials", type=_int_at_least(1), default=3,
                   help="passkey prompts for the retrieval score (default 3)")
    p.add_argument("--retrieval-tokens", type=_int_at_least(64), default=256,
                   help="length of each passkey prompt in tokens (default 256)")
    p.add_argument("--window", type=_int_at_least(1), default=32,
                   help="StreamingLLM window in tokens (default 32)")
    p.add_argument("--sinks", type=_int_at_least(1), default=4, help="StreamingLLM sink tokens (default 4)")
    p.add_argument("--importance-tokens", type=_int_at_least(2), default=256,
                   help="head importance and pruning use the first this many tokens of the text (causal LMs; "
                        "encoders: the first 16 sentences) (default 256)")
    p.add_argument("--pruning-points", type=_int_at_least(2), default=6,
                   help="points of the pruning curves: 0, 1/N, ..., (N-1)/N of the heads removed (default 6)")
    p.add_argument("--pruning-orders", type=_int_at_least(1), default=2,
                   help="random pruning orders averaged for the baseline curve (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of passkeys, probes and random orders (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
class _Steps:
    """A rich progress display with one line per step (or nothing when quiet)."""

    def __init__(self, quiet: bool):
        self.progress = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(file=sys.stderr), transient=False)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    @contextmanager
    def step(self, description: str, total: int = 1):
        """Yields ``update(done, total)``; the step is shown complete on exit."""
        if self.progress is None:
            yield lambda done, total=None: None
            return
        task = self.progress.add_task(description, total=total)
        last = {"total": total}

        def update(done, total_=None):
            if total_ is not None:
                last["total"] = total_
            self.progress.update(task, completed=done, total=last["total"])

        try:
            yield update
        finally:
            self.progress.update(task, completed=last["total"])


# ---------------------------------------------------------------------------------------------
# Collecting the report data
# ---------------------------------------------------------------------------------------------
METRIC_DOCS = {
    "entropy": ("Entropy", "attention", "-sum_j w_ij log w_ij / log n_i over the n_i visible keys, mean over queries "
                "(1: uniform, 0: one key)"),
    "prev_token": ("Previous-token score", "attention", "w_{i,i-1}, mean over queries"),
    "self_token": ("Self score", "attention", "w_{i,i}, mean over queries"),
    "next_token": ("Next-token score", "attention", "w_{i,i+1}, mean over queries (0 in a causal model)"),
    "distance": ("Attention distance", "attention", "sum_j w_ij |i - j|, mean over queries (tokens)"),
    "special": ("Attention to special tokens", "attention", "sum over special-token keys ([CLS], <s>, ...) of w_ij, "
                "mean over queries"),
    "punctuation": ("Attention to punctuation", "attention", "sum over punctuation keys of w_ij, mean over queries"),
    "sink0": ("Received by token 0", "sinks", "mean attention key 0 receives over the queries that see it; > 0.3 "
              "makes it a sink for the head"),
    "received_max": ("Max received by one key", "sinks", "max over keys j of the mean attention key j receives"),
    "waad": ("WAAD", "attention", "sum_j w_ij min(|i - j|, 10), mean over queries (Attention Illuminates LLM "
             "Reasoning, Def. 4.1)"),
}


def _display_tokens(tokenizer, ids: Sequence[int]) -> List[str]:
    """Each token decoded on its own; newlines / tabs escaped, a blank token shown as ␣ (an empty one as ∅)."""
    out = []
    for t in ids:
        s = tokenizer.decode([int(t)]).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        out.append(s if s.strip() else (s.replace(" ", "␣") or "∅"))
    return out


def _matrix_hook(store: dict, start: int, size: int):
    """A hook keeping, per layer, queries/keys [start, start+size) of batch item 0, plus the row mass outside."""

    def hook(site, w):
        Lq, Lk = w.shape[2], w.shape[3]
        if Lq != Lk:
            return None
        end = min(start + size, Lk)
        rows = w[0, :, start:end].detach().float()                  # (H, n, Lk)
        inside = rows[..., start:end]
        outside = (rows.sum(-1) - inside.sum(-1)).clamp_min(0.0)     # (H, n)
        store[site.layer] = torch.cat([inside, outside.unsqueeze(-1)], dim=-1).cpu()
        return None

    return hook


def _is_causal(model) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(callable(can) and can())


def _skip(reason: str) -> dict:
    return {"skipped": reason}


def collect(model, tokenizer, text: str, *, model_path: str = "", layers: Optional[Sequence[int]] = None,
            heads: Optional[Sequence[int]] = None, max_tokens: int = 512, matrix_tokens: int = 64,
            matrix_start: int = 0, importance: bool = True, retrieval: bool = True, streaming: bool = True,
            retrieval_trials: int = 3, retrieval_tokens: int = 256, window: int = 32, sinks: int = 4,
            importance_tokens: int = 256, pruning_points: int = 6, pruning_orders: int = 2, seed: int = 0,
            steps: Optional[_Steps] = None) -> dict:
    """Run every analysis on ``text`` and return the report data (see :mod:`attnlab.inspect.report`)."""
    from .capture import capture
    from .hooks import attention_hooks, attention_modules

    if not isinstance(text, str) or not text.strip():
        raise ValueError("inspect: the text is empty")
    steps = steps or _Steps(quiet=True)
    n_layers = len(attention_modules(model))
    cfg = model.config
    n_heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    if layers is not None and max(layers) >= n_layers:
        raise ValueError(f"--layers: layer {max(layers)} does not exist; the model has {n_layers} layers "
                         f"(0-{n_layers - 1})")
    if heads is not None and n_heads and max(heads) >= n_heads:
        raise ValueError(f"--heads: head {max(heads)} does not exist; the model has {n_heads} heads "
                         f"(0-{n_heads - 1})")
    enc = tokenizer(text, return_tensors="pt")
    full_len = enc["input_ids"].shape[1]
    enc = {k: v[:, :max_tokens] for k, v in enc.items()}
    ids = enc["input_ids"]
    n_tok = ids.shape[1]
    if matrix_tokens and matrix_start >= n_tok:
        raise ValueError(f"--matrix-start {matrix_start} is past the end of the text ({n_tok} tokens)")
    causal = _is_causal(model)
    timings = {}

    # -- capture -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    windows: dict = {}
    with steps.step("capture attention metrics") as _:
        hooks = [_matrix_hook(windows, matrix_start, matrix_tokens)] if matrix_tokens else []
        with attention_hooks(model, *hooks, layers=layers):
            cap = capture(model, enc, tokenizer=tokenizer, layers=layers, heads=heads, hidden_states=True)
    timings["capture_s"] = time.perf_counter() - t0
    L_idx, H_idx = cap.layers, cap.heads
    tokens = _display_tokens(tokenizer, ids[0].tolist())

    def grid(full: torch.Tensor) -> torch.Tensor:  # (all layers, all heads) -> captured subset
        return full[L_idx][:, H_idx]

    metrics = []

    def add(name, values, label=None, group=None, doc=None):
        lab, grp, dd = METRIC_DOCS.get(name, (name, "other", ""))
        metrics.append({"name": name, "label": label or lab, "group": group or grp, "doc": doc or dd,
                        "values": values})

    for name in ("entropy", "prev_token", "self_token", "next_token", "distance", "special", "punctuation"):
        if name == "next_token" and causal:
            continue  # identically 0
        add(name, cap.head_metrics[name])
    received = cap.position_metrics["received"]                      # (nL, nH, L)
    add("sink0", received[..., 0])
    add("received_max", torch.nan_to_num(received, nan=-1.0).amax(-1))
    add("waad", cap.position_metrics["waad"].nanmean(-1))

    eps = 0.3
    r = torch.nan_to_num(received, nan=0.0)
    share = (r > eps).float().mean(dim=(0, 1))                        # (L,)
    mean_r, max_r = received.nanmean(dim=(0, 1)), r.amax(dim=(0, 1))
    order = sorted(range(n_tok), key=lambda j: (-float(share[j]), -float(torch.nan_to_num(mean_r[j]))))[:12]
    sink_block = {"eps": eps, "position": 0, "rate": cap.sink_rate(0, eps),
                  "rows": [{"position": j, "token": tokens[j], "rate": float(share[j]), "mean": float(mean_r[j]),
                            "max": float(max_r[j])} for j in order]}

    matrices = None
    if matrix_tokens:
        stack = torch.stack([windows[l][H_idx] for l in L_idx]).numpy()   # (nL, nH, n, n + 1)
        from .report import encode_matrices

        matrices = encode_matrices(stack, matrix_start)
        matrices["tokens"] = tokens[matrix_start:matrix_start + stack.shape[2]]

    # -- retrieval -------------------------------------------------------------------------------
    if not retrieval:
        retr = _skip("--no-retrieval")
    elif not causal:
        retr = _skip(f"{type(model).__name__} is not a causal LM; retrieval heads are found while it generates")
    else:
        from .retrieval import retrieval_scores

        t0 = time.perf_counter()
        with steps.step("retrieval heads (passkey trials)", total=retrieval_trials) as upd:
            res = retrieval_scores(model, tokenizer, trials=retrieval_trials, context_tokens=retrieval_tokens,
                                   seed=seed, progress=upd)
        timings["retrieval_s"] = time.perf_counter() - t0
        retr = res.as_dict()
        add("retrieval", grid(res.scores), "Retrieval score", "retrieval",
            "Wu et al.: share of the needle a head copies with its top-1 attention while the answer is generated; "
            "> 0.1: retrieval head")

    # -- streaming -------------------------------------------------------------------------------
    if not streaming:
        stream = _skip("--no-streaming")
    elif not causal:
        stream = _skip(f"{type(model).__name__} is not a causal LM (perplexity needs next-token prediction)")
    elif n_tok <= window + sinks:
        stream = _skip(f"the text has {n_tok} tokens; it must be longer than window + sinks = {window + sinks}")
    else:
        from .streaming import streaming_eval

        t0 = time.perf_counter()
        with steps.step("StreamingLLM perplexities", total=1):
            stream = streaming_eval(model, ids, window=window, sinks=sinks).as_dict()
        timings["streaming_s"] = time.perf_counter() - t0

    # -- importance ------------------------------------------------------------------------------
    if not importance:
        imp_block, prune_block = _skip("--no-importance"), _skip("--no-importance")
    else:
        from . import importance as I

        try:
            objective = I.objective_for(model, tokenizer, text,
                                        **({"max_tokens": min(max_tokens, importance_tokens)} if causal else
                                           {"seed": seed, "max_sentences": 16}))
        except ValueError as exc:
            objective = None
            imp_block = prune_block = _skip(str(exc))
        if objective is not None:
            t0 = time.perf_counter()
            with steps.step("head importance", total=len(objective.batches)) as upd:
                hi = I.head_importance(model, objective.batches, objective.loss_fn, progress=upd)
            imp_block = dict(hi.as_dict(), loss_name=objective.description)
            add("importance", grid(hi.normalized), "Head importance (normalized)", "importance",
                "Michel et al.: E|dL/dxi| of a gate on the head, divided by the l2 norm of its layer")
            add("importance_raw", grid(hi.raw), "Head importance (raw)", "importance", "E|dL/dxi|")
            fractions = [i / pruning_points for i in range(pruning_points)]
            with steps.step("pruning curves", total=pruning_points * (1 + pruning_orders)) as upd:
                pc = I.pruning_curves(model, hi.normalized, objective.batches, objective.curve_fn,
                                      fractions=fractions, random_orders=pruning_orders, seed=seed, progress=upd)
            prune_block = dict(pc.as_dict(), loss_name=objective.description)
            timings["importance_s"] = time.perf_counter() - t0

    from .. import __version__

    return {
        "schema": 1,
        "title": f"attnlab inspect: {type(model).__name__}"
                 + (f" ({'/'.join(Path(model_path).parts[-2:])})" if model_path else ""),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "attnlab": __version__,
        "model": {"path": str(model_path), "type": type(model).__name__, "layers": n_layers, "heads": n_heads,
                  "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or n_heads), "causal": causal},
        "input": {"tokens": tokens, "n_tokens": n_tok, "truncated_from": full_len if full_len > n_tok else None},
        "layers": L_idx, "heads": H_idx,
        "metrics": [dict(m, values=m["values"].tolist()) for m in metrics],
        "position_metrics": {k: v.tolist() for k, v in cap.position_metrics.items()},
        "massive_activations": (cap.massive or [])[:50],
        "sinks": sink_block,
        "matrices": matrices,
        "retrieval": retr,
        "importance": imp_block,
        "pruning": prune_block,
        "streaming": stream,
        "timings": timings,
    }


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------
def _read_text(args) -> str:
    if args.text is not None:
        return args.text
    path = Path(args.file).expanduser()
    if not path.is_file():
        raise ValueError(f"--file {str(path)!r} does not exist or is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def run(args) -> int:
    """``attnlab inspect``: returns the exit status (0); user errors raise ValueError / TypeError."""
    from .models import load_model
    from .report import write_report

    path = Path(args.model_dir).expanduser()
    if not path.exists():
        raise ValueError(f"MODEL_DIR {str(path)!r} does not exist; give a model directory (config.json + "
                         f"*.safetensors) or a .gguf file")
    text = _read_text(args)
    if not text.strip():
        raise ValueError("the text to inspect is empty" + (f" (--file {args.file!r})" if args.file else ""))
    out_dir = Path(args.out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} exists and is not a directory")
    t0 = time.perf_counter()
    with _Steps(args.quiet) as steps:
        with steps.step(f"load {path.name}"):
            try:
                model, tokenizer = load_model(path)
            except FileNotFoundError as exc:
                raise ValueError(str(exc)) from None
        data = collect(model, tokenizer, text, model_path=str(path), layers=args.layers, heads=args.heads,
                       max_tokens=args.max_tokens, matrix_tokens=args.matrix_tokens, matrix_start=args.matrix_start,
                       importance=not args.no_importance, retrieval=not args.no_retrieval,
                       streaming=not args.no_streaming, retrieval_trials=args.retrieval_trials,
                       retrieval_tokens=args.retrieval_tokens, window=args.window, sinks=args.sinks,
                       importance_tokens=args.importance_tokens, pruning_points=args.pruning_points,
                       pruning_orders=args.pruning_orders, seed=args.seed, steps=steps)
        data["timings"]["total_s"] = time.perf_counter() - t0
        with steps.step("write report"):
            html_path, json_path = write_report(data, out_dir)
    print(f"report: {html_path}")
    print(f"data:   {json_path}")
    return 0
