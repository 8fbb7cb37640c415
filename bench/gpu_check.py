#!/usr/bin/env python
"""The Python side of ``bench/gpu_check.sh``: its header, each part's JSON record and the closing summary.

``gpu_check.sh`` runs the three benchmark parts one after another (side by side with ``--dry-run``), each under its
own ``timeout``; this file
prints the header (installed versions, the device, a bf16 matmul probe: the hardware limit), turns each part's exit
status, log and the JSON its script wrote into ``<out>/<n>-<name>.json`` the moment the part ends, keeps
``<out>/summary.json`` up to date after every part, and prints the one-line-per-part summary table at the end.

Only the header imports torch: ``record`` and ``summary`` use the standard library alone, so they cost nothing
between the parts.

Usage (what gpu_check.sh calls)::

    python bench/gpu_check.py header --device cuda --size 8192 --out-dir OUT
    python bench/gpu_check.py record --out-dir OUT --part 1 --name qlora-7b --rc 0 --start EPOCH --limit 280 \\
        --raw WORK/1-qlora-7b.raw.json --log OUT/1-qlora-7b.log --command "..." [--stacks anchor,ours]
    python bench/gpu_check.py record --out-dir OUT --part 2 --name packing --skipped "bench/packing.py missing"
    python bench/gpu_check.py summary --out-dir OUT --start EPOCH
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

LOG_TAIL_CHARS = 3000
"""How much of a failed part's log its JSON record keeps (the whole log is beside it)."""
STACK_ROWS = {
    "anchor": "anchor (HF+peft+bnb)",
    "ours": "ours (lightning_qlora)",
    "ours-compiled": "ours + compile_blocks",
}
"""qlora_vs_hf.py's ``--stacks`` names and the ``stack`` labels of its rows."""
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "lightning")


def _write(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer: --dry-run records parts side by side
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (a part killed while writing it)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def installed_versions() -> dict[str, str]:
    """Python and the installed versions of torch, transformers, peft, bitsandbytes, lightning, lightning_qlora.

    Read from the packages' metadata, in ``sys.path`` order (so wheels put first on ``PYTHONPATH`` win), without
    importing them: each part prints the versions it really imported in its own header.
    """
    import platform

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    init = Path(__file__).resolve().parents[1] / "lightning_qlora" / "__init__.py"
    try:
        line = next(x for x in init.read_text().splitlines() if x.startswith("__version__"))
        out["lightning_qlora"] = line.split("=", 1)[1].strip().strip("\"'")
    except (OSError, StopIteration):
        out["lightning_qlora"] = "unknown"
    return out


def matmul_tflops(device: str, size: int, warmup: int = 3, iters: int = 10) -> float:
    """Dense bf16 matrix-product rate: the mean of ``iters`` timed ``size``³ products after ``warmup`` ones.

    Args:
        device: ``cuda`` or ``cpu``.
        size: the side of the square matrices (8192 on a GPU).
        warmup: untimed products first (clocks up, cuBLAS picks its kernel).
        iters: timed products.

    Returns:
        TFLOP/s, counting ``2·size³`` FLOPs a product.
    """
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16, generator=gen)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * size**3 * iters / (time.perf_counter() - start) / 1e12


def _tflops(value: float) -> str:
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def header(device: str, size: int, out_dir: Path) -> dict[str, Any]:
    """Print the versions, the device and the matmul probe; start ``<out_dir>/summary.json`` with them.

    Args:
        device: ``cuda`` or ``cpu``.
        size: matmul side for the probe.
        out_dir: the output folder.
    """
    import torch

    info = installed_versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device is visible to torch (use --dry-run on a CPU machine)")
        props = torch.cuda.get_device_properties(0)
        name = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        name = f"CPU, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}"
    print(f"device: {name}", flush=True)
    tflops = matmul_tflops(device, size)
    print(
        f"the hardware limit: bf16 matmul {size}^3 at {_tflops(tflops)} TFLOP/s (mean of 10 after 3 warmups)",
        flush=True,
    )
    payload = {"versions": info, "device": name, "matmul": {"size": size, "tflops": tflops}}
    write_summary(out_dir, payload)
    return payload


# --------------------------------------------------------------------------- one part's record
def _tok_s_of(rows: list[dict[str, Any]], label: str) -> float | None:
    row = next((r for r in rows if r.get("stack") == label), None)
    return row.get("tok_s") if row else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den and math.isfinite(num) and math.isfinite(den) else None


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def key_qlora(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Part 1: tok/s ours/anchor and ours-compiled/anchor (from tok/s, so a cut-off run's rows serve too)."""
    rows = result.get("rows") or []
    anchor, ours, compiled = (_tok_s_of(rows, STACK_ROWS[s]) for s in ("anchor", "ours", "ours-compiled"))
    numbers = {
        "anchor_tok_s": anchor,
        "ours_tok_s": ours,
        "compiled_tok_s": compiled,
        "ours_over_anchor": _ratio(ours, anchor),
        "compiled_over_anchor": _ratio(compiled, anchor),
    }
    text = f"ours/anchor {_x(numbers['ours_over_anchor'])}, compiled/anchor {_x(numbers['compiled_over_anchor'])}"
    if anchor:
        text += f" (anchor {anchor:,.0f} tok/s)"
    return text, numbers


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def key_packing(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Part 2: packed/padded trained tokens/s, and packed/TRL where TRL's padding-free trainer ran.

    bench/packing.py's ``packed_over_padded``, with the fastest ``results`` entry of ``ours packed`` and of ``ours
    padded`` (``trained_tok_s``) beside it; the ratio of those two where ``packed_over_padded`` is missing.
    """
    best: dict[str, float] = {}
    for row in result.get("results") or []:
        rate = _number(row.get("trained_tok_s")) if isinstance(row, dict) else None
        if rate is not None:
            best[str(row.get("stack"))] = max(best.get(str(row.get("stack")), 0.0), rate)
    packed, padded = best.get("ours packed"), best.get("ours padded")
    trl = best.get("TRL SFTTrainer padding_free")
    ratio = _number(result.get("packed_over_padded"))
    ratio = ratio if ratio is not None else _ratio(packed, padded)
    text = f"packed/padded {_x(ratio)}"
    if packed and padded:
        text += f" ({packed:,.0f} vs {padded:,.0f} trained tok/s)"
    over_trl = _ratio(packed, trl)
    if over_trl is not None:
        text += f", packed/TRL padding_free {_x(over_trl)} ({trl:,.0f} trained tok/s)"
    numbers = {"packed_over_padded": ratio, "packed_trained_tok_s": packed, "padded_trained_tok_s": padded,
               "packed_over_trl": over_trl, "trl_trained_tok_s": trl}  # fmt: skip
    return text, numbers


def key_70b(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Part 3: the peak against the target, PASS/FAIL, and tok/s."""
    peak, target, verdict = result.get("peak_gib"), result.get("target_gib"), result.get("verdict")
    numbers = {"peak_gib": peak, "target_gib": target, "verdict": verdict, "tok_s": result.get("tok_s"),
               "predicted_peak_gib": result.get("predicted_peak_gib")}  # fmt: skip
    if peak is None:
        return "n/a", numbers
    size = f"{peak:.2f} GiB" if peak >= 0.1 else f"{peak * 1024:.1f} MiB"
    text = f"peak {size} (target {target:g} GiB): {verdict}"
    if result.get("tok_s"):
        text += f", {result['tok_s']:,.0f} tok/s"
    return text, numbers


KEYS = {"qlora-7b": key_qlora, "packing": key_packing, "70b-step": key_70b}
"""Which key numbers each part's record carries, by part name."""


def record(
    out_dir: Path,
    part: int,
    name: str,
    rc: int | None = None,
    start: float | None = None,
    limit: float | None = None,
    raw: Path | None = None,
    log: Path | None = None,
    command: str = "",
    stacks: str = "",
    skipped: str | None = None,
) -> dict[str, Any]:
    """Write ``<out_dir>/<part>-<name>.json`` for a part that just ended, then refresh ``summary.json``.

    Args:
        out_dir: the output folder.
        part: the part's number (1, 2, 3).
        name: the part's name (``qlora-7b``, ``packing``, ``70b-step``).
        rc: the exit status of ``timeout <limit> <command>`` (124, or 137 after the kill, when it ran out of time).
        start: the part's start (seconds since the epoch).
        limit: the part's timeout in seconds.
        raw: the JSON file the part's script wrote (its ``--json``).
        log: the part's full log.
        command: the command line.
        stacks: part 1: the stacks asked for; a missing row makes the status ``partial``.
        skipped: why the part did not run (status ``skipped``).

    Returns:
        The record: ``part``, ``name``, ``status`` (``ok``, ``partial``, ``failed``, ``timeout`` or ``skipped``),
        ``rc``, ``seconds``, ``limit_s``, ``command``, ``log``, ``key`` (the summary's text) and ``numbers``,
        ``result`` (the script's JSON, also a cut-off run's rows so far), ``log_tail`` unless ``ok``.
    """
    seconds = round(time.time() - start, 1) if start else 0.0
    result = _read(raw) if raw else None
    if skipped is not None:
        status = "skipped"
    elif rc in (124, 137) and limit and seconds >= limit:
        status = "timeout"
    elif rc != 0 or result is None:
        status = "failed"
    else:
        status = "ok"
    note = None
    if status == "ok" and stacks:
        rows = result.get("rows") or []
        missing = [s for s in stacks.split(",") if s and _tok_s_of(rows, STACK_ROWS.get(s, s)) is None]
        if missing:
            status, note = "partial", f"no row for {', '.join(missing)} (see the log)"
    key, numbers = KEYS[name](result) if result else ("n/a", {})
    payload: dict[str, Any] = {
        "part": part, "name": name, "status": status, "rc": rc, "seconds": seconds, "limit_s": limit,
        "command": command, "log": log.name if log else None, "key": key, "numbers": numbers,
    }  # fmt: skip
    if note:
        payload["note"] = note
    if skipped is not None:
        payload["reason"] = skipped
    if status != "ok" and log is not None and log.is_file():
        payload["log_tail"] = log.read_text(errors="replace")[-LOG_TAIL_CHARS:]
    payload["result"] = result
    _write(out_dir / f"{part}-{name}.json", payload)
    write_summary(out_dir)
    print(f"--- part {part} {name}: {status} in {seconds:.0f} s: {key}", flush=True)
    return payload


# --------------------------------------------------------------------------- the summary
def write_summary(
    out_dir: Path, header_info: dict[str, Any] | None = None, total_s: float | None = None
) -> dict[str, Any]:
    """Rewrite ``<out_dir>/summary.json``: the header (the last one written unless given) and every part so far."""
    path = out_dir / "summary.json"
    head = header_info if header_info is not None else (_read(path) or {}).get("header")
    keys = ("part", "name", "status", "rc", "seconds", "limit_s", "key", "numbers")
    parts = [{k: rec.get(k) for k in keys} for rec in map(_read, sorted(out_dir.glob("[0-9]-*.json"))) if rec]
    payload = {"header": head, "parts": parts, "total_s": total_s, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write(path, payload)
    return payload


def summary(out_dir: Path, total_s: float | None = None) -> bool:
    """Print the summary table (one line per part, then the hardware limit) and rewrite ``summary.json``.

    Returns:
        Whether every part ended ``ok`` or ``skipped``.
    """
    payload = write_summary(out_dir, total_s=total_s)
    lines = ["| part | status | seconds | key number |", "|---|---|---|---|"]
    for p in payload["parts"]:
        lines.append(f"| {p['part']} {p['name']} | {p['status']} | {p['seconds']:.0f} | {p['key']} |")
    matmul = (payload["header"] or {}).get("matmul")
    if matmul:
        lines.append(f"hardware limit: bf16 matmul {matmul['size']}^3 at {_tflops(matmul['tflops'])} TFLOP/s")
    if total_s is not None:
        lines.append(f"total: {total_s:.0f} s")
    print("\n".join(["summary:", *lines]), flush=True)
    return all(p["status"] in ("ok", "skipped") for p in payload["parts"])


def main(argv: list[str] | None = None) -> None:
    """Command line: ``header``, ``record`` or ``summary`` (see the module docstring); ``summary`` exits 1 unless
    every part is ``ok`` or ``skipped``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("header")
    h.add_argument("--device", choices=["cuda", "cpu"], required=True)
    h.add_argument("--size", type=int, default=8192)
    h.add_argument("--out-dir", type=Path, required=True)
    r = sub.add_parser("record")
    r.add_argument("--out-dir", type=Path, required=True)
    r.add_argument("--part", type=int, required=True)
    r.add_argument("--name", choices=sorted(KEYS), required=True)
    r.add_argument("--rc", type=int)
    r.add_argument("--start", type=float)
    r.add_argument("--limit", type=float)
    r.add_argument("--raw", type=Path)
    r.add_argument("--log", type=Path)
    r.add_argument("--command", default="")
    r.add_argument("--stacks", default="")
    r.add_argument("--skipped")
    s = sub.add_parser("summary")
    s.add_argument("--out-dir", type=Path, required=True)
    s.add_argument("--start", type=float)
    args = parser.parse_args(argv)
    if args.cmd == "header":
        header(args.device, args.size, args.out_dir)
    elif args.cmd == "record":
        record(args.out_dir, args.part, args.name, args.rc, args.start, args.limit, args.raw, args.log, args.command,
               args.stacks, args.skipped)  # fmt: skip
    elif not summary(args.out_dir, time.time() - args.start if args.start else None):
        raise SystemExit(1)  # gpu_check.sh exits 1 when a part failed, timed out or is partial


if __name__ == "__main__":
    main()
