"""Which timm architectures cam-plugin resolves, refuses, or skipped: writes docs/timm-support.md.

For every name in ``timm.list_models()`` (random init, no downloads):

1. the model is built on the ``meta`` device to count its parameters without allocating;
   models above ``--max-params`` are skipped (listed with their size);
2. otherwise it is built on the CPU and resolved with ``cam_plugin.resolve`` (the timm
   adapter: one probe forward at the model's own input size), in a worker process with a
   per-model time limit;
3. a resolved model reports its feature module, layout and map size; a refused one the
   reason the library gives (the same message a user sees).

Run: ``.venv/bin/python tools/timm_support_table.py`` (about 20-30 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import sys
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- table:begin -->", "<!-- table:end -->"


def _check(name: str) -> dict[str, Any]:
    import timm
    import torch
    from cam_plugin.integrations.timm import timm_adapter

    import cam_plugin as cp
    from cam_plugin.discovery import guess_input_size

    torch.set_num_threads(1)
    try:
        model = timm.create_model(name, pretrained=False).eval()
    except Exception as err:  # a model that does not build at all is reported, not hidden
        return {"name": name, "status": "error", "detail": f"create_model failed: {err}"[:200]}
    native = guess_input_size(model)
    # convolutional models are probed at 64 px (cheap); fixed-size ones fall back to native
    sizes = [(native[0], 64, 64), native] if native[1] > 64 else [native]
    adapter = None
    reason = ""
    refused = False
    for size in sizes:
        try:
            adapter = timm_adapter(model, input_size=size, probe_batch=1)
            break
        except cp.UnsupportedHeadError as err:
            reason, refused = str(err).split(" CAM is exact only")[0], True
            if "reproduces the model's logits only" not in reason and "does not pool" not in reason:
                break
        except Exception as err:
            reason, refused = f"{type(err).__name__}: {err}", False
    if adapter is None:
        if getattr(model, "global_pool", None) == "token":
            try:
                avg = timm.create_model(name, pretrained=False, global_pool="avg").eval()
                timm_adapter(avg, probe_batch=1)
                reason = "CLS-token pooling as built; **resolves with `global_pool='avg'`**"
            except Exception:
                pass
        status = "refused" if refused else "not resolved"
        return {"name": name, "status": status, "detail": reason[:240]}
    kind = adapter.layout.kind
    if kind == "tokens":
        kind += f", {adapter.layout.num_prefix_tokens} prefix tokens"
    return {
        "name": name,
        "status": "resolved",
        "detail": f"features: {adapter.feature_name} ({kind})",
    }


def _params_on_meta(name: str) -> int:
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def run(names: list[str], max_params: float, timeout: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(1, maxtasksperchild=200)
    try:
        for i, name in enumerate(names):
            try:
                params = _params_on_meta(name)
            except Exception as err:
                rows.append(
                    {"name": name, "status": "error", "detail": f"meta build failed: {err}"[:200]}
                )
                continue
            if params > max_params:
                rows.append(
                    {
                        "name": name,
                        "status": "skipped",
                        "params_m": round(params / 1e6, 1),
                        "detail": f"larger than {max_params / 1e6:.0f} M parameters",
                    }
                )
                continue
            job = pool.apply_async(_check, (name,))
            try:
                rows.append(job.get(timeout))
            except mp.TimeoutError:
                pool.terminate()
                pool = ctx.Pool(1, maxtasksperchild=200)
                rows.append(
                    {"name": name, "status": "skipped", "detail": f"over the {timeout:.0f} s limit"}
                )
            except Exception as err:
                rows.append(
                    {"name": name, "status": "error", "detail": f"worker failed: {err}"[:200]}
                )
            rows[-1]["params_m"] = round(params / 1e6, 1)
            print(f"[{i + 1}/{len(names)}] {name}: {rows[-1]['status']}", flush=True)
    finally:
        pool.terminate()
    return rows


def render(rows: list[dict[str, Any]], timm_version: str) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        f"Generated by `tools/timm_support_table.py` on {datetime.date.today()} with timm "
        f"{timm_version}, Python {platform.python_version()}: {len(rows)} architectures from "
        "`timm.list_models()`.",
        "",
        "| status | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(counts.items())],
        "",
        "| architecture | params (M) | status | detail |",
        "|---|---|---|---|",
    ]
    for r in rows:
        detail = str(r.get("detail", "")).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{r['name']}` | {r.get('params_m', '')} | {r['status']} | {detail} |")
    return "\n".join(lines)


def write_page(page: Path, table: str) -> None:
    text = page.read_text() if page.exists() else f"# timm support table\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    page.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--max-params", type=float, default=150e6)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--page", default="docs/timm-support.md")
    parser.add_argument("--json", default="docs/assets/timm-support.json")
    args = parser.parse_args(argv)
    import timm

    names = args.only.split(",") if args.only else timm.list_models()
    rows = run(names, args.max_params, args.timeout)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    write_page(Path(args.page), render(rows, timm.__version__))
    print(f"wrote {args.page} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
