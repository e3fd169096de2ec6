"""Gate pictures (paper Figure 7): which tokens make Engram's gate open.

`gate_values(model, tokenizer, text)` runs the model with a capture hook and returns the
tokens and the gate of every Engram layer and branch. `gates_html` colours each token by
its gate (white 0 -> red 1), one row per layer and branch; `gates_png` draws the same as a
heat map.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from engram_lm.analysis.capture import capture
from engram_lm.plotting import saved_figure


@torch.no_grad()
def gate_values(model, tokenizer, text: str) -> tuple[list[str], dict[str, list[float]]]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise ValueError("the text has no tokens")
    tokens = [tokenizer.decode([i]) for i in ids]
    with capture(model) as cap:
        model(torch.tensor([ids], device=model.head.weight.device))
    if not cap.gates:
        raise ValueError("this model has no gated Engram layer")
    rows = {}
    for layer, gate_BTM in cap.gates.items():
        for m in range(gate_BTM.shape[-1]):
            rows[f"layer {layer} branch {m}"] = gate_BTM[0, :, m].float().tolist()
    return tokens, rows


def gates_html(tokens: list[str], rows: dict[str, list[float]], title: str) -> str:
    lines = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>",
             "<body style='font-family: sans-serif'>", f"<h3>{html.escape(title)}</h3>"]  # fmt: skip
    for name, values in rows.items():
        spans = []
        for tok, g in zip(tokens, values):
            shade = int(255 * (1 - g))
            spans.append(f"<span title='{g:.3f}' style='background: rgb(255,{shade},{shade}); "
                         f"white-space: pre'>{html.escape(tok)}</span>")  # fmt: skip
        lines.append(f"<p><b>{html.escape(name)}</b><br>{''.join(spans)}</p>")
    lines.append("<p>colour: gate value, white = 0, red = 1 (hover for the number)</p></body></html>")
    return "\n".join(lines)


def gates_png(tokens: list[str], rows: dict[str, list[float]], path: Path) -> None:
    data = torch.tensor(list(rows.values()))
    with saved_figure(path, (max(6, 0.45 * len(tokens)), 0.6 * len(rows) + 1.5)) as (fig, ax):
        im = ax.imshow(data.numpy(), cmap="Reds", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(tokens)), [t.replace("\n", "\\n") for t in tokens], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
        fig.colorbar(im, ax=ax, label="gate")
