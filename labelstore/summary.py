"""Human-readable summary of a label store, for ``fkd-dali inspect STORE``."""

from __future__ import annotations

import os
import zipfile

import zarr.storage
from zarr.core.sync import sync

from .store import LabelStore


def object_sizes(store: LabelStore) -> dict[str, int]:
    """Size of every file / object of the store by key, from one listing (local walk, zip directory, or
    the object store's LIST with sizes)."""
    zs = store.store
    if store.local_dir is not None:
        root = store.local_dir
        return {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"): os.path.getsize(os.path.join(d, f))
                for d, _, fs in os.walk(root) for f in fs}
    if isinstance(zs, zarr.storage.ZipStore):
        with zipfile.ZipFile(zs.path) as z:
            return {i.filename: i.file_size for i in z.infolist() if not i.is_dir()}
    if isinstance(zs, zarr.storage.FsspecStore):
        base = zs.path.rstrip("/")
        found = sync(zs.fs._find(base, detail=True))
        return {k[len(base) + 1:]: int(v.get("size") or 0) for k, v in found.items()}

    async def listing():
        return {k: await zs.getsize(k) async for k in zs.list()}
    return sync(listing())


def disk_usage(store: LabelStore) -> dict[str, int]:
    """Bytes per top-level array (apparent size of its files), plus 'total'."""
    out: dict[str, int] = {"total": 0}
    for key, size in object_sizes(store).items():
        top, sep, _ = key.partition("/")
        if sep:
            out[top] = out.get(top, 0) + size
        out["total"] += size
    return out


def summarize(store: LabelStore) -> dict:
    m = store.meta
    done = store.done()
    usage = disk_usage(store)
    arrays = {}
    for name in ("files", "targets", "sizes", "done") + store.crop_arrays:
        a = store.array(name)
        dtype = "string" if name == "files" else str(a.dtype)
        arrays[name] = {"shape": list(a.shape), "dtype": dtype, "chunks": list(a.chunks),
                        "shards": list(a.shards) if a.shards else None, "bytes": usage.get(name, 0)}
    crop_bytes = sum(usage.get(n, 0) for n in store.crop_arrays)
    labelled = int(done.sum()) * m.num_crops  # per-crop sizes count labelled crops: an empty store has none
    return {
        "path": store.path,
        "schema_version": m.schema_version,
        "num_images": m.num_images, "num_crops": m.num_crops, "top_k": m.top_k,
        "num_classes": m.num_classes, "temperature": m.temperature,
        "kind": m.kind, "kind_described": store.describe_kind(), "label_what": store.kind.what,
        "kind_meta": list(store.kind.meta_lines), "kind_lines": store.kind.lines(store.fields),
        "rows": store.num_rows, "row_kind": store.kind.rows,
        "dim": store.fields.get("dim"),
        "rows_done": int(done.sum()), "complete": bool(m.complete),
        "layout": {"rows_per_shard": store.layout.rows_per_shard,
                   "crops_per_chunk": store.layout.crops_per_chunk},
        "bytes_total": usage["total"],
        "bytes_per_crop": usage["total"] / labelled if labelled else None,
        "label_bytes_per_crop": crop_bytes / labelled if labelled else None,
        "teachers": m.teachers, "crop": m.crop, "seed": m.seed, "exif": m.exif,
        "dataset": {"root": m.dataset_root, "fingerprint": m.fingerprint,
                    "classes": len(m.classes)},
        "source": m.source,
        "skipped": len(m.skipped),
        "arrays": arrays,
    }


def _teacher_lines(t: dict) -> list[str]:
    """A teacher record: its plain fields on one line, each nested record (a loader's ``describe``, an ensemble's
    members) below it, one field per line, so that no line carries a whole dict."""
    plain = {k: v for k, v in t.items() if not isinstance(v, dict)}
    lines = ["  teacher    " + ", ".join(f"{k}={v}" for k, v in plain.items())]

    def nested(d: dict, indent: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                lines.append(f"{indent}{k}:")
                nested(v, indent + "  ")
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for i, x in enumerate(v):
                    lines.append(f"{indent}{k} ({i + 1} of {len(v)}):")
                    nested(x, indent + "  ")
            elif k not in plain or plain[k] != v:  # what the teacher line already says is not repeated
                lines.append(f"{indent}{k:12s} {(', '.join(map(str, v)) or 'none') if isinstance(v, list) else v}")
    for k, v in t.items():
        if isinstance(v, dict):
            lines.append(f"    {k}:")
            nested(v, "      ")
    return lines


def format_summary(s: dict) -> str:
    mb = s["bytes_total"] / 2**20
    lines = [
        f"label store  {s['path']}  (schema v{s['schema_version']})",
        (f"  images     {s['num_images']:,}  x  {s['num_crops']} crops  x  "
         + (f"top-{s['top_k']} of {s['num_classes']} classes" if s.get("kind", "topk") == "topk" else
            f"{s['label_what']}")) if s.get("row_kind", "image") == "image" else
        f"  images     {s['num_images']:,}; rows: {s['rows']:,} steps x {s['num_crops']} positions, "
        f"{s['label_what']} of {s['num_classes']} classes",
        f"  labels     {s.get('kind_described', 'kind topk')}",
        f"  complete   {'yes' if s['complete'] else 'NO'}  ({s['rows_done']:,} / {s.get('rows', s['num_images']):,} "
        "rows done)",
        f"  on disk    {mb:,.2f} MiB;  " + (f"{s['bytes_per_crop']:.2f} B per labelled crop (labels+boxes+flips: "
                                         f"{s['label_bytes_per_crop']:.2f} B/crop)" if s["bytes_per_crop"] is not None
                                         else "no crop labelled yet"),
        f"  layout     {s['layout']['rows_per_shard']} rows per shard file, "
        f"{s['layout']['crops_per_chunk']} crops per inner chunk",
        f"  dataset    root '{s['dataset']['root']}', {s['dataset']['classes']} classes, "
        f"fingerprint {s['dataset']['fingerprint'][:23]}...",
        "  " + "   ".join(([f"temperature {s['temperature']}"] if "temperature" in s.get("kind_meta", ["temperature"])
                             else []) + [f"seed {s['seed']}", f"EXIF orientation: {s['exif']}"]),
    ]
    lines += s.get("kind_lines", [])
    if s["crop"]:
        lines.append("  crops      " + ", ".join(f"{k}={v}" for k, v in s["crop"].items()))
    for t in s["teachers"] or []:
        lines += _teacher_lines(t)
    if s["source"]:
        lines.append("  source     " + ", ".join(f"{k}={v}" for k, v in s["source"].items() if k != "settings"))
    if not s["complete"]:
        kind = (s["source"] or {}).get("kind")
        how = ("rerun the `fkd-dali generate` command that made it (same options and --save-path: it resumes "
               "where it stopped)" if kind == "generate" else
               "import the missing FKD label files again (`fkd-dali import-fkd ... --overwrite`)"
               if kind == "import-fkd" else "finish the tool that made it")
        missing = s.get("rows", s["num_images"]) - s["rows_done"] - s["skipped"]
        lines.append(f"  to finish  {missing:,} rows have no labels: {how}")
    lines.append("  arrays")
    for name, a in s["arrays"].items():
        shards = f" shards {tuple(a['shards'])}" if a["shards"] else ""
        lines.append(f"    {name:9s} {str(tuple(a['shape'])):22s} {a['dtype']:8s} chunks "
                     f"{str(tuple(a['chunks'])):16s}{shards}  {a['bytes'] / 2**20:9.2f} MiB")
    return "\n".join(lines)
