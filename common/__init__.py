"""Shared pieces of the four scripts. See the README for what lives where."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import typing

_FIELD = re.compile(r"^\s+(\w+)\s*:")


def _field_docs(cls) -> dict[str, str]:
    """CleanRL-style docs: the string literal on the line after each field."""
    src = inspect.getsource(cls).splitlines()
    docs = {}
    for line, nxt in zip(src, src[1:], strict=False):
        m = _FIELD.match(line)
        if m and nxt.strip().startswith('"""'):
            docs[m.group(1)] = nxt.strip().strip('"').strip()
    return docs


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {s!r}")


def parse_args(cls, argv: list[str] | None = None):
    """Command-line flags from an Args dataclass, its field docstrings as help.
    list fields repeat (--test_data a --test_data b); bool fields take true/false, and a
    bare bool flag (--eval_only) means true."""
    hints, docs = typing.get_type_hints(cls), _field_docs(cls)
    p = argparse.ArgumentParser(description=(cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        targs = [a for a in typing.get_args(t) if a is not type(None)]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict = {"default": default, "help": f"{docs.get(f.name, '')} (default: {default})"}
        if typing.get_origin(t) is list:
            kw.update(action="append", type=targs[0], default=None)
        elif t is bool:
            kw.update(type=_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kw["type"] = targs[0] if targs else t
        p.add_argument(f"--{f.name}", **kw)
    ns = vars(p.parse_args(argv))
    for f in dataclasses.fields(cls):  # an unused repeatable flag keeps its default
        if ns[f.name] is None and typing.get_origin(hints[f.name]) is list:
            ns[f.name] = f.default_factory()
    return cls(**ns)


def peak_mem_mb(device: str) -> float:
    """Peak memory of this process so far: CUDA allocations, or on CPU the peak RSS."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_curves(path: str, panels: list[tuple[str, str, list, list]]) -> None:
    """One PNG, a panel per (title, y label, steps, values). matplotlib is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    fig, ax = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.5), squeeze=False)
    for axis, (title, ylabel, xs, ys) in zip(ax[0], panels, strict=True):
        axis.plot(xs, ys, marker="o" if len(xs) < 30 else None)
        axis.set(xlabel="step", ylabel=ylabel, title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stamp(path: str) -> list:
    """(name, size, mtime) of a file, or of every file in a folder (a checkpoint): a cheap
    identity for cache keys that changes whenever the file is rewritten."""
    files = sorted(os.listdir(path)) if os.path.isdir(path) else [""]
    out = []
    for name in files:
        st = os.stat(os.path.join(path, name) if name else path)
        out.append([os.path.abspath(path), name, st.st_size, st.st_mtime_ns])
    return out


def cached_json(path: str, compute) -> dict:
    """compute()'s JSON result, read from `path` if it is there, else computed and written
    atomically."""
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    out = compute()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # runs side by side may compute the same figures
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, path)
    return out
