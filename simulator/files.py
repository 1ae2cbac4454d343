"""Files of the ComfyUI simulator: its input/output/temp directories, the small but valid
files its output nodes write (named like ComfyUI's), and safe path resolution for
``/view`` and ``/upload/image``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".webp"})
AUDIO_SUFFIXES = frozenset({".wav", ".mp3", ".flac", ".ogg", ".opus", ".m4a"})
INPUT_SUFFIXES: Mapping[str, frozenset[str] | None] = {
    "image": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES, "audio": AUDIO_SUFFIXES,
    "latent": frozenset({".latent"}),
}
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")
ANNOTATIONS = {"[input]": "input", "[output]": "output", "[temp]": "temp"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def tiny_png(size: int = 8, rgb: tuple[int, int, int] = (96, 96, 96)) -> bytes:
    """A valid ``size`` x ``size`` PNG of one colour."""
    row = b"\x00" + bytes(rgb) * size
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(row * size)) + _png_chunk(b"IEND", b""))


def tiny_mp4() -> bytes:
    """An ISO-BMFF header (``ftyp`` + empty ``mdat``): enough for type sniffing, not playback."""
    ftyp = b"ftypisom" + struct.pack(">I", 0x200) + b"isomiso2avc1mp41"
    return struct.pack(">I", 8 + len(ftyp)) + ftyp + struct.pack(">I", 8) + b"mdat"


def tiny_latent() -> bytes:
    """A safetensors file holding a 1x4x1x1 zero ``latent_tensor``, as SaveLatent writes."""
    header = json.dumps({
        "__metadata__": {"format": "comfy-dual simulator"},
        "latent_tensor": {"dtype": "F32", "shape": [1, 4, 1, 1], "data_offsets": [0, 16]},
        "latent_format_version_0": {"dtype": "F32", "shape": [0], "data_offsets": [16, 16]},
    }).encode()
    return struct.pack("<Q", len(header)) + header + bytes(16)


TINY_WEBP = base64.b64decode("UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA==")
TINY_WEBM = bytes.fromhex(  # an EBML header with DocType "webm"
    "1a45dfa39f4286810142f7810142f2810442f381084282847765626d4287810242858102")


@dataclass(frozen=True)
class OutputKind:
    """How one output node class saves: extension, ``ui`` key, animated marker, folder."""

    suffix: str
    ui_key: str
    content: Callable[[], bytes]
    animated: bool | None = None
    folder: str = "output"
    abs_path: bool = False
    batched: bool = False


OUTPUT_KINDS: Mapping[str, OutputKind] = {
    "SaveImage": OutputKind(".png", "images", tiny_png, abs_path=True, batched=True),
    "PreviewImage": OutputKind(".png", "images", tiny_png, folder="temp", batched=True),
    "SaveAnimatedPNG": OutputKind(".png", "images", tiny_png, animated=True),
    "SaveAnimatedWEBP": OutputKind(".webp", "images", lambda: TINY_WEBP, animated=True),
    "SaveWEBM": OutputKind(".webm", "images", lambda: TINY_WEBM, animated=True),
    "SaveVideo": OutputKind(".mp4", "images", tiny_mp4, animated=True),
    "SaveLatent": OutputKind(".latent", "latents", tiny_latent),
}


def strip_annotation(name: str) -> tuple[str, str | None]:
    """``"a.png [output]"`` -> ``("a.png", "output")``, as ComfyUI's annotated file paths."""
    for mark, folder in ANNOTATIONS.items():
        if name.endswith(" " + mark):
            return name[: -len(mark) - 1], folder
    return name, None


def inside(root: Path, *parts: str) -> Path | None:
    """``root/parts...`` resolved, or ``None`` when it would leave ``root`` (resolved)."""
    target = root.joinpath(*parts).resolve()
    return target if target.is_relative_to(root) else None


class SimFiles:
    """The three directories of one simulated server and what happens in them."""

    def __init__(self, input_dir: Path, output_dir: Path, temp_dir: Path) -> None:
        self.dirs = {"input": input_dir, "output": output_dir, "temp": temp_dir}
        for directory in self.dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
        # resolved once: every save and lookup is checked against them
        self._roots = {kind: directory.resolve() for kind, directory in self.dirs.items()}

    @classmethod
    def in_scratch(cls, scratch: Path, input_dir: Path | None,
                   output_dir: Path | None) -> SimFiles:
        """The input and output directories given; the others in ``scratch``."""
        return cls(input_dir or scratch / "input", output_dir or scratch / "output",
                   scratch / "temp")

    def list_inputs(self, kind: str) -> list[str]:
        """Files of one kind at the top of the input directory, sorted (like ComfyUI)."""
        suffixes = INPUT_SUFFIXES.get(kind)
        return sorted(p.name for p in self.dirs["input"].iterdir()
                      if p.is_file() and (suffixes is None or p.suffix.lower() in suffixes))

    def input_path(self, value: str) -> Path | None:
        """The file a LoadImage-style input names (``sub/name``, ``name [output]``)."""
        name, folder = strip_annotation(value)
        path = inside(self._roots[folder or "input"], name)
        return path if path is not None and path.is_file() else None

    def view_path(self, filename: str, subfolder: str, folder: str) -> Path | None:
        """The file ``/view`` serves, or ``None`` (missing, unknown type, escaping path)."""
        name, annotated = strip_annotation(filename)
        root = self._roots.get(annotated or folder)
        if root is None or not name or name.startswith("/") or ".." in name:
            return None
        path = inside(root, subfolder, Path(name).name)
        return path if path is not None and path.is_file() else None

    def upload(self, filename: str, subfolder: str, folder: str, data: bytes,
               overwrite: bool) -> str | None:
        """Store an upload like ComfyUI; the name it got, or ``None`` for a bad target."""
        root = self._roots.get(folder)
        target = None if root is None or not filename else inside(root, subfolder, filename)
        if target is None:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        stem, suffix, n = Path(filename).stem, Path(filename).suffix, 1
        while not overwrite and target.exists() and target.read_bytes() != data:
            target = target.with_name(f"{stem} ({n}){suffix}")
            n += 1
        target.write_bytes(data)
        return target.name

    def save_outputs(self, kind: OutputKind, prefix: str, count: int) -> dict[str, Any]:
        """Write ``count`` files for one output node; its ``ui`` output, as in history."""
        folder, name, counter = self._save_target(kind, prefix)
        results = []
        for i in range(count):
            path = folder / f"{name}_{counter + i:05}_{kind.suffix}"
            path.write_bytes(kind.content())
            results.append(self._describe(kind, path))
        ui: dict[str, Any] = {kind.ui_key: results}
        if kind.animated is not None:
            ui["animated"] = [kind.animated]
        return ui

    def _save_target(self, kind: OutputKind, prefix: str) -> tuple[Path, str, int]:
        """ComfyUI's ``get_save_image_path``: folder (resolved), base name, next free counter."""
        folder = inside(self._roots[kind.folder], prefix)
        if folder is None or not Path(prefix).name:
            raise SaveOutsideOutput(
                f"Saving image outside the output folder is not allowed. prefix: {prefix}")
        folder = folder.parent
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(prefix).name
        pattern = re.compile(rf"{re.escape(name)}_(\d+)_")
        used = [int(m.group(1)) for entry in os.listdir(folder) if (m := pattern.match(entry))]
        return folder, name, max(used, default=0) + 1

    def _describe(self, kind: OutputKind, path: Path) -> dict[str, Any]:
        """``path`` was just written in a resolved folder: no need to resolve it again."""
        subfolder = path.parent.relative_to(self._roots[kind.folder]).as_posix()
        entry = {"filename": path.name, "subfolder": "" if subfolder == "." else subfolder,
                 "type": kind.folder}
        return {"abs_path": str(path), **entry} if kind.abs_path else entry


def looks_like_image(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(12)
    return head.startswith(IMAGE_MAGIC) and (not head.startswith(b"RIFF") or head[8:] == b"WEBP")


class SaveOutsideOutput(ValueError):
    """A ``filename_prefix`` that points outside the output directory."""
