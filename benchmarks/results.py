"""Appending benchmark rows to RESULTS.md: one table per benchmark, under a `## <name>` heading."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADER = "| case | ours | peer | peer name | ratio | device | date |\n| --- | --- | --- | --- | --- | --- | --- |\n"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def row(case: str, ours: str, peer: str, peer_name: str, ratio: float | None, device: str | None = None) -> str:
    """One table row; ratio None where the peer has no number (it failed, e.g. out of memory); device: the machine
    that measured it (default this one's GPU)."""
    cell = "—" if ratio is None else f"{ratio:.2f}"
    device = device or device_name()
    return f"| {case} | {ours} | {peer} | {peer_name} | {cell} | {device} | {datetime.date.today()} |\n"


def add_run_args(parser, cpu_help: str, profile_help: str) -> None:
    """--device / --tiny (a CPU dry run of the script) / --results / --profile, shared by the model benchmarks."""
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=cpu_help)
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a dry run of the script)")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"RESULTS.md to append to (default {RESULTS.name}; a --tiny run appends only here)")
    parser.add_argument("--profile", action="store_true", help=profile_help)


def append_rows(name: str, rows: list[str], note: str = "", path: Path = RESULTS) -> None:
    """Add rows under `## name` (creating the section with its note and header if missing)."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n\nWritten by benchmarks/*.py.\n"
    heading = f"## {name}\n"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n" + (note.strip() + "\n\n" if note else "") + HEADER
        text += "".join(rows)
    else:
        start = text.index(heading)
        nxt = text.find("\n## ", start + len(heading))
        end = len(text) if nxt < 0 else nxt + 1
        section = text[start:end].rstrip("\n") + "\n" + "".join(rows)
        text = text[:start] + section + ("\n" + text[end:] if nxt >= 0 else "")
    path.write_text(text)
