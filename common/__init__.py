"""Shared pieces of the four scripts. See the README for what lives where."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import inspect
import json
import math
import os
import re
import typing
from xml.sax.saxutils import escape

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


RESUMABLE = ("steps", "out_dir", "resume", "threads", "eval_every", "audio_every", "n_audio")


def changed_flags(saved: dict, a) -> list[str]:
    """The flags of `a` that differ from those its run was started with (`saved`, its Args as a
    dict), apart from RESUMABLE ones (more steps, bookkeeping): resuming with any other would
    not continue that run."""
    return [f"--{k} {v!r} -> {getattr(a, k)!r}" for k, v in saved.items()
            if k not in RESUMABLE and hasattr(a, k) and getattr(a, k) != v]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (the avx512_bf16 flag; AMX CPUs have
    it too). Without it bf16 autocast is emulated and far slower than fp32: 10x for a
    [4096, 256] x [256, 1024] matmul on an AVX2-only AMD EPYC. Linux only; False elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in fh)
    except OSError:
        return False


def peak_mem_mb(device: str) -> float:
    """Peak memory of this process so far: CUDA allocations, or on CPU the peak RSS."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_curves(path: str, panels: list[tuple[str, str, list, list]]) -> None:
    """One SVG (any browser opens it; no plotting library needed), a panel per (title,
    y label, steps, values): the line, its points, and the first/last step and min/max value
    on the axes. Written atomically."""
    w, h, m = 320, 240, 48  # panel size and margin, px
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(panels)}" height="{h}" '
           'font-family="sans-serif" font-size="11">']
    for i, (title, ylabel, xs, ys) in enumerate(panels):
        x0 = i * w
        out.append(f'<text x="{x0 + w / 2}" y="16" text-anchor="middle" font-size="13">'
                   f'{escape(title)}</text>')
        out.append(f'<text x="{x0 + 12}" y="{h / 2}" transform="rotate(-90 {x0 + 12} {h / 2})" '
                   f'text-anchor="middle">{escape(ylabel)}</text>')
        out.append(f'<rect x="{x0 + m}" y="{m / 2}" width="{w - 1.5 * m}" height="{h - 1.5 * m}" '
                   'fill="none" stroke="#999"/>')
        pts = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(float(y))]
        if not pts:
            continue
        lo_x, hi_x = min(p[0] for p in pts), max(p[0] for p in pts)
        lo_y, hi_y = min(p[1] for p in pts), max(p[1] for p in pts)
        sx = (w - 1.5 * m) / ((hi_x - lo_x) or 1.0)
        sy = (h - 1.5 * m) / ((hi_y - lo_y) or 1.0)
        xy = [(x0 + m + (x - lo_x) * sx, h - m + (lo_y - y) * sy) for x, y in pts]
        out.append('<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="'
                   + " ".join(f"{a:.1f},{b:.1f}" for a, b in xy) + '"/>')
        if len(xy) < 30:
            out.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="#1f77b4"/>' for a, b in xy)
        for v, y in ((hi_y, m / 2 + 4), (lo_y, h - m)):  # value range on the y axis
            out.append(f'<text x="{x0 + m - 3}" y="{y}" text-anchor="end">{v:.4g}</text>')
        for v, x, anchor in ((lo_x, x0 + m, "start"), (hi_x, x0 + w - m / 2, "end")):  # step range
            out.append(f'<text x="{x}" y="{h - m + 14}" text-anchor="{anchor}">{v:g}</text>')
        out.append(f'<text x="{x0 + m + (w - 1.5 * m) / 2}" y="{h - m + 28}" '
                   'text-anchor="middle">step</text>')
    out.append("</svg>")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(out) + "\n")
    os.replace(path + ".tmp", path)


def stamp(path: str) -> list:
    """(name, size, mtime) of a file, or of every file in a folder (a checkpoint): a cheap
    identity for cache keys that changes whenever the file is rewritten."""
    files = sorted(os.listdir(path)) if os.path.isdir(path) else [""]
    out = []
    for name in files:
        st = os.stat(os.path.join(path, name) if name else path)
        out.append([os.path.abspath(path), name, st.st_size, st.st_mtime_ns])
    return out


@contextlib.contextmanager
def cache_lock(path: str):
    """Hold an exclusive lock (`path`.lock) while the cached artefact at `path` is built, so
    that runs started side by side on a cold cache build it once: the others wait here, then
    find it built. The lock is the kernel's (flock): a crashed builder leaves no stale lock."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that is building {path}", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
