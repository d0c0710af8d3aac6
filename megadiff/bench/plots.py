"""PNG plots of `megadiff bench`: throughput (projected samples/s per GPU; measured objective
iteration times) and loss curves from runs' loss_logs/*.jsonl. matplotlib (Agg backend) when
it is installed; otherwise plain PIL drawings of the same data (matplotlib is not a
dependency of megadiff)."""
from __future__ import annotations

import json
from pathlib import Path


def loss_series(run: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """{"<file>:<loss key>": (iterations, values)} from every loss_logs/*.jsonl of a run."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for f in sorted(Path(run, "loss_logs").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if "iteration" not in rec:
                continue
            for k, v in rec.items():
                if k.startswith("loss/") and isinstance(v, (int, float)):
                    xs, ys = out.setdefault(f"{Path(run).name}:{k}", ([], []))
                    xs.append(int(rec["iteration"]))
                    ys.append(float(v))
    return out


def write_plots(out: Path, figures: dict, runs: tuple[str, ...] = ()) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return _pil_plots(out, figures, runs)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    proj = figures.get("projection")
    objs = {k: v for k, v in (figures.get("objectives") or {}).items() if v and "step_s" in v}
    if isinstance(proj, list) and proj or objs:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        if isinstance(proj, list) and proj:
            labels = [f"{r['model']}\n{r['resolution']}" for r in proj if r["gpu"] == proj[0]["gpu"]]
            gpus = sorted({r["gpu"] for r in proj})
            width = 0.8 / len(gpus)
            for i, g in enumerate(gpus):
                ys = [r["samples_per_s_per_gpu"] for r in proj if r["gpu"] == g]
                axes[0].bar([x + i * width for x in range(len(ys))], ys, width, label=g)
            axes[0].set_xticks([x + width * (len(gpus) - 1) / 2 for x in range(len(labels))], labels, fontsize=8)
            axes[0].set_ylabel("samples/s per GPU")
            axes[0].set_title(f"PROJECTED training throughput (MFU {proj[0]['mfu']:.2f})")
            axes[0].legend()
        if objs:
            names = list(objs)
            axes[1].barh(names, [objs[n]["step_s"] for n in names])
            axes[1].set_xlabel("s / iteration (measured, tiny recipe, CPU)")
            axes[1].set_title("objectives: iteration time")
        fig.tight_layout()
        path = out / "throughput.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    series = {}
    for r in runs:
        series |= loss_series(r)
    if series:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, label=name)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_title("loss curves")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(str(path))
    return written


# ---- without matplotlib -----------------------------------------------------------------------

def _pil_bars(title: str, labels: list[str], values: list[float], path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, left, top = 900, 40 + 22 * len(values), 260, 30
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 8), title, fill="black")
    top_v = max(values) or 1.0
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = top + 22 * i
        d.text((10, y + 4), lab[:40], fill="black")
        d.rectangle([left, y + 2, left + int((w - left - 90) * v / top_v), y + 18], fill=(60, 110, 190))
        d.text((w - 85, y + 4), f"{v:,.3g}", fill="black")
    im.save(path)


def _pil_lines(title: str, series: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 900, 450, 50
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    d.text((10, 8), title, fill="black")
    xs = [x for s in series.values() for x in s[0]]
    ys = [y for s in series.values() for y in s[1]]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    sx = lambda x: pad + (w - 2 * pad) * (x - x0) / ((x1 - x0) or 1)
    sy = lambda y: h - pad - (h - 2 * pad) * (y - y0) / ((y1 - y0) or 1)
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for i, (name, (px, py)) in enumerate(series.items()):
        c = colours[i % len(colours)]
        d.line([(sx(x), sy(y)) for x, y in zip(px, py)], fill=c, width=2)
        d.text((pad + 5, pad + 5 + 14 * i), name, fill=c)
    d.text((pad, h - pad + 8), f"iteration {x0} .. {x1}; loss {y0:.4g} .. {y1:.4g}", fill="black")
    im.save(path)


def _pil_plots(out: Path, figures: dict, runs: tuple[str, ...]) -> list[str]:
    written = []
    proj = figures.get("projection")
    objs = {k: v for k, v in (figures.get("objectives") or {}).items() if v and "step_s" in v}
    labels, values = [], []
    if isinstance(proj, list):
        labels += [f"PROJECTED {r['gpu']} {r['model']} {r['resolution']}px" for r in proj]
        values += [r["samples_per_s_per_gpu"] for r in proj]
    if labels:
        _pil_bars("projected samples/s per GPU", labels, values, out / "throughput.png")
        written.append(str(out / "throughput.png"))
    if objs:
        _pil_bars("objectives: s / iteration (measured)", list(objs), [v["step_s"] for v in objs.values()],
                  out / "objectives.png")
        written.append(str(out / "objectives.png"))
    series = {}
    for r in runs:
        series |= loss_series(r)
    if series:
        _pil_lines("loss curves", series, out / "loss.png")
        written.append(str(out / "loss.png"))
    return written
