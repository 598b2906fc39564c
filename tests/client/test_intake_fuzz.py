"""DICOM fuzzing (reliability check 15): 1,000 seeded mutations of real files, each read or
skipped with a reason, no crash, no PHI in any log line, the summary or the store."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import PHI, _nested_bytes, _save, _valid_dataset, ingest_dicom, write_cine_series

from client.intake.reasons import REASONS
from client.store import LocalStore
from sim.real_protocol import data_root

MUTATIONS = 1000
PIXEL_DATA_TAG = struct.pack("<HH", 0x7FE0, 0x0010)


def _mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    if kind == "truncate":
        return data[:int(rng.integers(0, len(data)))]
    if kind == "bit_flips":
        out = bytearray(data)
        for pos in rng.integers(128, len(out), int(rng.integers(1, 65))):
            out[pos] ^= 1 << int(rng.integers(0, 8))
        return bytes(out)
    if kind == "huge_length":  # the pixel data's, or any 4 bytes after the preamble
        out = bytearray(data)
        at = data.rfind(PIXEL_DATA_TAG)
        pos = at + 8 if at >= 0 and rng.random() < 0.5 else int(rng.integers(132, len(out) - 4))
        out[pos:pos + 4] = struct.pack("<I", int(rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0x40000000])))
        return bytes(out)
    if kind == "nested_300":
        return data + _nested_bytes(300)
    if kind == "zero_run":
        out = bytearray(data)
        start, length = int(rng.integers(0, len(out))), int(rng.integers(1, 512))
        out[start:start + length] = bytes(len(out[start:start + length]))
        return bytes(out)
    if kind == "text":
        return f"PatientName,{PHI['PatientName']}\nnot an image {rng.integers(1 << 30)}\n".encode()
    raise KeyError(kind)


KINDS = ("truncate", "bit_flips", "huge_length", "nested_300", "zero_run", "text")


def _monochrome1(path: Path, side: int) -> None:
    ds = _valid_dataset(7, side)
    ds.Rows = ds.Columns = side
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = np.zeros((side, side), dtype=np.uint16).tobytes()
    _save(ds, path)


@pytest.mark.timeout(900)
@pytest.mark.reliability(15)
def test_a_thousand_seeded_mutations_are_each_read_or_skipped_with_a_reason(tmp_path: Path, caplog,
                                                                          capfd) -> None:
    # Prepare: originals are real Sunnybrook cine DICOM (CC0) and a small series with PHI
    # planted everywhere a hospital export has it; 1,000 mutations of them, seeded, plus
    # MONOCHROME1 images at the side limit (4096 px) and one past it
    real = data_root() / "sunnybrook" / "dicoms" / "SCD0000101"
    if not real.is_dir():
        pytest.skip(f"{real} not present")
    planted = write_cine_series(tmp_path / "planted", slices=2, phases=2, rows=16, cols=16)
    originals = [p.read_bytes() for p in sorted(real.glob("*.dcm"))[:4]]
    originals += [p.read_bytes() for p in sorted((tmp_path / "planted").rglob("*")) if p.is_file()]
    assert planted and len(originals) >= 8
    export = tmp_path / "export"
    export.mkdir()
    rng = np.random.default_rng(20261201)
    for i in range(MUTATIONS):
        kind = KINDS[i % len(KINDS)]
        source = originals[int(rng.integers(len(originals)))]
        (export / f"m{i:04d}-{kind}.dcm").write_bytes(_mutate(source, kind, rng))
    _monochrome1(export / "limit" / "mono1-4096.dcm", 4096)
    _monochrome1(export / "limit" / "mono1-4097.dcm", 4097)

    # Execute: the intake as a node runs it, in worker processes
    with caplog.at_level(logging.DEBUG):
        summary = ingest_dicom(export, tmp_path / "store", crop_px=16, workers=2)

    # Check: every file is in a stored series or skipped with a known reason
    assert summary.files_seen == MUTATIONS + 2
    assert summary.files_accepted + sum(summary.skipped.values()) == summary.files_seen
    assert set(summary.skipped) <= set(REASONS), summary.skipped
    assert summary.skipped.get("absurd_dimensions", 0) >= 1  # the image past the side limit
    assert len(summary.skipped) >= 4  # the mutations reach different checks
    LocalStore.open(tmp_path / "store")  # the store is whole
    # ... and no planted PHI string in any log line (this process and the workers) or file
    logged = caplog.text + "".join(capfd.readouterr())
    stored = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    for value in PHI.values():
        assert value not in logged, value
        assert value.encode() not in stored, value


def _allocate_past_the_bound(extra: int, queue) -> None:
    from client.intake.reading import limit_address_space

    bounded = limit_address_space(extra)
    try:
        block = np.ones(4 * extra, dtype=np.uint8)  # 4x the bound, touched
        queue.put((bounded, f"allocated {block.nbytes}"))
    except MemoryError:
        queue.put((bounded, "MemoryError"))


@pytest.mark.reliability(15)
def test_a_reading_process_cannot_take_more_memory_than_its_bound() -> None:
    # A decoder asked for more than the bound fails with MemoryError in its worker (the file is
    # skipped), instead of taking the node's memory
    import multiprocessing
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS from /proc/self/statm is Linux's")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=_allocate_past_the_bound, args=(256 * 1024**2, queue))
    process.start()
    bounded, outcome = queue.get(timeout=60)
    process.join(timeout=60)
    assert bounded and outcome == "MemoryError"


def _rle_bomb(path: Path, side: int, frames: int) -> None:
    """A tiny RLE Lossless file that decodes to frames x side x side 16-bit pixels."""
    from pydicom.uid import RLELossless

    ds = _valid_dataset(8, side)
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = frames
    ds.PixelData = np.zeros((frames, side, side), dtype=np.uint16).tobytes()
    ds.compress(RLELossless)
    _save(ds, path)


@pytest.mark.reliability(15)
def test_a_small_export_reads_compressed_or_large_files_only_in_a_bounded_process(tmp_path: Path) -> None:
    # Prepare: an export of three files (read in the ingesting process, being fewer than the
    # worker threshold): two plain frames and a 2 MB RLE file that decodes to 128 MiB
    from client.intake.pipeline import _Progress, read_files
    from client.intake.reading import InstanceResult, ReadSettings

    paths = [_save(_valid_dataset(9, i), tmp_path / f"plain-{i}.dcm") for i in range(2)]
    _rle_bomb(tmp_path / "bomb.dcm", 4096, 4)
    paths.append(tmp_path / "bomb.dcm")
    assert (tmp_path / "bomb.dcm").stat().st_size < 4 * 1024**2
    settings = ReadSettings(spacing_mm=1.5, crop_px=16, secret="s" * 32, worker_memory_bytes=64 * 1024**2)
    results: list[InstanceResult] = []
    # Execute
    read_files(list(enumerate(map(str, paths))), settings, 1, _Progress(None, 3, False), results.extend)
    # Assert: the plain frames read here; the decoder ran in a reading process bounded to 64 MiB
    # beyond its start, where it ran out of memory and the file was skipped with a reason
    by_index = {r.index: r for r in results}
    assert sorted(by_index) == [0, 1, 2]
    assert by_index[0].frames and by_index[1].frames
    assert by_index[2].reason == "absurd_dimensions" and not by_index[2].frames
