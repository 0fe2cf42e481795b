"""Carry lto_variants' generic objects to another machine.

The generic fa3 module's objects (lto_variants.GenericModule: its kernel files as LTO IR, its two
host files) are built once per (dtype, head_dim, window flag); a GPU machine that is lent for 30
minutes should not spend minutes building them again before it can answer whether a score_mod's
module launches. pack() writes them, renamed by role and source file, into one xz tar with a
manifest (the module's name, the compiler and flags, each file's sha256); unpack() checks the
manifest against the module the other machine generates (same name: same variant text, slots,
dtype, head_dim, window flag and kept mask modes) and installs each object under the name that
machine's GenericModule looks for (object names carry the local compiler and flags, whose
include paths differ between machines: same FlashInfer, other install folder).

Optionally a libnvJitLink (xz) travels beside it: nvJitLink refuses LTO IR from an nvcc newer than
itself, and the other machine's own may be older than the compiler that built the objects.

Pure Python (tar, lzma, json); GenericModule is only touched through module_files().
"""
from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import pathlib
import tarfile

PACK_NAME = "generic.tar.xz"
MANIFEST = "manifest.json"
NVJITLINK_NAME = "libnvJitLink.so.xz"
NVJITLINK_INFO = "nvjitlink.json"
PACK_FORMAT = 1


class PackMismatch(RuntimeError):
    """The pack holds another generic module's objects (or misses some of this one's)."""


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def module_files(module):
    """{("kernel"|"host", source stem): object path} of a GenericModule (built or not)."""
    kernel_objects, host_objects = module.objects()
    files = {("kernel", s.stem): o for s, o in zip(module.kernel_sources, kernel_objects)}
    files.update({("host", s.stem): o for s, o in zip(module.host_sources, host_objects)})
    return files


def _member(role: str, stem: str) -> str:
    return f"{role}/{stem}.{'lto.o' if role == 'kernel' else 'cuda.o'}"


def pack(out_dir, name: str, files: dict, meta: dict | None = None, preset: int = 6) -> pathlib.Path:
    """Write out_dir/generic.tar.xz: the objects of files ({(role, stem): path}) as role/stem.*.o,
    and manifest.json (name, format, meta, each member's sha256, size and original name)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [str(p) for p in files.values() if not pathlib.Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"objects not built: {missing}")
    entries = [{"role": role, "stem": stem, "member": _member(role, stem), "built_as": pathlib.Path(path).name,
                "sha256": _sha256(pathlib.Path(path)), "bytes": pathlib.Path(path).stat().st_size}
               for (role, stem), path in sorted(files.items())]
    manifest = {"format": PACK_FORMAT, "name": name, "meta": meta or {}, "files": entries}
    out = out_dir / PACK_NAME
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with lzma.open(tmp, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for e, path in zip(entries, [files[k] for k in sorted(files)]):
            tar.add(str(path), arcname=e["member"])
    os.replace(tmp, out)
    return out


def read_manifest(pack_dir) -> dict:
    with tarfile.open(pathlib.Path(pack_dir) / PACK_NAME, "r:xz") as tar:
        return json.load(tar.extractfile(MANIFEST))


def unpack(pack_dir, name: str, targets: dict, overwrite: bool = False, sources_tag: str | None = None) -> dict:
    """Install the pack's objects at targets ({(role, stem): path}, the local module's object
    names), after checking the pack is this module's (name; with sources_tag, built from the same
    generated sources and FlashInfer: GenericModule.sources_tag, which the local names carry) and
    holds every target; returns the manifest. Each file is checked against its sha256 and written
    atomically; a target already there is kept unless overwrite."""
    pack_path = pathlib.Path(pack_dir) / PACK_NAME
    with tarfile.open(pack_path, "r:xz") as tar:
        manifest = json.load(tar.extractfile(MANIFEST))
        if manifest.get("format") != PACK_FORMAT:
            raise PackMismatch(f"{pack_path}: pack format {manifest.get('format')}, expected {PACK_FORMAT}")
        if manifest["name"] != name:
            raise PackMismatch(f"{pack_path} holds {manifest['name']}, this machine generates {name} "
                               "(another generic variant, slot layout, FlashInfer or kept mask modes)")
        packed_tag = manifest.get("meta", {}).get("sources_tag")
        if sources_tag is not None and packed_tag != sources_tag:
            raise PackMismatch(f"{pack_path} was built from other generated sources or another FlashInfer "
                               f"(sources tag {packed_tag}, here {sources_tag}): its objects would stand in for "
                               "code this machine does not have")
        entries = {(e["role"], e["stem"]): e for e in manifest["files"]}
        missing = sorted(set(targets) - set(entries))
        extra = sorted(set(entries) - set(targets))
        if missing or extra:
            raise PackMismatch(f"{pack_path}: missing {missing}, not in this module {extra}")
        for key, target in targets.items():
            target = pathlib.Path(target)
            if target.exists() and not overwrite:
                continue
            e = entries[key]
            data = tar.extractfile(e["member"]).read()
            if hashlib.sha256(data).hexdigest() != e["sha256"]:
                raise PackMismatch(f"{pack_path}: {e['member']} does not match its sha256")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
    return manifest


def pack_library(library, out_dir, version=None, preset: int = 9) -> pathlib.Path:
    """libnvJitLink as out_dir/libnvJitLink.so.xz, its version and sha256 in nvjitlink.json."""
    library, out_dir = pathlib.Path(library), pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / NVJITLINK_NAME
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(library, "rb") as src, lzma.open(tmp, "wb", preset=preset) as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            dst.write(chunk)
    os.replace(tmp, out)
    (out_dir / NVJITLINK_INFO).write_text(json.dumps(
        {"file": library.name, "from": str(library), "version": list(version) if version else None,
         "sha256": _sha256(library), "bytes": library.stat().st_size}, indent=1))
    return out


def unpack_library(pack_dir, dest_dir) -> pathlib.Path | None:
    """The packed libnvJitLink decompressed into dest_dir (checked against its sha256); None when
    the pack carries none."""
    pack_dir, dest_dir = pathlib.Path(pack_dir), pathlib.Path(dest_dir)
    src = pack_dir / NVJITLINK_NAME
    if not src.exists():
        return None
    info = json.loads((pack_dir / NVJITLINK_INFO).read_text())
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / info["file"]
    if not (out.exists() and _sha256(out) == info["sha256"]):
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with lzma.open(src, "rb") as s, open(tmp, "wb") as d:
            for chunk in iter(lambda: s.read(1 << 20), b""):
                d.write(chunk)
        if _sha256(tmp) != info["sha256"]:
            tmp.unlink()
            raise PackMismatch(f"{src}: decompressed library does not match its sha256")
        os.replace(tmp, out)
    return out
